"""Copies of the policy that objectives score against: RLP's EMA teacher and the KL reference.

The EMA teacher (RLP, arXiv 2510.01265) is the policy's exponential moving average, updated in
the train step after every applied update: teacher <- decay * teacher + (1 - decay) * params.
It scores the truth WITHOUT a thought (the no-thought baseline of the information gain).

The KL reference is a frozen copy of the starting policy, or the weights of an HF checkpoint
folder (`rl.reference`); it scores each rollout's tokens in the rollout phase (ref_logprobs).

Both live in the TrainState (`teacher`, `reference`), laid out like the params, and are saved
with it, so a resumed run continues from the same teacher and reference.
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

from rpt_jax import mesh as mesh_lib
from rpt_jax.model.config import ModelConfig


def ema_update(teacher: Any, params: Any, decay: float) -> Any:
  """decay * teacher + (1 - decay) * params, leaf by leaf in the teacher's dtype (traceable)."""
  return jax.tree.map(
      lambda t, p: (decay * t + (1.0 - decay) * p.astype(t.dtype)).astype(t.dtype),
      teacher, params)


def reference_source(path: str, beta: float, policy_config: ModelConfig, *, mesh=None,
                     rules: mesh_lib.ShardingRules | None = None):
  """What `create_train_state(reference=...)` takes: None without a KL term (beta 0), True for
  a copy of the starting policy, else the params loaded from `path`."""
  if beta <= 0:
    return None
  return load_reference(path, policy_config, mesh=mesh, rules=rules) if path else True


def load_reference(path: str, policy_config: ModelConfig, *, mesh=None,
                   rules: mesh_lib.ShardingRules | None = None) -> nnx.State:
  """The params of the HF checkpoint folder `path` (config.json + safetensors) as the KL
  reference; its architecture must be the policy's (a reference is scored with the policy's
  program)."""
  from rpt_jax.model import hf_io  # pylint: disable=g-import-not-at-top
  from rpt_jax.rl import train_state  # pylint: disable=g-import-not-at-top
  model, config = hf_io.load_hf(path, mesh=mesh, rules=rules, dtype=policy_config.param_dtype)
  for field in ("family", "vocab_size", "hidden_size", "num_layers", "num_heads",
                "num_kv_heads", "head_dim", "intermediate_size"):
    if getattr(config, field) != getattr(policy_config, field):
      raise ValueError(
          f"rl.reference={path!r}: its {field}={getattr(config, field)} differs from the "
          f"policy's {getattr(policy_config, field)}; the reference must share the policy's "
          "architecture (leave rl.reference empty to use the starting policy).")
  return train_state.split_params(model)[1]
