# Over ~400 lines: the step's numerics and its batch checks/shardings change together.
"""The jitted, sharded RPT parameter update: rollouts in, one optimiser step out.

Owns `RolloutBatch`, `completion_logprobs` (per-token log-probs
and entropies of sampled completions under the current policy) and `make_train_step`.

One step (exactly on-policy GRPO as in the paper: PPO mini-batch == rollout batch):
  1. the global loss denominator (token count, or sequence count for the seq-mean aggregations) is
     computed from the masks of the WHOLE batch first;
  2. a `jax.lax.scan` over micro-batches of `micro_batch_contexts` contexts (with their G rows)
     accumulates the gradients of loss_sum / global_denominator, so the sum equals the full-batch
     gradient exactly (up to float summation order);
  3. a non-finite loss or gradient norm skips the update (see `make_train_step`), otherwise the
     optimiser (`rpt_jax.rl.optim.make_optimizer`) applies it.

Log-probs of completion token i come from the hidden state that predicts it: the last prompt
token (position len-1) for i = 0, completion token i-1 otherwise; logits are divided by the
sampling temperature. Two ways of computing those hidden states, equal up to fp32 rounding:
  * plain: each of the B*G rows is [prompt right-padded to Lp | completion] with positions
    0..len-1, len..len+N-1 and a key mask that hides the prompt padding (no KV cache);
  * shared prefix (default): each context is prefilled ONCE with a KV cache (slot == position),
    the cache is repeated G times along batch and the completions attend to it; gradients of all
    G completions flow back into the one copy of the context. Prefill work drops from B*G*Lp to
    B*Lp tokens.
Row layout everywhere: the G rollouts of context b are rows b*G .. b*G+G-1.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from rpt_jax import mesh as mesh_lib
from rpt_jax.model.transformer import KVCache, Transformer
from rpt_jax.rl import loss as loss_lib
from rpt_jax.rl.optim import current_learning_rate
from rpt_jax.rl import context_ntp
from rpt_jax.rl.teacher import ema_update
from rpt_jax.rl.train_state import TrainState, shardings_like

Array = jax.Array


@flax.struct.dataclass
class RolloutBatch:
  """One rollout batch in global shapes (numpy or jax arrays); B contexts, G rows each.

  prompt_tokens:     int [B, Lp]   contexts (prompts), right-padded.
  prompt_lengths:    int [B]       real prompt tokens, 1 <= len <= Lp.
  completion_tokens: int [B*G, N]  sampled responses (anything after EOS is padding).
  completion_mask:   [B*G, N]      1 on generated tokens incl. EOS, 0 on padding.
  advantages:        float [B*G]   one advantage per rollout (`rpt_jax.rl.advantages`).
  old_logprobs:      float [B*G, N] | None  sampling-policy log-probs; None = exactly on-policy
                     (old = stop_gradient(new): ratio 1, the paper's setting). A NaN entry marks
                     an on-policy token the same way, so one batch can mix on-policy rows (NaN)
                     with rows sampled under older weights (over-sampling's partial rollouts
                     carry the engine's per-token log-probs of the weights that sampled them).
  ref_logprobs:      float [B*G, N] | None  reference-policy log-probs (for LossConfig.beta > 0).
  context_mask:      int [B, Lp] | None  1 on the prompt's context tokens (for
                     LossConfig.ntp_coef > 0; `rpt_jax.rl.context_ntp.context_mask`).
  """

  prompt_tokens: Any
  prompt_lengths: Any
  completion_tokens: Any
  completion_mask: Any
  advantages: Any
  old_logprobs: Any = None
  ref_logprobs: Any = None
  context_mask: Any = None


# Logical axes of each field (leading axis 'batch': contexts or rows).
_BATCH_AXES = dict(prompt_tokens=("batch", "length"), prompt_lengths=("batch",),
                   completion_tokens=("batch", "length"), completion_mask=("batch", "length"),
                   advantages=("batch",), old_logprobs=("batch", "length"),
                   ref_logprobs=("batch", "length"), context_mask=("batch", "length"))
# Fields with one row per CONTEXT (the others have one per rollout).
CONTEXT_FIELDS = ("prompt_tokens", "prompt_lengths", "context_mask")


# ----------------------------------------------------------------------------------------------
# Completion log-probs.
# ----------------------------------------------------------------------------------------------


def _constrain(x: Array, axes: tuple, mesh: Mesh | None, rules) -> Array:
  if mesh is None:
    return x
  rules = mesh_lib.ShardingRules.from_config(rules)
  return jax.lax.with_sharding_constraint(x, rules.sharding(mesh, axes, x.shape))


def completion_hidden_states(model: Transformer, prompt_tokens: Array, prompt_lengths: Array,
                             completion_tokens: Array, *, num_generations: int,
                             shared_prefix: bool = True, with_prompt: bool = False):
  """hidden_RND: the final hidden state that PREDICTS each completion token (R = B*G rows).

  Row r belongs to context r // G. Token 0 is predicted by the last prompt token (position
  len-1), token i > 0 by completion token i-1 (position len+i-1). The last completion token is
  never fed (nothing after it is scored). with_prompt: returns (hidden_RND, hidden_BLD), the
  latter the prompts' own hidden states (position i predicts prompt token i+1).
  """
  b, lp = prompt_tokens.shape
  r, n = completion_tokens.shape
  g = num_generations
  lengths_B = prompt_lengths.astype(jnp.int32)
  lengths_R = jnp.repeat(lengths_B, g)
  steps_N1 = jnp.arange(n - 1, dtype=jnp.int32)
  prompt_mask_BL = jnp.arange(lp)[None, :] < lengths_B[:, None]
  if shared_prefix:
    cache = KVCache.init(model.config, b, lp + max(n - 1, 0))
    hidden_BLD, cache = model.hidden_states(prompt_tokens, None, prompt_mask_BL, cache=cache)
    last_B1D = jnp.take_along_axis(hidden_BLD, (lengths_B - 1)[:, None, None], axis=1)
    last_R1D = jnp.repeat(last_B1D, g, axis=0)
    if n == 1:
      return (last_R1D, hidden_BLD) if with_prompt else last_R1D
    positions_RN1 = lengths_R[:, None] + steps_N1[None, :]
    hidden_RN1D, _ = model.hidden_states(completion_tokens[:, :-1], positions_RN1, None,
                                         cache=cache.repeat(g))
    hidden_RND = jnp.concatenate([last_R1D, hidden_RN1D], axis=1)
    return (hidden_RND, hidden_BLD) if with_prompt else hidden_RND
  # Plain: every row carries its own copy of the (padded) prompt.
  tokens_RT = jnp.concatenate([jnp.repeat(prompt_tokens, g, axis=0), completion_tokens[:, :-1]],
                              axis=1)
  positions_RT = jnp.concatenate(
      [jnp.broadcast_to(jnp.arange(lp, dtype=jnp.int32), (r, lp)),
       lengths_R[:, None] + steps_N1[None, :]], axis=1)
  mask_RT = jnp.concatenate([jnp.repeat(prompt_mask_BL, g, axis=0),
                             jnp.ones((r, n - 1), bool)], axis=1)
  hidden_RTD, _ = model.hidden_states(tokens_RT, positions_RT, mask_RT)
  index_RN = jnp.concatenate([lengths_R[:, None] - 1,
                              jnp.broadcast_to(lp + steps_N1, (r, n - 1))], axis=1)
  hidden_RND = jnp.take_along_axis(hidden_RTD, index_RN[..., None], axis=1)
  return (hidden_RND, hidden_RTD[::g, :lp]) if with_prompt else hidden_RND


def completion_logprobs(model: Transformer, prompt_tokens: Array, prompt_lengths: Array,
                        completion_tokens: Array, *, num_generations: int, temperature: float,
                        shared_prefix: bool = True, mesh: Mesh | None = None, rules: Any = None,
                        chunk_size: int = 256, with_prompt: bool = False):
  """(logp_RN, entropy_RN), fp32: log pi(completion token) and the entropy of the next-token
  distribution at that position, under softmax(logits / temperature) (the sampler's
  distribution). Differentiable; vocab-parallel over the mesh when vocab is sharded.
  with_prompt: also the prompts' hidden states [B, Lp, D] (for the context NTP loss).

  Also the way to compute `old_logprobs`/`ref_logprobs` for a RolloutBatch with another model.
  """
  hidden = completion_hidden_states(model, prompt_tokens, prompt_lengths, completion_tokens,
                                    num_generations=num_generations,
                                    shared_prefix=shared_prefix, with_prompt=with_prompt)
  hidden_RND, prompt_BLD = hidden if with_prompt else (hidden, None)
  hidden_RND = _constrain(hidden_RND, ("batch", "length", None), mesh, rules)
  unembed_DV = model.unembedding().astype(hidden_RND.dtype)
  logp_RN, entropy_RN = loss_lib.token_logprobs_and_entropy(
      hidden_RND, unembed_DV, completion_tokens.astype(jnp.int32), temperature=temperature,
      chunk_size=chunk_size, mesh=mesh, rules=rules)
  return (logp_RN, entropy_RN, prompt_BLD) if with_prompt else (logp_RN, entropy_RN)


# ----------------------------------------------------------------------------------------------
# The train step.
# ----------------------------------------------------------------------------------------------


def _micro_batches(batch: RolloutBatch, num_micro: int, g: int) -> RolloutBatch:
  """Leaves [B, ...] -> [M, C, ...] and [B*G, ...] -> [M, C*G, ...].

  Micro-batch m holds contexts m, m+M, m+2M, ... (strided): a batch laid out in contiguous blocks
  over the devices then gives every micro-batch an equal share of every device, with no data
  movement (the reshape [B] -> [C, M] keeps the block sharding on C).
  """
  c = batch.prompt_tokens.shape[0] // num_micro

  def contexts(x):
    return None if x is None else jnp.asarray(x).reshape(c, num_micro, *x.shape[1:]).swapaxes(0, 1)

  def rows(x):
    if x is None:
      return None
    x = jnp.asarray(x).reshape(c, num_micro, g, *x.shape[1:]).swapaxes(0, 1)
    return x.reshape(num_micro, c * g, *x.shape[3:])

  return RolloutBatch(**{
      name: (contexts if name in CONTEXT_FIELDS else rows)(getattr(batch, name))
      for name in _BATCH_AXES})


@dataclasses.dataclass(frozen=True)
class _StepConfig:
  loss_config: loss_lib.LossConfig
  num_generations: int
  temperature: float
  micro_batch_contexts: int
  shared_prefix: bool
  logprob_chunk_size: int
  ema_decay: float | None


class TrainStep:
  """`train_step(state, batch) -> (state, metrics)`; see `make_train_step`."""

  def __init__(self, graphdef: nnx.GraphDef, loss_config: loss_lib.LossConfig,
               optimizer: optax.GradientTransformation, *, num_generations: int,
               temperature: float, micro_batch_contexts: int, shared_prefix: bool = True,
               mesh: Mesh | None = None, rules: Any = None, logprob_chunk_size: int = 256,
               ema_decay: float | None = None):
    if not isinstance(loss_config, loss_lib.LossConfig):
      raise ValueError(f"loss_config must be a rpt_jax.rl.loss.LossConfig, got "
                       f"{type(loss_config).__name__}.")
    for name, value in (("num_generations", num_generations),
                        ("micro_batch_contexts", micro_batch_contexts),
                        ("logprob_chunk_size", logprob_chunk_size)):
      if int(value) != value or value < 1:
        raise ValueError(f"{name}={value} must be a positive integer.")
    if not temperature > 0:
      raise ValueError(f"temperature={temperature} must be > 0 (use the sampler's temperature).")
    self.graphdef, self.optimizer, self.mesh = graphdef, optimizer, mesh
    self.rules = mesh_lib.ShardingRules.from_config(rules)
    self.config = _StepConfig(loss_config, int(num_generations), float(temperature),
                              int(micro_batch_contexts), bool(shared_prefix),
                              int(logprob_chunk_size),
                              None if ema_decay is None else float(ema_decay))
    self._jitted: dict[Any, Callable] = {}

  # ---- numerics (traceable) ------------------------------------------------------------------

  def _micro_loss(self, params, mb: RolloutBatch, denominators):
    cfg = self.config
    denominator, ntp_denominator = denominators
    model = nnx.merge(self.graphdef, params)
    ntp = cfg.loss_config.ntp_coef > 0
    logp_RN, entropy_RN, *prompt_hidden = completion_logprobs(
        model, mb.prompt_tokens, mb.prompt_lengths, mb.completion_tokens,
        num_generations=cfg.num_generations, temperature=cfg.temperature,
        shared_prefix=cfg.shared_prefix, mesh=self.mesh, rules=self.rules,
        chunk_size=cfg.logprob_chunk_size, with_prompt=ntp)
    on_policy_RN = jax.lax.stop_gradient(logp_RN)
    old_RN = (on_policy_RN if mb.old_logprobs is None
              else jnp.where(jnp.isnan(mb.old_logprobs), on_policy_RN, mb.old_logprobs))
    loss_sum, _, metrics = loss_lib.policy_loss(
        logp_RN, old_RN, mb.advantages, mb.completion_mask, config=cfg.loss_config,
        ref_logp_BT=mb.ref_logprobs, entropy_BT=entropy_RN)
    loss = loss_sum / jnp.maximum(denominator, 1.0)
    if ntp:
      ntp_sum, ntp_tokens = context_ntp.ntp_sums(
          model, prompt_hidden[0], mb.prompt_tokens, mb.context_mask, mesh=self.mesh,
          rules=self.rules, chunk_size=cfg.logprob_chunk_size)
      # Mean over the WHOLE batch's context tokens, so accumulation stays exact.
      loss = loss + cfg.loss_config.ntp_coef * ntp_sum / jnp.maximum(ntp_denominator, 1.0)
      metrics = dict(metrics, ntp_loss_sum=jax.lax.stop_gradient(ntp_sum),
                     ntp_tokens=ntp_tokens)
    return loss, (loss_sum, metrics)

  def loss_and_grads(self, params: nnx.State, batch: RolloutBatch
                     ) -> tuple[Array, nnx.State, dict[str, Array]]:
    """(loss, grads, metric sums) of the whole batch, accumulated over micro-batches.

    Traceable (call under jit); `loss` is the full-batch mean loss, `grads` its gradient.
    """
    cfg = self.config
    # The global denominator depends only on the masks (tokens or sequences of the whole batch).
    denominator = loss_lib.loss_denominator(batch.completion_mask, cfg.loss_config)
    ntp_denominator = (jnp.asarray(batch.context_mask)[:, 1:].astype(jnp.float32).sum()
                       if cfg.loss_config.ntp_coef > 0 else jnp.zeros((), jnp.float32))
    denominators = (denominator, ntp_denominator)
    num_micro = batch.prompt_tokens.shape[0] // cfg.micro_batch_contexts
    micro = _micro_batches(batch, num_micro, cfg.num_generations)
    micro = jax.tree.map(
        lambda x: _constrain(x, (None, "batch") + (None,) * (x.ndim - 2), self.mesh, self.rules),
        micro)
    grad_fn = jax.value_and_grad(self._micro_loss, has_aux=True)
    param_sh = (None if self.mesh is None
                else mesh_lib.state_shardings(params, self.mesh, self.rules))

    def body(carry, mb):
      (_, (loss_sum, metrics)), grads = grad_fn(params, mb, denominators)
      acc_grads, acc_loss, acc_metrics = carry
      grads = jax.tree.map(jnp.add, acc_grads, grads)
      if param_sh is not None:  # Keep the accumulator sharded like the params (reduce-scatter).
        grads = jax.lax.with_sharding_constraint(grads, param_sh)
      metrics = jax.tree.map(jnp.add, acc_metrics, metrics)
      return (grads, acc_loss + loss_sum, metrics), None

    first = jax.tree.map(lambda x: x[0], micro)
    (_, (_, metric_shapes)), grad_shapes = jax.eval_shape(grad_fn, params, first, denominators)
    init = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                        (grad_shapes, jnp.zeros((), jnp.float32), metric_shapes))
    if param_sh is not None:
      init = (jax.lax.with_sharding_constraint(init[0], param_sh),) + init[1:]
    if num_micro == 1:
      (grads, loss_sum, metrics), _ = body(init, first)
    else:
      (grads, loss_sum, metrics), _ = jax.lax.scan(body, init, micro)
    loss = loss_lib.mean_loss(loss_sum, denominator)
    if "ntp_loss_sum" in metrics:
      loss = loss + cfg.loss_config.ntp_coef * loss_lib.mean_loss(metrics["ntp_loss_sum"],
                                                                   ntp_denominator)
    return loss, grads, metrics

  def _step(self, state: TrainState, batch: RolloutBatch) -> tuple[TrainState, dict[str, Array]]:
    loss, grads, metric_sums = self.loss_and_grads(state.params, batch)
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, new_opt_state = self.optimizer.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)

    def keep_if_finite(new, old):
      return jnp.where(finite, new, old)

    params = jax.tree.map(keep_if_finite, new_params, state.params)
    opt_state = jax.tree.map(keep_if_finite, new_opt_state, state.opt_state)
    has_tokens_R = jnp.asarray(batch.completion_mask).astype(bool).any(axis=1)
    advantages_R = jnp.asarray(batch.advantages, jnp.float32)
    metrics = dict(loss_lib.finalize_metrics(metric_sums))
    metrics.update(
        loss=loss, grad_norm=grad_norm, skipped=(~finite).astype(jnp.float32),
        learning_rate=current_learning_rate(new_opt_state),
        mean_advantage=(jnp.where(has_tokens_R, advantages_R, 0.0).sum()
                        / jnp.maximum(has_tokens_R.sum(), 1)))
    teacher = state.teacher
    if teacher is not None:  # RLP's EMA teacher follows every applied update.
      teacher = ema_update(teacher, params, self.config.ema_decay)
    new_state = TrainState(params=params, opt_state=opt_state, step=state.step + 1,
                           teacher=teacher, reference=state.reference)
    return new_state, jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), metrics)

  # ---- host side -----------------------------------------------------------------------------

  def check_batch(self, batch: RolloutBatch) -> None:
    """Raises ValueError naming the first shape/value problem of `batch` (before compiling)."""
    cfg = self.config
    g = cfg.num_generations
    shape = lambda x: tuple(np.shape(x))  # noqa: E731
    if len(shape(batch.prompt_tokens)) != 2:
      raise ValueError(f"prompt_tokens must be [B, Lp]; got shape {shape(batch.prompt_tokens)}.")
    b, lp = shape(batch.prompt_tokens)
    if len(shape(batch.completion_tokens)) != 2:
      raise ValueError(f"completion_tokens must be [B*G, N]; got shape "
                       f"{shape(batch.completion_tokens)}.")
    rows, n = shape(batch.completion_tokens)
    expected = {"prompt_lengths": (b,), "context_mask": (b, lp),
                "completion_tokens": (b * g, n),
                "completion_mask": (b * g, n), "advantages": (b * g,),
                "old_logprobs": (b * g, n), "ref_logprobs": (b * g, n)}
    for name, want in expected.items():
      value = getattr(batch, name)
      if value is not None and shape(value) != want:
        raise ValueError(
            f"RolloutBatch.{name} has shape {shape(value)}, expected {want} for B={b} contexts "
            f"x G={g} generations (completion_tokens {(rows, n)}); rows of one context must be "
            "adjacent.")
    if b % cfg.micro_batch_contexts:
      raise ValueError(f"batch of B={b} contexts does not split into micro-batches of "
                       f"micro_batch_contexts={cfg.micro_batch_contexts}; choose a divisor of B.")
    if cfg.loss_config.beta > 0 and batch.ref_logprobs is None:
      raise ValueError(f"LossConfig.beta={cfg.loss_config.beta} needs RolloutBatch.ref_logprobs; "
                       "compute them with completion_logprobs on the reference model or set "
                       "beta=0.")
    if cfg.loss_config.ntp_coef > 0 and batch.context_mask is None:
      raise ValueError(f"LossConfig.ntp_coef={cfg.loss_config.ntp_coef} needs "
                       "RolloutBatch.context_mask (rpt_jax.rl.context_ntp.context_mask) or "
                       "ntp_coef=0.")
    if isinstance(batch.prompt_lengths, np.ndarray):
      lengths = batch.prompt_lengths
      if lengths.min(initial=1) < 1 or lengths.max(initial=1) > lp:
        raise ValueError(f"prompt_lengths must lie in [1, Lp={lp}]; got min {lengths.min()}, "
                         f"max {lengths.max()}.")

  def batch_shardings(self, batch: RolloutBatch) -> RolloutBatch:
    """NamedShardings of each batch field: leading axis over the 'batch' rule (('data', 'fsdp'),
    axes that do not divide it dropped). For multi-process runs, build global arrays with
    `jax.make_array_from_process_local_data(sharding, local_rows)` per field."""
    if self.mesh is None:
      raise ValueError("batch_shardings needs a train step built with a mesh.")
    return RolloutBatch(**{
        name: None if getattr(batch, name) is None else
        self.rules.sharding(self.mesh, axes, np.shape(getattr(batch, name)))
        for name, axes in _BATCH_AXES.items()})

  def _compiled_for(self, state: TrainState, batch: RolloutBatch) -> Callable:
    if state.teacher is not None and self.config.ema_decay is None:
      raise ValueError("the train state holds an EMA teacher but the train step has no "
                       "ema_decay; pass make_train_step(..., ema_decay=...).")
    key = (jax.tree.structure(state),jax.tree.structure(batch),
           tuple((np.shape(x), np.result_type(x)) for x in jax.tree.leaves(batch)))
    fn = self._jitted.get(key)
    if fn is None:
      if self.mesh is None:
        fn = jax.jit(self._step, donate_argnums=0)
      else:
        state_sh = shardings_like(state, self.optimizer, self.mesh, self.rules)
        fn = jax.jit(self._step, in_shardings=(state_sh, self.batch_shardings(batch)),
                     out_shardings=(state_sh, NamedSharding(self.mesh, P())),
                     donate_argnums=0)
      self._jitted[key] = fn
    return fn

  def lower(self, state: TrainState, batch: RolloutBatch) -> jax.stages.Lowered:
    """The lowered step (for `.compile().memory_analysis()` / cost analysis)."""
    self.check_batch(batch)
    return self._compiled_for(state, batch).lower(state, batch)

  def __call__(self, state: TrainState, batch: RolloutBatch
               ) -> tuple[TrainState, dict[str, Array]]:
    """One update. `state` is DONATED (do not use it afterwards); returns (new_state, metrics)."""
    self.check_batch(batch)
    return self._compiled_for(state, batch)(state, batch)


def make_train_step(graphdef: nnx.GraphDef, loss_config: loss_lib.LossConfig,
                    optimizer: optax.GradientTransformation, *, num_generations: int,
                    temperature: float, micro_batch_contexts: int, shared_prefix: bool = True,
                    mesh: Mesh | None = None, rules: Any = None,
                    logprob_chunk_size: int = 256, ema_decay: float | None = None) -> TrainStep:
  """The jitted RPT update `train_step(state, batch) -> (state, metrics)`.

  Args:
    graphdef: `split_params(model)[0]` (the model's structure; its mesh/rules, if any, add
      activation sharding constraints).
    loss_config: the clipped-objective settings (`rpt_jax.rl.loss.LossConfig`).
    optimizer: e.g. `rpt_jax.rl.optim.make_optimizer(...)`; must match the state's opt_state.
    num_generations: G, rollouts per context (rows b*G .. b*G+G-1 belong to context b).
    temperature: the SAMPLING temperature; log-probs are those of softmax(logits / T).
    micro_batch_contexts: contexts per gradient-accumulation micro-step (must divide B); the
      G rows of each context go with it. Accumulation is exact (global denominator first).
    shared_prefix: prefill each context once and score its G completions through a repeated KV
      cache (default), instead of G separate [prompt | completion] rows.
    mesh, rules: with a mesh, the state keeps its shardings (params by logical axes, optimiser
      state like the params), batch leaves are split over the 'batch' rule (('data','fsdp')), and
      log-probs are vocab-parallel where 'vocab' maps to a mesh axis (default 'tensor').
    logprob_chunk_size: positions per chunk of the log-prob/entropy computation.
    ema_decay: the decay of the state's EMA teacher (`state.teacher`, RLP), updated after every
      step from the new params; needed when the state holds a teacher.

  The returned callable donates `state`. A step whose loss or gradient norm is not finite is
  SKIPPED: params and opt_state come back unchanged, `step` still advances (it counts attempts),
  metrics['skipped'] = 1. Metrics (fp32 scalars): loss, grad_norm (before clipping),
  learning_rate (of this update), skipped, mean_advantage (over rows with >= 1 valid token),
  pg_loss, ratio_mean, approx_kl, clip_fraction (+ _high/_low), entropy, num_tokens,
  num_sequences, ref_kl when ref log-probs are given, ntp_loss / ntp_tokens when
  LossConfig.ntp_coef > 0 (`loss` then includes ntp_coef * ntp_loss). A new batch shape or a new set of
  optional fields compiles a new program (kept in a small cache).
  """
  return TrainStep(graphdef, loss_config, optimizer, num_generations=num_generations,
                   temperature=temperature, micro_batch_contexts=micro_batch_contexts,
                   shared_prefix=shared_prefix, mesh=mesh, rules=rules,
                   logprob_chunk_size=logprob_chunk_size, ema_decay=ema_decay)
