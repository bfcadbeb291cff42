# Over ~400 lines: chunked vocab-parallel log-probs and the loss are one numeric contract.
"""Per-token log-probs/entropies without [B, T, V] logits, and the clipped GRPO policy loss.

This module owns the numerics of the train step's objective:

* `token_logprobs_and_entropy`: log pi(target) and the entropy of the temperature-scaled
  next-token distribution, in fp32, from final hidden states and the unembedding. The B x T
  positions (each device's rows, flattened) are processed in chunks of at most `chunk_size`
  positions under `jax.checkpoint`, so neither the forward nor the backward pass holds more than
  [chunk, V / tensor] logits per device (plus the [D, V / tensor] unembedding gradient), whatever
  B and T are; a full [B, T, V] tensor never exists. With a mesh whose
  'vocab' rule names a mesh axis of size > 1, each device computes logits for its own vocab slice
  inside `jax.shard_map` and the log-sum-exp, the target logit and the entropy are assembled with
  `pmax`/`psum` over that axis (Megatron-style vocab-parallel cross-entropy).
* `LossConfig` and `policy_loss`: PPO/GRPO clipped surrogate (with clip-higher), optional KL to a
  reference policy and entropy bonus, aggregated per token or per sequence. The loss comes back as
  (sum, denominator) so that gradient accumulation over micro-batches reproduces the exact
  full-batch mean: add the sums, add the denominators, divide once (`mean_loss`).
* Advantages live in `rpt_jax.rl.advantages` and are re-exported here.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from rpt_jax.mesh import ShardingRules, as_tuple
from rpt_jax.registry import Registry
from rpt_jax.rl.advantages import (ADVANTAGE_ESTIMATORS, group_advantages,  # noqa: F401
                                   register_advantage_estimator)

# ----------------------------------------------------------------------------------------------
# Chunked, vocab-parallel log-probs and entropies.
# ----------------------------------------------------------------------------------------------


def token_logprobs_and_entropy(
    hidden_BTD: jax.Array, unembed_DV: jax.Array, targets_BT: jax.Array, *,
    temperature: float = 1.0, chunk_size: int = 256, mesh: Mesh | None = None,
    rules: ShardingRules | Any = None) -> tuple[jax.Array, jax.Array]:
  """log p(target) and entropy of softmax(hidden @ unembed / temperature), per position.

  Args:
    hidden_BTD: final (post-norm) hidden states; any float dtype (the matmul accumulates in fp32).
    unembed_DV: the LM head as [D, V] (`Transformer.unembedding()`).
    targets_BT: int token ids in [0, V) whose log-probs are wanted (the next tokens). Ids outside
      that range give a finite, meaningless value: mask those positions in the loss.
    temperature: logits are divided by it (use the sampling temperature so that the log-probs
      are those of the distribution the rollouts were drawn from).
    chunk_size: the most positions per chunk, counted over rows x tokens (B*T per device is
      split into ceil(B*T / chunk_size) equal chunks, padded by fewer positions than chunks).
    mesh, rules: with a mesh, the math runs under `jax.shard_map`: batch split over the axes of
      the 'batch' rule that divide B, and, when `rules` (default `ShardingRules()`, vocab ->
      'tensor') map 'vocab' to mesh axes of size > 1, the unembedding split over vocab
      (zero-padded to a multiple of the split if needed) with the softmax statistics combined
      by `pmax`/`psum`. Inputs are resharded to that layout first (Auto or Explicit meshes).
      Without a mesh: plain chunked jnp.

  Returns:
    (logp_BT, entropy_BT), both fp32. Differentiable w.r.t. hidden and unembed.

  Memory: live logits are O(chunk_size * V / tensor) per device in both passes (each chunk is
  recomputed in the backward pass), instead of O(B * T * V).
  """
  if hidden_BTD.ndim != 3 or unembed_DV.ndim != 2 or targets_BT.ndim != 2:
    raise ValueError(
        f"expected hidden [B, T, D], unembed [D, V], targets [B, T]; got shapes "
        f"{hidden_BTD.shape}, {unembed_DV.shape}, {targets_BT.shape}.")
  if hidden_BTD.shape[2] != unembed_DV.shape[0] or hidden_BTD.shape[:2] != targets_BT.shape:
    raise ValueError(
        f"shapes do not agree: hidden {hidden_BTD.shape}, unembed {unembed_DV.shape}, targets "
        f"{targets_BT.shape}; need hidden [B, T, D], unembed [D, V], targets [B, T].")
  if not jnp.issubdtype(targets_BT.dtype, jnp.integer):
    raise ValueError(f"targets must be integer token ids; got dtype {targets_BT.dtype}.")
  if not temperature > 0:
    raise ValueError(f"temperature={temperature} must be > 0.")
  if chunk_size < 1:
    raise ValueError(f"chunk_size={chunk_size} must be a positive integer.")
  chunk = int(chunk_size)
  vocab_size = unembed_DV.shape[1]
  if mesh is None:
    return _chunked(hidden_BTD, unembed_DV, targets_BT, temperature=temperature, chunk=chunk,
                    vocab_size=vocab_size, vocab_axes=(), vocab_shards=1)

  vocab_axes, batch_axes = _parallel_axes(mesh, rules, batch_size=hidden_BTD.shape[0])
  shards = math.prod(mesh.shape[a] for a in vocab_axes)
  padded_vocab = -(-vocab_size // shards) * shards
  if padded_vocab != vocab_size:
    # Zero columns give logit 0; `_chunk_stats` drops them from the softmax by index.
    unembed_DV = jnp.pad(unembed_DV, ((0, 0), (0, padded_vocab - vocab_size)))
  batch_spec = _spec_entry(batch_axes)
  in_specs = (P(batch_spec, None, None), P(None, _spec_entry(vocab_axes)), P(batch_spec, None))
  args = [_place(x, mesh, spec) for x, spec in zip((hidden_BTD, unembed_DV, targets_BT), in_specs)]
  body = functools.partial(_chunked, temperature=temperature, chunk=chunk,
                           vocab_size=vocab_size, vocab_axes=vocab_axes, vocab_shards=shards)
  sharded = jax.shard_map(body, mesh=mesh, in_specs=in_specs,
                          out_specs=(P(batch_spec, None), P(batch_spec, None)))
  return sharded(*args)


def _place(x: jax.Array, mesh: Mesh, spec: P) -> jax.Array:
  """Lays `x` out as `spec` (shard_map needs its inputs there under an Explicit-axes mesh)."""
  sharding = NamedSharding(mesh, spec)
  if any(t == AxisType.Explicit for t in getattr(mesh, "axis_types", ())):
    return jax.reshard(x, sharding)
  return jax.lax.with_sharding_constraint(x, sharding)


def _spec_entry(axes: tuple[str, ...]) -> str | tuple[str, ...] | None:
  return None if not axes else axes[0] if len(axes) == 1 else axes


def _parallel_axes(mesh: Mesh | None, rules: Any,
                   batch_size: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
  """(vocab mesh axes, batch mesh axes) for the shard_map path; vocab () means no vocab split."""
  rules = ShardingRules.from_config(rules)
  vocab_axes = tuple(a for a in as_tuple(rules.mesh_axes("vocab")) if mesh.shape[a] > 1)
  batch_axes, size = [], 1
  for axis in as_tuple(rules.mesh_axes("batch")):
    # A batch axis that does not divide B (or is taken by vocab) leaves B replicated over it.
    if axis not in vocab_axes and batch_size % (size * mesh.shape[axis]) == 0:
      batch_axes.append(axis)
      size *= mesh.shape[axis]
  return vocab_axes, tuple(batch_axes)


def _chunked(hidden_BTD, unembed_DV, targets_BT, *, temperature, chunk, vocab_size, vocab_axes,
             vocab_shards):
  """Maps `_chunk_stats` over chunks of the flattened B*T positions, rematerialising each chunk
  in the backward pass (so rows x tokens, not just tokens, bound the live logits)."""
  b, t, d = hidden_BTD.shape
  positions = b * t
  n = -(-positions // chunk)
  chunk = -(-positions // n)  # Equal chunks: padding < n positions.
  pad = n * chunk - positions
  hidden_PD = hidden_BTD.reshape(positions, d)
  targets_P = targets_BT.reshape(positions)
  if pad:
    hidden_PD = jnp.pad(hidden_PD, ((0, pad), (0, 0)))
    targets_P = jnp.pad(targets_P, (0, pad))

  # Saves nothing but the chunk's inputs: the [C, V] logits are recomputed in the backward.
  @functools.partial(jax.checkpoint, prevent_cse=False)
  def body(xs):
    h_CD, tgt_C = xs
    return _chunk_stats(h_CD, unembed_DV, tgt_C, temperature=temperature,
                        vocab_size=vocab_size, vocab_axes=vocab_axes, vocab_shards=vocab_shards)

  logp_NC, ent_NC = jax.lax.map(body, (hidden_PD.reshape(n, chunk, d),
                                       targets_P.reshape(n, chunk)))
  unflatten = lambda x_NC: x_NC.reshape(n * chunk)[:positions].reshape(b, t)  # noqa: E731
  return unflatten(logp_NC), unflatten(ent_NC)


def _chunk_stats(h_CD, w_DV, tgt_C, *, temperature, vocab_size, vocab_axes, vocab_shards):
  """log p(target) and entropy for one chunk; `w_DV` is this device's vocab slice."""
  v_local = w_DV.shape[1]
  z_CV = jnp.einsum("cd,dv->cv", h_CD, w_DV,
                    preferred_element_type=jnp.float32).astype(jnp.float32) / temperature
  if vocab_axes:
    offset = jax.lax.axis_index(vocab_axes) * v_local
  else:
    offset = 0
  padded = v_local * vocab_shards != vocab_size
  if padded:
    valid_V = offset + jnp.arange(v_local) < vocab_size
    z_for_max = jnp.where(valid_V, z_CV, -jnp.inf)
  else:
    z_for_max = z_CV
  # The shift cancels in log-sum-exp, so it carries no gradient (and pmax needs none).
  m_C = jax.lax.stop_gradient(z_for_max.max(axis=-1))
  if vocab_axes:
    m_C = jax.lax.pmax(m_C, vocab_axes)
  zs_CV = z_CV - m_C[..., None]
  e_CV = jnp.exp(zs_CV)
  if padded:
    e_CV = jnp.where(valid_V, e_CV, 0.0)
  sum_e_C = e_CV.sum(axis=-1)
  # Entropy = log S - sum(e * zs) / S with zs = z - max <= 0: no cancellation of large terms.
  sum_ezs_C = (e_CV * zs_CV).sum(axis=-1)
  local_C = tgt_C - offset
  in_range_C = (local_C >= 0) & (local_C < v_local)
  zt_C = jnp.take_along_axis(zs_CV, jnp.clip(local_C, 0, v_local - 1)[..., None],
                             axis=-1)[..., 0]
  zt_C = jnp.where(in_range_C, zt_C, 0.0)
  if vocab_axes:
    sum_e_C, sum_ezs_C, zt_C = jax.lax.psum((sum_e_C, sum_ezs_C, zt_C), vocab_axes)
  log_s_C = jnp.log(sum_e_C)
  return zt_C - log_s_C, log_s_C - sum_ezs_C / sum_e_C


# ----------------------------------------------------------------------------------------------
# The policy loss.
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Aggregation:
  """How per-token losses become one mean: `loss_sum(per_token_BT, mask_BT, config)` and a
  `denominator(mask_BT)` that depends on the masks alone, so the global denominator of a batch
  is known before its micro-batches run."""

  loss_sum: Callable[[jax.Array, jax.Array, "LossConfig"], jax.Array]
  denominator: Callable[[jax.Array], jax.Array]


def _token_count(mask_BT):
  return mask_BT.sum()


def _sequence_count(mask_BT):
  return (mask_BT.sum(axis=1) > 0).sum().astype(jnp.float32)


AGGREGATIONS: Registry[Aggregation] = Registry("aggregation",
                                               "rpt_jax.rl.loss.register_aggregation")
register_aggregation = AGGREGATIONS.register


# Mean over every valid token of the (global) batch.
register_aggregation("token-mean")(Aggregation(
    loss_sum=lambda per_token_BT, mask_BT, config: per_token_BT.sum(),
    denominator=_token_count))
# Mean over sequences of each sequence's token mean (original GRPO).
register_aggregation("seq-mean-token-mean")(Aggregation(
    loss_sum=lambda per_token_BT, mask_BT, config: (
        per_token_BT.sum(axis=1) / jnp.maximum(mask_BT.sum(axis=1), 1.0)).sum(),
    denominator=_sequence_count))
# Mean over sequences of token sum / max_response_length (Dr. GRPO: no length bias).
register_aggregation("seq-mean-token-sum-norm")(Aggregation(
    loss_sum=lambda per_token_BT, mask_BT, config: (
        per_token_BT.sum(axis=1) / float(config.max_response_length)).sum(),
    denominator=_sequence_count))


def loss_denominator(mask_BT: jax.Array, config: "LossConfig") -> jax.Array:
  """fp32 []: what `policy_loss`'s sum is divided by for these masks (tokens or sequences)."""
  return AGGREGATIONS[config.aggregation].denominator(
      jnp.asarray(mask_BT).astype(jnp.float32)).astype(jnp.float32)


# name -> fn(logp, ref_logp) -> per-token estimate of KL(pi || ref) for tokens sampled from pi.
KL_ESTIMATORS: dict[str, Callable[[jax.Array, jax.Array], jax.Array]] = {
    "k1": lambda logp, ref: logp - ref,
    "k3": lambda logp, ref: jnp.exp(ref - logp) - (ref - logp) - 1.0,
}


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """Clipped policy-gradient loss settings.

  Attributes:
    eps_low, eps_high: ratio clip range [1 - eps_low, 1 + eps_high]; eps_high > eps_low is
      DAPO's clip-higher.
    aggregation: a name in `AGGREGATIONS`: 'token-mean', 'seq-mean-token-mean' or
      'seq-mean-token-sum-norm' (needs `max_response_length`).
    beta: weight of the KL(pi || ref) penalty (needs ref log-probs when > 0); the paper uses 0.
    kl_estimator: 'k1' (logp - ref) or 'k3' (exp(ref - logp) - (ref - logp) - 1).
    entropy_coef: weight of the entropy bonus (subtracted; needs entropies when != 0).
    max_response_length: the constant that divides per-sequence token sums in
      'seq-mean-token-sum-norm'.
    ntp_coef: weight of RMT's next-token loss on the context tokens (mean NLL over the
      batch's context tokens; `rpt_jax.rl.context_ntp`); 0 = off.
  """

  eps_low: float = 0.2
  eps_high: float = 0.2
  aggregation: str = "token-mean"
  beta: float = 0.0
  kl_estimator: str = "k3"
  entropy_coef: float = 0.0
  max_response_length: int | None = None
  ntp_coef: float = 0.0

  def __post_init__(self):
    if not 0.0 <= self.eps_low < 1.0:
      raise ValueError(f"LossConfig.eps_low={self.eps_low} must be in [0, 1) so the lower clip "
                       "bound 1 - eps_low stays positive.")
    if not self.eps_high >= 0.0:
      raise ValueError(f"LossConfig.eps_high={self.eps_high} must be >= 0.")
    if self.aggregation not in AGGREGATIONS:
      raise ValueError(f"LossConfig.aggregation={self.aggregation!r} is unknown; choose one of "
                       f"{sorted(AGGREGATIONS)}.")
    if not self.beta >= 0.0:
      raise ValueError(f"LossConfig.beta={self.beta} must be >= 0 (0 disables the KL penalty).")
    if self.kl_estimator not in KL_ESTIMATORS:
      raise ValueError(f"LossConfig.kl_estimator={self.kl_estimator!r} is unknown; choose one "
                       f"of {sorted(KL_ESTIMATORS)}.")
    if not (math.isfinite(self.ntp_coef) and self.ntp_coef >= 0.0):
      raise ValueError(f"ntp_coef={self.ntp_coef} must be >= 0 (0 disables the next-token "
                       "loss).")
    if not math.isfinite(self.entropy_coef):
      raise ValueError(f"LossConfig.entropy_coef={self.entropy_coef} must be finite.")
    if self.aggregation == "seq-mean-token-sum-norm" and (
        self.max_response_length is None or self.max_response_length <= 0):
      raise ValueError(
          f"LossConfig.aggregation='seq-mean-token-sum-norm' needs max_response_length > 0 (got "
          f"{self.max_response_length}); set it to the sampler's maximum response length.")


def policy_loss(logp_BT: jax.Array, old_logp_BT: jax.Array, advantages_B: jax.Array,
                mask_BT: jax.Array, *, config: LossConfig, ref_logp_BT: jax.Array | None = None,
                entropy_BT: jax.Array | None = None
                ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
  """Clipped surrogate + beta * KL - entropy_coef * entropy, as (loss_sum, denominator, metrics).

  Per valid token: -min(r * A, clip(r, 1 - eps_low, 1 + eps_high) * A) with
  r = exp(logp - old_logp), then aggregated by `config.aggregation`:
    token-mean:              (sum over valid tokens, number of valid tokens)
    seq-mean-token-mean:     (sum over sequences of their token mean, sequences with >= 1 token)
    seq-mean-token-sum-norm: (sum over sequences of token sum / max_response_length, sequences
                              with >= 1 token)
  Rows without valid tokens (batch padding) add nothing to either part.

  Args:
    logp_BT: current policy log-probs (differentiable).
    old_logp_BT: log-probs of the sampling policy (no gradient). Exactly on-policy, pass the
      stopped current log-probs: the ratio is 1 but its gradient is the policy gradient.
    advantages_B: one advantage per sequence [B] (or per token [B, T]); no gradient.
    mask_BT: 1/True on response tokens that count (bool or numeric).
    config: a `LossConfig`.
    ref_logp_BT: reference-policy log-probs, required when config.beta > 0.
    entropy_BT: per-token entropies, required when config.entropy_coef != 0.

  Returns:
    loss_sum, denominator: fp32 scalars. Accumulate both over micro-batches (and devices) and
      divide once with `mean_loss`, which guards against a zero denominator (empty batch).
    metrics: fp32 scalar SUMS and COUNTS, so they accumulate the same way (see
      `finalize_metrics`): num_tokens, num_sequences, pg_loss_sum, ratio_sum, approx_kl_sum
      (KL(old || new), k3 estimator on samples from old), clip_high_count, clip_low_count,
      and entropy_sum / ref_kl_sum when those inputs are given.
  """
  if logp_BT.shape != old_logp_BT.shape or logp_BT.shape != mask_BT.shape:
    raise ValueError(f"logp {logp_BT.shape}, old_logp {old_logp_BT.shape} and mask "
                     f"{mask_BT.shape} must all be [B, T].")
  if advantages_B.shape not in ((logp_BT.shape[0],), logp_BT.shape):
    raise ValueError(f"advantages shape {advantages_B.shape} must be [B]={logp_BT.shape[:1]} or "
                     f"[B, T]={logp_BT.shape}.")
  if config.beta > 0 and ref_logp_BT is None:
    raise ValueError(f"LossConfig.beta={config.beta} needs ref_logp_BT (reference log-probs); "
                     "pass them or set beta=0.")
  if config.entropy_coef != 0 and entropy_BT is None:
    raise ValueError(f"LossConfig.entropy_coef={config.entropy_coef} needs entropy_BT; pass "
                     "the entropies from token_logprobs_and_entropy or set entropy_coef=0.")
  f32 = jnp.float32
  mask_BT = mask_BT.astype(bool) if mask_BT.dtype != bool else mask_BT
  maskf_BT = mask_BT.astype(f32)
  # Zeroing masked positions BEFORE exp keeps their (unused) gradients finite.
  logp_BT = jnp.where(mask_BT, logp_BT.astype(f32), 0.0)
  old_BT = jnp.where(mask_BT, jax.lax.stop_gradient(old_logp_BT).astype(f32), 0.0)
  adv = jax.lax.stop_gradient(jnp.asarray(advantages_B, f32))
  adv_BT = jnp.broadcast_to(adv[:, None] if adv.ndim == 1 else adv, logp_BT.shape)

  log_ratio_BT = logp_BT - old_BT
  ratio_BT = jnp.exp(log_ratio_BT)
  clipped_BT = jnp.clip(ratio_BT, 1.0 - config.eps_low, 1.0 + config.eps_high)
  pg_BT = -jnp.minimum(ratio_BT * adv_BT, clipped_BT * adv_BT)
  per_token_BT = pg_BT
  ref_kl_BT = None
  if ref_logp_BT is not None:
    ref_BT = jnp.where(mask_BT, jax.lax.stop_gradient(ref_logp_BT).astype(f32), 0.0)
    ref_kl_BT = KL_ESTIMATORS[config.kl_estimator](logp_BT, ref_BT)
    if config.beta > 0:
      per_token_BT = per_token_BT + config.beta * ref_kl_BT
  if entropy_BT is not None and config.entropy_coef != 0:
    per_token_BT = per_token_BT - config.entropy_coef * entropy_BT.astype(f32)
  per_token_BT = jnp.where(mask_BT, per_token_BT, 0.0)
  loss_sum = AGGREGATIONS[config.aggregation].loss_sum(per_token_BT, maskf_BT, config)
  denominator = loss_denominator(maskf_BT, config)

  def tsum(x_BT):  # Sum over valid tokens, no gradient.
    return jax.lax.stop_gradient(jnp.where(mask_BT, x_BT, 0.0).sum())

  metrics = {
      "num_tokens": maskf_BT.sum(),
      "num_sequences": (maskf_BT.sum(axis=1) > 0).sum().astype(f32),
      "pg_loss_sum": tsum(pg_BT),
      "ratio_sum": tsum(ratio_BT),
      # KL(old || new) ~ E_old[(r - 1) - log r]: the k3 estimator on the rollouts.
      "approx_kl_sum": tsum(ratio_BT - 1.0 - log_ratio_BT),
      "clip_high_count": tsum(((adv_BT > 0) & (ratio_BT > 1.0 + config.eps_high)).astype(f32)),
      "clip_low_count": tsum(((adv_BT < 0) & (ratio_BT < 1.0 - config.eps_low)).astype(f32)),
  }
  if entropy_BT is not None:
    metrics["entropy_sum"] = tsum(entropy_BT.astype(f32))
  if ref_kl_BT is not None:
    metrics["ref_kl_sum"] = tsum(ref_kl_BT)
  return loss_sum.astype(f32), denominator.astype(f32), metrics


def mean_loss(loss_sum: jax.Array, denominator: jax.Array) -> jax.Array:
  """loss_sum / denominator, with an empty batch (denominator 0, sum 0) giving 0, not NaN.

  Denominators are counts, so max(denominator, 1) changes nothing for a non-empty batch.
  """
  return loss_sum / jnp.maximum(denominator, 1.0)


def finalize_metrics(metrics: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
  """Means from (accumulated) `policy_loss` metric sums: per-token averages over the batch."""
  n = jnp.maximum(metrics["num_tokens"], 1.0)
  out = {
      "num_tokens": metrics["num_tokens"],
      "num_sequences": metrics["num_sequences"],
      "pg_loss": metrics["pg_loss_sum"] / n,
      "ratio_mean": metrics["ratio_sum"] / n,
      "approx_kl": metrics["approx_kl_sum"] / n,
      "clip_fraction": (metrics["clip_high_count"] + metrics["clip_low_count"]) / n,
      "clip_high_fraction": metrics["clip_high_count"] / n,
      "clip_low_fraction": metrics["clip_low_count"] / n,
  }
  if "entropy_sum" in metrics:
    out["entropy"] = metrics["entropy_sum"] / n
  if "ref_kl_sum" in metrics:
    out["ref_kl"] = metrics["ref_kl_sum"] / n
  if "ntp_loss_sum" in metrics:
    out["ntp_loss"] = metrics["ntp_loss_sum"] / jnp.maximum(metrics["ntp_tokens"], 1.0)
    out["ntp_tokens"] = metrics["ntp_tokens"]
  return out
