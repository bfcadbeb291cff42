"""The rollout phase's model scores: what an objective needs beyond the response text.

`RolloutScorer.score` runs, for one batch of rollouts and only what the run's objective needs:

  dense         the policy's log p(true first token | context, thought, answer opening)
                (`rpt_jax.rl.answer_logprob`) -> first_token_prob = exp(.)
  rlp           the same under the policy, minus the EMA teacher's log-prob of the truth with
                an EMPTY thought (the no-thought baseline) -> information_gain; the gradient
                mask is cut to the thought tokens
  kl (beta > 0) the frozen reference's log-probs of every sampled token (ref_logprobs), at the
                sampling temperature like the policy's in the loss
  ntp           the context-token mask of every prompt (`rpt_jax.rl.context_ntp`)
  budget        RMT's length reward from the thought lengths

Inputs are this process's rows (numpy); the device programs run on global arrays (built with
`to_global`) and each process reads back its own rows.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, Sequence

import jax
import numpy as np
from flax import nnx

from rpt_jax import host_rows
from rpt_jax.rl import answer_logprob, context_ntp
from rpt_jax.rl.loss import LossConfig
from rpt_jax.rl.objectives import ObjectiveConfig
from rpt_jax.rl.reward import RewardBatch, score_rollouts
from rpt_jax.rl.train_state import TrainState
from rpt_jax.rl.update import completion_logprobs


@dataclasses.dataclass(frozen=True)
class ObjectiveScores:
  """This process's rows. components: named per-row reward parts [R] (logged as reward/<name>);
  first_token_probs / information_gains: what `score_rollouts` takes (None when unused);
  gradient_lengths [R]: tokens of each response the loss trains (thought only for RLP);
  ref_logprobs [R, N] | None; context_mask [B, Lp] | None; length_reward [R] | None."""

  components: Mapping[str, np.ndarray]
  gradient_lengths: np.ndarray
  first_token_probs: np.ndarray | None = None
  information_gains: np.ndarray | None = None
  ref_logprobs: np.ndarray | None = None
  context_mask: np.ndarray | None = None
  length_reward: np.ndarray | None = None

  def rewards(self, responses: Sequence[str], completions: Sequence[bytes],
              boundaries: Sequence[Sequence[int]], reward: str,
              response_lengths: np.ndarray) -> RewardBatch:
    """`score_rollouts` with these scores, plus the length reward, with the components."""
    scored = score_rollouts(responses, completions, boundaries, reward=reward,
                            first_token_probs=self.first_token_probs,
                            information_gains=self.information_gains,
                            response_lengths=response_lengths)
    rewards = scored.rewards
    if self.length_reward is not None:
      rewards = rewards + self.length_reward
    return dataclasses.replace(scored, rewards=rewards.astype(np.float32),
                               components=dict(self.components))


class RolloutScorer:
  """Owns the jitted scoring programs of one run's objective (see the module docstring)."""

  def __init__(self, graphdef: nnx.GraphDef, tokenizer, objective: ObjectiveConfig,
               loss: LossConfig, *, num_generations: int, temperature: float, template: str,
               shared_prefix: bool, to_global: Callable[[np.ndarray], jax.Array], mesh=None,
               rules=None):
    self.tokenizer, self.objective, self.loss = tokenizer, objective, loss
    self.g, self.temperature, self.to_global = num_generations, temperature, to_global
    self.answers = answer_logprob.AnswerScorer(graphdef, mesh=mesh, rules=rules,
                                               shared_prefix=shared_prefix)
    self.empty_prompt = (context_ntp.empty_prompt_ids(tokenizer, template)
                         if loss.ntp_coef > 0 else None)
    if loss.beta > 0:
      def ref_logprobs(params, prompt_tokens, prompt_lengths, completion_tokens):
        return completion_logprobs(
            nnx.merge(graphdef, params), prompt_tokens, prompt_lengths, completion_tokens,
            num_generations=num_generations, temperature=temperature,
            shared_prefix=shared_prefix, mesh=mesh, rules=rules)[0]

      self._ref_logprobs = jax.jit(ref_logprobs)

  @property
  def needs_thoughts(self) -> bool:
    return (self.objective.objective.answer_score is not None
            or self.objective.budget.length_reward_coef > 0)

  def _answer_logp(self, params, prompt_tokens, prompt_lengths, tails, g) -> np.ndarray:
    tails = answer_logprob.AnswerTails(*(self.to_global(getattr(tails, f.name))
                                         for f in dataclasses.fields(tails)))
    out = self.answers(params, self.to_global(prompt_tokens), self.to_global(prompt_lengths),
                       tails, num_generations=g)
    return host_rows.local_rows(out).astype(np.float64)

  def score(self, state: TrainState, prompt_tokens: np.ndarray, prompt_lengths: np.ndarray,
            completions: Sequence[bytes], boundaries: Sequence[Sequence[int]],
            tokens: np.ndarray, lengths: np.ndarray, done: np.ndarray,
            budget: int) -> ObjectiveScores:
    """Scores of this process's B contexts x G rows (completions/boundaries per CONTEXT)."""
    objective, g = self.objective.objective, self.g
    components: dict[str, np.ndarray] = {}
    out: dict[str, np.ndarray | None] = {}
    gradient_lengths = np.asarray(lengths, np.int32)
    thought_lengths = None
    if objective.answer_score is not None:
      # The truth is the first token's bytes (dense: its probability; RLP: x_t).
      truths = [c[:b[0]] if len(b) else b"" for c, b in zip(completions, boundaries)]
      tails = answer_logprob.build_tails(self.tokenizer, tokens, lengths, done,
                                         [t for t in truths for _ in range(g)])
      thought_lengths = tails.thought_lengths
      logp = self._answer_logp(state.params, prompt_tokens, prompt_lengths, tails, g)
      components["answer_logprob"] = logp
      if objective.answer_score == "first_token_prob":
        out["first_token_probs"] = components["first_token_prob"] = np.clip(np.exp(logp), 0, 1)
      else:
        # The no-thought baseline: one row per context under the teacher.
        empty = answer_logprob.build_tails(self.tokenizer, tokens[::g], lengths[::g],
                                           done[::g], truths, thoughts=False)
        teacher = np.repeat(self._answer_logp(state.teacher, prompt_tokens, prompt_lengths,
                                              empty, 1), g)
        components["teacher_logprob"] = teacher
        out["information_gains"] = components["information_gain"] = logp - teacher
      if objective.thought_only:
        gradient_lengths = thought_lengths
    if self.needs_thoughts:
      if thought_lengths is None:
        thought_lengths = answer_logprob.thought_lengths(self.tokenizer, tokens, lengths,
                                                         done)[0]
      components["thought_length"] = thought_lengths.astype(np.float64)
    if self.objective.budget.length_reward_coef > 0:
      out["length_reward"] = self.objective.budget.length_reward(thought_lengths, budget)
      components["length_reward"] = out["length_reward"]
    if self.loss.beta > 0:
      ref = self._ref_logprobs(state.reference, self.to_global(prompt_tokens),
                               self.to_global(prompt_lengths), self.to_global(tokens))
      out["ref_logprobs"] = host_rows.local_rows(ref).astype(np.float32)
    if self.empty_prompt is not None:
      out["context_mask"] = context_ntp.context_mask(prompt_tokens, prompt_lengths,
                                                     self.empty_prompt)
    return ObjectiveScores(components=components, gradient_lengths=gradient_lengths, **out)
