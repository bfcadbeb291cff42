"""Group-relative advantage estimators (GRPO and its variants), registered by name.

A rollout batch holds N = num_groups * G rows; the G rollouts of one context are adjacent
(group i owns rows i*G .. i*G+G-1). An estimator maps each group's rewards [G] to advantages [G];
the advantage of a row is then broadcast over its response tokens by the loss.

Registered estimators:
  'grpo'    (r_i - mean_g) / (std_g + eps), population std (DeepSeekMath GRPO).
  'drgrpo'  r_i - mean_g, no std normalisation (Dr. GRPO, arXiv 2503.20783).
  'rloo'    r_i - mean of the other G-1 rewards (REINFORCE leave-one-out); needs G >= 2.

All functions are pure jnp, jit-able with `group_size` static, and accept numpy input.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from rpt_jax.registry import Registry

# An estimator maps rewards [num_groups, G] (fp32) and eps to advantages [num_groups, G].
AdvantageFn = Callable[[jax.Array, float], jax.Array]

ADVANTAGE_ESTIMATORS: Registry[AdvantageFn] = Registry(
    "advantage estimator", "rpt_jax.rl.advantages.register_advantage_estimator")
# Decorator: registers `fn(rewards_GroupsG, eps) -> advantages_GroupsG` under `name`.
register_advantage_estimator = ADVANTAGE_ESTIMATORS.register


@register_advantage_estimator("grpo")
def _grpo(rewards_NG: jax.Array, eps: float) -> jax.Array:
  mean = rewards_NG.mean(axis=1, keepdims=True)
  std = rewards_NG.std(axis=1, keepdims=True)  # Population std (ddof=0), as in GRPO.
  return (rewards_NG - mean) / (std + eps)


@register_advantage_estimator("drgrpo")
def _drgrpo(rewards_NG: jax.Array, eps: float) -> jax.Array:
  del eps
  return rewards_NG - rewards_NG.mean(axis=1, keepdims=True)


@register_advantage_estimator("rloo")
def _rloo(rewards_NG: jax.Array, eps: float) -> jax.Array:
  del eps
  g = rewards_NG.shape[1]
  others_mean = (rewards_NG.sum(axis=1, keepdims=True) - rewards_NG) / (g - 1)
  return rewards_NG - others_mean


def _grouped(rewards_N: jax.Array, group_size: int) -> jax.Array:
  """Checks shapes and reshapes rewards [N] to [N / G, G] in fp32."""
  rewards_N = jnp.asarray(rewards_N, dtype=jnp.float32)
  if rewards_N.ndim != 1:
    raise ValueError(f"rewards must be a 1-D array [N]; got shape {rewards_N.shape}.")
  if group_size < 1:
    raise ValueError(f"group_size={group_size} must be a positive integer.")
  if rewards_N.shape[0] % group_size:
    raise ValueError(
        f"{rewards_N.shape[0]} rewards do not split into groups of {group_size}; the batch must "
        "hold whole groups (num_groups * group_size rows, a group's rows adjacent).")
  return rewards_N.reshape(-1, group_size)


def group_advantages(rewards_N: jax.Array, group_size: int, estimator: str = "grpo",
                     eps: float = 1e-6) -> jax.Array:
  """Per-rollout advantages [N] (fp32) from rewards [N] of adjacent groups of `group_size`.

  Args:
    rewards_N: one scalar reward per rollout; rows i*G .. i*G+G-1 are group i.
    group_size: G, rollouts per context.
    estimator: a name in `ADVANTAGE_ESTIMATORS` ('grpo', 'drgrpo', 'rloo', ...).
    eps: added to the group std by 'grpo' (a group whose rewards are all equal gets 0).
  """
  estimate = ADVANTAGE_ESTIMATORS.get(estimator)  # Raises for an unknown name.
  if estimator == "rloo" and group_size < 2:
    raise ValueError(f"estimator 'rloo' needs group_size >= 2 (got {group_size}): it compares "
                     "each rollout with the mean of the other rollouts of its group.")
  rewards_NG = _grouped(rewards_N, group_size)
  return estimate(rewards_NG, eps).reshape(-1)
