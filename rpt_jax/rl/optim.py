"""The RPT optimiser: AdamW with a warmup + decay schedule, global-norm clipping and a
weight-decay mask read from parameter paths.

Owns `make_optimizer` (validated, paper defaults: lr 1e-6, betas (0.9, 0.999), weight decay 0.01,
PAPER.md Table 5), the schedules, and `weight_decay_mask`.

* Weight decay is decoupled (AdamW, PyTorch convention: p <- p - lr * wd * p) and is NOT applied to
  normalisation scales or biases: a parameter is excluded when any component of its path contains
  'norm' (input_norm, post_attn_norm, final_norm, q_norm, k_norm) or its own name ends in 'bias'
  (q_bias, k_bias, v_bias, o_bias). Matrices and the embedding/LM head are decayed. Rank is not
  used as the test because Qwen2's q/k/v biases are 2-D ([heads, head_dim]).
* The learning rate is injected as a hyper-parameter (`optax.inject_hyperparams`), so the value
  used by the latest update is readable from the optimiser state with `current_learning_rate`.
* Gradients are clipped to `grad_clip_norm` (global L2 norm) before Adam; None or 0 disables it.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

SCHEDULES = ("constant", "cosine", "linear")


def make_schedule(learning_rate: float, *, warmup_steps: int = 0, schedule: str = "constant",
                  total_steps: int | None = None) -> Callable[[jax.Array], jax.Array]:
  """lr(count) for count = number of updates already applied (0 for the first update).

  Warmup: lr * (count + 1) / warmup_steps for count < warmup_steps (the first update already
  moves; update warmup_steps - 1 uses the full rate). Then, with p = (count - warmup_steps) /
  (total_steps - warmup_steps) clipped to [0, 1]:
    constant: lr;   cosine: lr * (1 + cos(pi p)) / 2;   linear: lr * (1 - p)
  so the decaying schedules reach 0 at count == total_steps.
  """
  _check_schedule(learning_rate, warmup_steps, schedule, total_steps)
  lr, warmup = float(learning_rate), int(warmup_steps)

  def fn(count):
    count = jnp.asarray(count, jnp.float32)
    scale = jnp.minimum(1.0, (count + 1.0) / warmup) if warmup > 0 else jnp.float32(1.0)
    if schedule != "constant":
      progress = jnp.clip((count - warmup) / float(total_steps - warmup), 0.0, 1.0)
      if schedule == "cosine":
        scale = scale * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
      else:
        scale = scale * (1.0 - progress)
    return lr * scale

  return fn


def weight_decay_mask(params: Any) -> Any:
  """A pytree like `params` of bools: True where weight decay applies (see module docstring)."""

  def decays(path, _):
    names = [_key_name(k) for k in path]
    names = [n for n in names if n is not None and n != "value"]
    if any("norm" in n for n in names):
      return False
    return not (names and names[-1].endswith("bias"))

  return jax.tree_util.tree_map_with_path(decays, params)


def map_opt_state(optimizer: optax.GradientTransformation, params: Any,
                  per_param: Callable[[Any, Any], Any], like_params: Any,
                  other: Callable[[Any], Any]) -> Any:
  """The optimiser state's tree with every leaf that mirrors a parameter (Adam's mu and nu)
  replaced by `per_param(leaf, like_params' entry for that parameter)` and every other leaf
  (step counts, injected hyper-parameters) by `other(leaf)`. `params` may be abstract.

  The one place that knows which optimiser leaves belong to which parameter (optax's own
  `tree_map_params`): shardings of the optimiser state, and byte counts per device, use it.
  """
  from flax import nnx  # pylint: disable=g-import-not-at-top
  return optax.tree_map_params(
      optimizer, per_param, jax.eval_shape(optimizer.init, params), like_params,
      transform_non_params=other, is_leaf=lambda x: isinstance(x, nnx.Variable))


def _key_name(key) -> str | None:
  for attr in ("key", "name"):
    value = getattr(key, attr, None)
    if isinstance(value, str):
      return value
  return None


def make_optimizer(learning_rate: float = 1e-6, b1: float = 0.9, b2: float = 0.999,
                   weight_decay: float = 0.01, eps: float = 1e-8, warmup_steps: int = 0,
                   schedule: str = "constant", total_steps: int | None = None,
                   grad_clip_norm: float | None = 1.0) -> optax.GradientTransformation:
  """AdamW (decoupled decay, masked as in the module docstring) after global-norm clipping.

  Args:
    learning_rate: peak learning rate (after warmup).
    b1, b2, eps: Adam moments' decay rates and the denominator epsilon.
    weight_decay: decoupled decay coefficient (multiplied by the current learning rate).
    warmup_steps: linear warmup length in updates (0: none).
    schedule: 'constant', 'cosine' or 'linear' decay after warmup (see `make_schedule`).
    total_steps: updates at which a decaying schedule reaches 0; required for 'cosine'/'linear'.
    grad_clip_norm: clip the global gradient norm to this value; None or 0 disables clipping.

  Returns:
    An optax GradientTransformation over an (nnx.State or any) parameter pytree.
  """
  _check_schedule(learning_rate, warmup_steps, schedule, total_steps)
  for name, value in (("b1", b1), ("b2", b2)):
    if not 0.0 <= value < 1.0:
      raise ValueError(f"optimizer {name}={value} must be in [0, 1) (paper: b1=0.9, b2=0.999).")
  if not weight_decay >= 0.0 or not math.isfinite(weight_decay):
    raise ValueError(f"optimizer weight_decay={weight_decay} must be a finite number >= 0 "
                     "(paper: 0.01; 0 disables it).")
  if not eps > 0.0:
    raise ValueError(f"optimizer eps={eps} must be > 0 (the usual value is 1e-8).")
  if grad_clip_norm is not None and (not grad_clip_norm >= 0.0
                                     or not math.isfinite(grad_clip_norm)):
    raise ValueError(f"optimizer grad_clip_norm={grad_clip_norm} must be a finite number > 0, "
                     "or None/0 to disable clipping.")
  lr_fn = make_schedule(learning_rate, warmup_steps=warmup_steps, schedule=schedule,
                        total_steps=total_steps)
  adamw = optax.inject_hyperparams(optax.adamw, static_args=("mask",))(
      learning_rate=lr_fn, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
      mask=weight_decay_mask)
  if grad_clip_norm:
    return optax.chain(optax.clip_by_global_norm(grad_clip_norm), adamw)
  return optax.chain(adamw)


def current_learning_rate(opt_state: Any) -> jax.Array:
  """The learning rate the latest update used (before any update: the first update's), or NaN
  for an optimiser state without an injected 'learning_rate' hyper-parameter."""
  found = [node.hyperparams["learning_rate"] for node in
           jax.tree.leaves(opt_state, is_leaf=lambda x: hasattr(x, "hyperparams"))
           if hasattr(node, "hyperparams") and "learning_rate" in node.hyperparams]
  return jnp.asarray(found[0] if len(found) == 1 else jnp.nan, jnp.float32)


def _check_schedule(learning_rate, warmup_steps, schedule, total_steps):
  if not learning_rate > 0.0 or not math.isfinite(learning_rate):
    raise ValueError(f"optimizer learning_rate={learning_rate} must be a finite number > 0 "
                     "(paper: 1e-6).")
  if int(warmup_steps) != warmup_steps or warmup_steps < 0:
    raise ValueError(f"optimizer warmup_steps={warmup_steps} must be an integer >= 0.")
  if schedule not in SCHEDULES:
    raise ValueError(f"optimizer schedule={schedule!r} is unknown; choose one of {SCHEDULES}.")
  if schedule != "constant":
    if total_steps is None or int(total_steps) != total_steps or total_steps <= warmup_steps:
      raise ValueError(
          f"optimizer schedule={schedule!r} needs total_steps > warmup_steps={warmup_steps} "
          f"(got total_steps={total_steps}); set it to the number of training steps.")
