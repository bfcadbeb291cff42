"""The RPT loop's settings (`rpt_jax.train.RPTTrainer`): the config's `rl`, `optim` and `train`
sections as one validated dataclass, built by `rpt_jax.spec.RunSpec`."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from rpt_jax.rl import advantages as advantages_lib
from rpt_jax.rl import reward as reward_lib
from rpt_jax.rl.loss import LossConfig
from rpt_jax.rl.objectives import ObjectiveConfig


@dataclasses.dataclass(frozen=True)
class RPTConfig:
  """Settings of the RPT loop (the config's `rl`, `optim` and `train` sections; built by
  `rpt_jax.spec.RunSpec`). Micro-batch sizes above `batch_contexts` mean "the whole batch":
  read them through `rollout_micro_contexts` / `train_micro_contexts`.

  Over-sampling (off by default: the paper is exactly on-policy): `oversample_contexts` O > 0
  offers the rollout engine B + O contexts per call and ends the call once B whole groups are
  done (`rpt_jax.oversample`); `partial_rollouts` keeps the rows still decoding in the
  engine for the next step (their behaviour log-probs go into the PPO ratio) instead of dropping
  them (the engine's slot cache then stays allocated through the update). `prompt_width`
  (data.prompt_buckets[-1]): the one prompt width carried rows need.
  """

  steps: int
  batch_contexts: int = 256
  num_generations: int = 8
  temperature: float = 0.8
  top_k: int = 0
  top_p: float = 1.0
  max_new_tokens: int = 8192
  reward: str = "prefix_match"
  advantage: str = "grpo"
  loss: LossConfig = dataclasses.field(default_factory=LossConfig)
  objective: ObjectiveConfig | None = None  # None: `reward`'s objective, default settings
  template: str = "v0"
  dynamic_sampling_from_step: int = 500
  dynamic_sampling_max_tries: int = 4
  rollout_micro_batch: int = 64
  decode_slots: int = 0
  prefill_contexts: int = 1
  oversample_contexts: int = 0
  partial_rollouts: bool = False
  prompt_width: int = 0
  train_micro_batch: int = 64
  shared_prefix: bool = True
  optimizer: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  log_every: int = 1
  checkpoint_every: int = 50
  max_consecutive_nonfinite: int = 3
  seed: int = 0

  def __post_init__(self):
    if self.num_generations < 2:
      raise ValueError(f"rl.num_generations={self.num_generations}: GRPO compares rollouts "
                       "within a group; use at least 2 (the paper uses 8).")
    if not self.temperature > 0:
      raise ValueError(f"rl.temperature={self.temperature} must be > 0: GRPO needs G different "
                       "rollouts per context, and the update scores them at this temperature "
                       "(the paper samples at 0.8).")
    if not 0 < self.top_p <= 1.0:
      raise ValueError(f"rl.top_p={self.top_p} must be in (0, 1].")
    if self.top_k is None or self.top_k < 0:
      raise ValueError(f"rl.top_k={self.top_k} must be >= 0 (0 = off).")
    for field in ("rl.batch_contexts", "rl.rollout_micro_batch", "rl.train_micro_batch",
                  "rl.max_new_tokens", "rl.dynamic_sampling_max_tries", "train.log_every",
                  "train.checkpoint_every", "train.max_consecutive_nonfinite"):
      value = getattr(self, field.split(".")[1])
      if value < 1:
        raise ValueError(f"{field}={value} must be >= 1.")
    if self.decode_slots < 0:
      raise ValueError(f"rl.decode_slots={self.decode_slots} must be >= 0 (0: "
                       "rl.rollout_micro_batch x rl.num_generations).")
    if not 1 <= self.prefill_contexts * self.num_generations <= self.slots:
      raise ValueError(f"rl.prefill_contexts={self.prefill_contexts} x rl.num_generations="
                       f"{self.num_generations} rows must fit the {self.slots} decode slots "
                       "(and be >= 1); lower it or raise rl.decode_slots.")
    if self.oversample_contexts < 0:
      raise ValueError(f"rl.oversample_contexts={self.oversample_contexts} must be >= 0 (0: off, "
                       "every rollout call generates exactly rl.batch_contexts contexts).")
    if self.partial_rollouts and not self.oversample_contexts:
      raise ValueError("rl.partial_rollouts=True carries rows that over-sampling left unfinished; "
                       "set rl.oversample_contexts >= 1 or rl.partial_rollouts=False.")
    if self.partial_rollouts and self.prompt_width < 1:
      raise ValueError(f"prompt_width={self.prompt_width}: rl.partial_rollouts=True pads every "
                       "prompt to one width, the widest of data.prompt_buckets; give "
                       "data.prompt_buckets at least one positive length.")
    if self.steps < 0 or self.dynamic_sampling_from_step < 0:
      raise ValueError(f"train.steps={self.steps} / rl.dynamic_sampling_from_step="
                       f"{self.dynamic_sampling_from_step} must be >= 0.")
    for name, micro in (("rollout_micro_batch", self.rollout_micro_contexts),
                        ("train_micro_batch", self.train_micro_contexts)):
      if self.batch_contexts % micro:
        raise ValueError(f"rl.{name}={getattr(self, name)} must divide rl.batch_contexts="
                         f"{self.batch_contexts}.")
    for field, check in (("reward", lambda: reward_lib.get_reward(self.reward)),
                         ("advantage", lambda: advantages_lib.ADVANTAGE_ESTIMATORS.get(
                             self.advantage))):
      try:
        check()
      except ValueError as e:
        raise ValueError(f"rl.{field}={getattr(self, field)!r}: {e}") from None
    if self.objective is None:
      object.__setattr__(self, "objective", ObjectiveConfig(self.reward))
    if self.objective.name != self.reward:
      raise ValueError(f"rl.reward={self.reward!r} but the objective is "
                       f"{self.objective.name!r}; build both from the same name.")

  @property
  def slots(self) -> int:
    """Decode slots of the rollout engine (0 in the config: a micro-batch's rows)."""
    return self.decode_slots or self.rollout_micro_contexts * self.num_generations

  @property
  def rollout_micro_contexts(self) -> int:
    """Contexts per sampler call."""
    return min(self.rollout_micro_batch, self.batch_contexts)

  @property
  def train_micro_contexts(self) -> int:
    """Contexts (each with its G rows) per gradient-accumulation micro-step."""
    return min(self.train_micro_batch, self.batch_contexts)
