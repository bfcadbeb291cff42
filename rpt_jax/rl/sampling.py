"""Per-step token sampling: greedy, temperature, top-k and top-p (nucleus), as pure functions.

`Sampling` is a small frozen (hashable, jit-static) description of the method; `sample_tokens`
turns one step's logits [B, V] and one uniform number per row [B] into (tokens [B], logprobs [B]).

Draws use the inverse CDF: token = the first index whose cumulative probability reaches u * total.
That needs ONE random number per row instead of V Gumbel draws, is exact in distribution, and
can never pick a token whose probability is exactly 0 (so top-k/top-p exclusions are strict).

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
  """(argmax tokens [B] int32, their log-probs under softmax(logits) [B] fp32)."""
  logits_BV = logits_BV.astype(jnp.float32)
  tokens_B = jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  best_B = jnp.take_along_axis(logits_BV, tokens_B[:, None], axis=-1)[:, 0]
  return tokens_B, best_B - jax.nn.logsumexp(logits_BV, axis=-1)


def inverse_cdf(weights_BK: Array, u_B: Array) -> Array:
  """Index [B] drawn with probability weights / sum(weights) (weights >= 0), u in (0, 1].

  Returns the first k with cumsum[k] >= u * total; a zero-weight k never qualifies (its cumsum
  equals its predecessor's), and u > 0 rules out choosing a zero-weight index 0.
  """
  cdf_BK = jnp.cumsum(weights_BK, axis=-1)
  target_B1 = u_B[:, None] * cdf_BK[:, -1:]  # u <= 1, so target <= total: always in range.
  index_B = jnp.sum(cdf_BK < target_B1, axis=-1, dtype=jnp.int32)
  return jnp.minimum(index_B, weights_BK.shape[-1] - 1)


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

  Keying by the global row id makes a row's draws independent of how the batch is split into
  micro-batches or shards.
  """
  step_key = jax.random.fold_in(rng, step)
  keys = jax.vmap(lambda r: jax.random.fold_in(step_key, r))(row_ids_B)
  # uniform is in [0, 1); 1 - u is in (0, 1], as inverse_cdf needs.
  return 1.0 - jax.vmap(lambda k: jax.random.uniform(k, (), jnp.float32))(keys)
