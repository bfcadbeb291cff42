"""Per-step token sampling: greedy, temperature, top-k and top-p (nucleus), as pure functions.

`Sampling` is a small frozen (hashable, jit-static) description of the method; `sample_tokens`
turns one step's logits [B, V] and one uniform number per row [B] into (tokens [B], logprobs [B]).

Draws use the inverse CDF: token = the first index whose cumulative probability reaches u * total
(found block by block, see `inverse_cdf`). That needs ONE random number per row instead of V
Gumbel draws, is exact in distribution, and can never pick a token whose probability is exactly
0 (so top-k/top-p exclusions are strict).

Log-probs: `logprobs` is log softmax(logits / T) at the sampled token, the temperature-scaled
UNTRUNCATED distribution, which is what the trainer recomputes from the same weights (so the PPO
ratio starts at exactly 1). With top-k/top-p the tokens are drawn from the truncated,
renormalised distribution instead, so that "old policy" differs from the behaviour policy; the
paper uses neither (T = 0.8 only). Greedy (T = 0) reports log-probs of the T = 1 distribution.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Sampling:
  """temperature: 0 means greedy (argmax); top_k: 0 means off; top_p: 1.0 means off.

  With both truncations, top-k is applied first, then top-p within the k survivors (HF's order).
  """

  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0

  def __post_init__(self):
    if not self.temperature >= 0:
      raise ValueError(f"temperature={self.temperature} must be >= 0 (0 means greedy).")
    if self.top_k < 0:
      raise ValueError(f"top_k={self.top_k} must be >= 0 (0 switches top-k off).")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p={self.top_p} must be in (0, 1] (1.0 switches top-p off).")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0


def greedy(logits_BV: Array) -> tuple[Array, Array]:
  """(argmax tokens [B] int32, their log-probs under softmax(logits) [B] fp32).

  Ties go to the smallest index, as jnp.argmax; written as max + compare because XLA's
  variadic argmax reduction is ~8x slower on CPU.
  """
  logits_BV = logits_BV.astype(jnp.float32)
  max_B1 = jnp.max(logits_BV, axis=-1, keepdims=True)
  vocab = logits_BV.shape[-1]
  tokens_B = jnp.min(jnp.where(logits_BV == max_B1, jnp.arange(vocab, dtype=jnp.int32), vocab),
                     axis=-1)
  log_norm_B = max_B1[:, 0] + jnp.log(jnp.sum(jnp.exp(logits_BV - max_B1), axis=-1))
  return tokens_B, max_B1[:, 0] - log_norm_B


def _first_reaching(cdf_BK: Array, target_B: Array, positive_BK: Array) -> Array:
  """The first k with cdf[k] >= target (target > 0), clamped to the last k of positive weight
  (rounding can leave cdf[-1] a hair below target). A zero-weight k never qualifies: its cdf
  equals its predecessor's."""
  index_B = jnp.sum(cdf_BK < target_B[:, None], axis=-1, dtype=jnp.int32)
  k = jnp.arange(cdf_BK.shape[-1], dtype=jnp.int32)
  return jnp.minimum(index_B, jnp.max(jnp.where(positive_BK, k, 0), axis=-1))


def inverse_cdf(weights_BK: Array, u_B: Array, block: int = 128) -> Array:
  """Index [B] drawn with probability weights / sum(weights) (weights >= 0, some > 0), u in
  (0, 1] (u > 0 rules out a zero-weight index 0).

  Two levels, so no cumulative sum runs over the whole vocabulary (XLA's [B, V] cumsum costs
  more than the unembedding matmul on CPU): pick the block of `block` entries whose cumulative
  mass reaches u * total, then the entry inside that block.
  """
  b, k = weights_BK.shape
  if k <= 2 * block:
    cdf_BK = jnp.cumsum(weights_BK, axis=-1)
    return _first_reaching(cdf_BK, u_B * cdf_BK[:, -1], weights_BK > 0)
  blocks_BNC = jnp.pad(weights_BK, ((0, 0), (0, -k % block))).reshape(b, -1, block)
  mass_BN = jnp.sum(blocks_BNC, axis=-1)
  cdf_BN = jnp.cumsum(mass_BN, axis=-1)
  target_B = u_B * cdf_BN[:, -1]  # u <= 1, so target <= total.
  block_B = _first_reaching(cdf_BN, target_B, mass_BN > 0)
  before_B = jnp.where(block_B > 0, jnp.take_along_axis(
      cdf_BN, jnp.maximum(block_B - 1, 0)[:, None], axis=-1)[:, 0], 0.0)
  inner_BC = jnp.take_along_axis(blocks_BNC, block_B[:, None, None], axis=1)[:, 0]
  # before < target (block_B is the first block whose cdf reaches it), so the rest is > 0.
  inner_B = _first_reaching(jnp.cumsum(inner_BC, axis=-1), target_B - before_B, inner_BC > 0)
  return block_B * block + inner_B


def _nucleus_weights(sorted_probs_BK: Array, top_p: float) -> Array:
  """Zeroes tokens (sorted descending) whose preceding mass already reaches top_p; the first
  token is always kept. Input need not be normalised."""
  total_B1 = jnp.sum(sorted_probs_BK, axis=-1, keepdims=True)
  before_BK = jnp.cumsum(sorted_probs_BK, axis=-1) - sorted_probs_BK
  return jnp.where(before_BK < top_p * total_B1, sorted_probs_BK, 0.0)


def sample_tokens(logits_BV: Array, u_B: Array, method: Sampling) -> tuple[Array, Array]:
  """One sampling step: (tokens [B] int32, logprobs [B] fp32 of the untruncated softmax(l/T)).

  logits_BV: any float dtype (computed in fp32). u_B: uniforms in (0, 1], one per row.
  """
  if method.greedy:
    return greedy(logits_BV)
  scaled_BV = logits_BV.astype(jnp.float32) / method.temperature
  max_B1 = jnp.max(scaled_BV, axis=-1, keepdims=True)
  unnorm_BV = jnp.exp(scaled_BV - max_B1)  # One exp serves the log-normaliser and the draw.
  log_norm_B = max_B1[:, 0] + jnp.log(jnp.sum(unnorm_BV, axis=-1))
  if method.top_k or method.top_p < 1.0:
    k = min(method.top_k or logits_BV.shape[-1], logits_BV.shape[-1])
    # top_k with k == V is a full descending sort (needed for the nucleus on the whole vocab).
    top_BK, index_BK = jax.lax.top_k(scaled_BV, k)
    weights_BK = jnp.exp(top_BK - max_B1)
    if method.top_p < 1.0:
      weights_BK = _nucleus_weights(weights_BK, method.top_p)
    pick_B = inverse_cdf(weights_BK, u_B)
    tokens_B = jnp.take_along_axis(index_BK, pick_B[:, None], axis=-1)[:, 0]
    chosen_B = jnp.take_along_axis(top_BK, pick_B[:, None], axis=-1)[:, 0]
  else:
    tokens_B = inverse_cdf(unnorm_BV, u_B)
    chosen_B = jnp.take_along_axis(scaled_BV, tokens_B[:, None], axis=-1)[:, 0]
  return tokens_B.astype(jnp.int32), chosen_B - log_norm_B


def row_uniforms(rng: Array, step: Array | int, row_ids_B: Array) -> Array:
  """Uniforms in (0, 1], one per row, from fold_in(fold_in(rng, step), global row id).

  Keying by the global row id and the row's own token index makes a row's draws independent of
  how rows are split into micro-batches, shards or decode slots. rng: one key, or one per row
  [B]; step: one token index, or one per row [B] (rows of a slot engine are at different steps).
  """
  steps_B = jnp.broadcast_to(jnp.asarray(step, jnp.int32), row_ids_B.shape)
  one = lambda key, t, r: jax.random.fold_in(jax.random.fold_in(key, t), r)  # noqa: E731
  keys = jax.vmap(one, in_axes=(0 if rng.ndim else None, 0, 0))(rng, steps_B, row_ids_B)
  # uniform is in [0, 1); 1 - u is in (0, 1], as inverse_cdf needs.
  return 1.0 - jax.vmap(lambda k: jax.random.uniform(k, (), jnp.float32))(keys)
