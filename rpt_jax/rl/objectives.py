"""Training objectives by name: what the rollout phase must score, and each one's settings.

An objective is chosen by `rl.reward` and is a registry entry (`OBJECTIVES`) with its config
dataclass:

  prefix_match  the paper's reward (PrefixMatchConfig: no settings).
  first_token   1 iff the answer is exactly the next token (FirstTokenConfig).
  dense         1 if right, else the policy's probability of the true first token at the answer
                position (DenseConfig); scored by `rpt_jax.rl.answer_logprob`.
  rlp           RLP's information gain log p(x_t | x_<t, thought) - log p_EMA(x_t | x_<t)
                (RLPConfig: the EMA teacher's decay); the gradient reaches the thought tokens
                only (the answer after `</think>` is not trained).

Parts that add to any of them:
  kl            rl.beta > 0: a KL(pi || ref) penalty against a frozen reference
                (KLConfig: `rl.reference`, an HF folder, or '' for the starting policy); the
                weight and estimator are the loss's (`LossConfig.beta`, `kl_estimator`).
  ntp           rl.ntp_coef > 0: RMT's next-token loss on the context tokens
                (`LossConfig.ntp_coef`; see `rpt_jax.rl.context_ntp`).
  thought_budget RMT's decaying cap on response length, with its optional length reward
                (ThoughtBudget).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from rpt_jax.registry import Registry


@dataclasses.dataclass(frozen=True)
class PrefixMatchConfig:
  """The paper's reward has no settings."""


@dataclasses.dataclass(frozen=True)
class FirstTokenConfig:
  """First-token match has no settings."""


@dataclasses.dataclass(frozen=True)
class DenseConfig:
  """The dense reward has no settings (the probability is the model's own, temperature 1)."""


@dataclasses.dataclass(frozen=True)
class RLPConfig:
  """ema_decay: the teacher's decay per step (teacher <- d * teacher + (1 - d) * policy)."""

  ema_decay: float = 0.999

  def __post_init__(self):
    if not 0.0 <= self.ema_decay < 1.0:
      raise ValueError(f"ema_decay={self.ema_decay} must be in [0, 1) (RLP uses 0.999).")


@dataclasses.dataclass(frozen=True)
class Objective:
  """A registered objective.

  config_type: its settings dataclass (built from the config by `RunSpec`).
  answer_score: the model score its reward reads: None, 'first_token_prob' or
    'information_gain' (the trainer computes it with `rpt_jax.rl.answer_logprob`).
  teacher: whether the run holds an EMA teacher of the policy.
  thought_only: whether the gradient is restricted to the thought tokens.
  """

  config_type: type
  answer_score: str | None = None
  teacher: bool = False
  thought_only: bool = False


OBJECTIVES: Registry[Objective] = Registry("objective (rl.reward)",
                                           "rpt_jax.rl.objectives.register_objective")


def register_objective(name: str, objective: Objective) -> Objective:
  """Adds `objective` under `name` (also the name of its reward in `rpt_jax.rl.reward`)."""
  return OBJECTIVES.register(name)(objective)


def get_objective(name: str) -> Objective:
  """The objective `name`; ValueError naming rl.reward and the registered names otherwise.

  A reward registered in `rpt_jax.rl.reward` alone (one that scores response text on the host)
  is an objective too, with no settings: registering it is all it takes to train with it.
  """
  from rpt_jax.rl import reward as reward_lib  # pylint: disable=g-import-not-at-top
  if name not in OBJECTIVES and name in reward_lib.REWARDS and not (
      reward_lib.REWARDS[name].needs_first_token_prob):
    return Objective(PrefixMatchConfig)
  if name not in OBJECTIVES:
    raise ValueError(f"reward={name!r}: unknown reward {name!r}; registered objectives: "
                     f"{sorted(OBJECTIVES)} (add one with "
                     "rpt_jax.rl.objectives.register_objective).")
  return OBJECTIVES[name]


register_objective("prefix_match", Objective(PrefixMatchConfig))
register_objective("first_token", Objective(FirstTokenConfig))
register_objective("dense", Objective(DenseConfig, answer_score="first_token_prob"))
register_objective("rlp", Objective(RLPConfig, answer_score="information_gain", teacher=True,
                                    thought_only=True))


@dataclasses.dataclass(frozen=True)
class KLConfig:
  """reference: an HF checkpoint folder whose weights are the KL reference ('' = a frozen copy
  of the policy as the run starts). Used only when rl.beta > 0."""

  reference: str = ""


@dataclasses.dataclass(frozen=True)
class ThoughtBudget:
  """RMT's decaying response budget (arXiv 2509.24375): at step s of T,
  B_s = max(floor, start * decay ** (s / T)), then rounded UP to a multiple of
  ceil(max_new_tokens / 8) (at most 8 distinct budgets, so 8 decode compiles) and capped at
  rl.max_new_tokens. start 0 = off.

  length_reward_coef: adds coef * (1 - l / B_s) to each rollout's reward, l its thought length
  (a triangle from 1 at l = 0 to 0 at the budget: shorter thoughts earn more). RMT's exact
  length-reward shape is not reproduced here: this is the project's reading of it.
  """

  start: int = 0
  floor: int = 1
  decay: float = 1.0
  length_reward_coef: float = 0.0

  def __post_init__(self):
    if self.start < 0 or (self.start and not 1 <= self.floor <= self.start):
      raise ValueError(f"thought_budget=({self.start}, {self.floor}, {self.decay}) needs "
                       "start >= floor >= 1 (or start 0 for no budget).")
    if not 0.0 < self.decay <= 1.0:
      raise ValueError(f"thought_budget decay={self.decay} must be in (0, 1].")
    if not math.isfinite(self.length_reward_coef) or self.length_reward_coef < 0:
      raise ValueError(f"length_reward_coef={self.length_reward_coef} must be >= 0.")
    if self.length_reward_coef and not self.start:
      raise ValueError("length_reward_coef > 0 needs a thought budget (rl.thought_budget).")

  @property
  def active(self) -> bool:
    return self.start > 0

  def at(self, step: int, total_steps: int, max_new_tokens: int) -> int:
    """The response budget of `step` (max_new_tokens when off)."""
    if not self.active:
      return max_new_tokens
    raw = max(self.floor, self.start * self.decay ** (step / max(total_steps, 1)))
    quantum = -(-max_new_tokens // 8)
    return int(min(max_new_tokens, quantum * math.ceil(raw / quantum)))

  def length_reward(self, thought_lengths: np.ndarray, budget: int) -> np.ndarray:
    """coef * max(0, 1 - l / budget), float32 [N]."""
    l = np.asarray(thought_lengths, np.float64)
    return (self.length_reward_coef * np.maximum(0.0, 1.0 - l / budget)).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
  """The run's objective: `name` (= rl.reward), its `settings` (an instance of the objective's
  config_type), the KL part's reference and RMT's thought budget."""

  name: str = "prefix_match"
  settings: Any = None
  kl: KLConfig = dataclasses.field(default_factory=KLConfig)
  budget: ThoughtBudget = dataclasses.field(default_factory=ThoughtBudget)

  def __post_init__(self):
    objective = get_objective(self.name)
    if self.settings is None:
      object.__setattr__(self, "settings", objective.config_type())
    elif not isinstance(self.settings, objective.config_type):
      raise ValueError(f"reward={self.name!r} takes {objective.config_type.__name__} settings, "
                       f"got {type(self.settings).__name__}.")

  @property
  def objective(self) -> Objective:
    return get_objective(self.name)

  @classmethod
  def build(cls, name: str, fields: dict[str, Any], **parts) -> "ObjectiveConfig":
    """The objective `name` with its settings taken from `fields` (e.g. {'ema_decay': 0.99});
    fields the objective does not take are ignored (they belong to other objectives)."""
    config_type = get_objective(name).config_type
    names = {f.name for f in dataclasses.fields(config_type)}
    return cls(name, config_type(**{k: v for k, v in fields.items() if k in names}), **parts)

