"""Scoring the truth after a thought: log p(true next tokens | context, thought, answer opening).

The dense reward (the policy's probability of the true first token) and RLP's information gain
(log p(x_t | x_<t, thought) - log p_EMA(x_t | x_<t)) both need the model's log-probability of
the ground truth at the ANSWER position: after the rollout's thought, `</think>` and the box
opening `\\boxed{`. Two halves:

* host (`build_tails`): per rollout row, a tail of token ids = its thought (the sampled tokens
  before its last `</think>`, or the whole response, less the stop token, when it has none),
  the answer opening's ids, then the truth's ids; and where the truth sits in it. An empty
  thought (`thoughts=False`) gives the no-thought baseline.
* device (`AnswerScorer`): ONE jitted, sharded program per shape: each context is prefilled once
  (the shared-prefix pass of `rpt_jax.rl.update.completion_hidden_states`), its G tails attend
  to the repeated cache, and only the K truth positions are unembedded (chunked and
  vocab-parallel like the train step's log-probs). The sum over the truth's tokens is returned.

Log-probs are those of the model's own distribution (temperature 1), not the sampling one.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from rpt_jax import errors
from rpt_jax import mesh as mesh_lib
from rpt_jax.rl import loss as loss_lib
from rpt_jax.rl.prompts import BOXED_OPEN, THINK_END
from rpt_jax.rl.update import completion_hidden_states

Array = jax.Array

# What follows a thought that ended at its own `</think>` (format_response's layout), and a
# thought that never closed (its `\n` before the marker is added).
OPENING_AFTER_MARKER = f"{THINK_END}\n\n{BOXED_OPEN}"
OPENING_UNCLOSED = f"\n{OPENING_AFTER_MARKER}"


@dataclasses.dataclass(frozen=True)
class AnswerTails:
  """What follows each row's prompt when its truth is scored (numpy, R rows).

  tokens:          int32 [R, W] thought ids, answer-opening ids, truth ids; pad after.
  truth_start:     int32 [R] index in `tokens` of the first truth token.
  truth_mask:      bool [R, K] which of the K truth slots hold a token.
  thought_lengths: int32 [R] thought tokens (what RLP's gradient is restricted to).
  """

  tokens: np.ndarray
  truth_start: np.ndarray
  truth_mask: np.ndarray
  thought_lengths: np.ndarray


def _token_bytes(tokenizer, token_id: int) -> bytes:
  """A sampled token's bytes; an id without bytes (unknown piece) counts as none: a policy may
  sample any id, and it cannot be part of the marker."""
  try:
    return tokenizer.token_bytes(token_id)
  except errors.InputError:
    return b""


def thought_lengths(tokenizer, tokens_RN: np.ndarray, lengths_R: np.ndarray,
                    done_R: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(thought tokens [R], closed [R] bool): the tokens that end at or before the row's LAST
  `</think>` (the marker `extract_prediction` reads), or every token but the stop token when
  there is none (closed False)."""
  marker = THINK_END.encode()
  out = np.zeros(len(tokens_RN), np.int32)
  closed = np.zeros(len(tokens_RN), bool)
  for r, (row, n, d) in enumerate(zip(tokens_RN, lengths_R, done_R)):
    ids = [int(t) for t in row[:max(int(n) - int(bool(d)), 0)]]
    pieces = [_token_bytes(tokenizer, t) for t in ids]
    at = b"".join(pieces).rfind(marker)
    if at < 0:
      out[r] = len(ids)
      continue
    ends = np.cumsum([len(p) for p in pieces])
    out[r], closed[r] = int(np.sum(ends <= at)), True
  return out, closed


def build_tails(tokenizer, tokens_RN: np.ndarray, lengths_R: np.ndarray, done_R: np.ndarray,
                truths: Sequence[bytes], *, num_truth_tokens: int = 8,
                thoughts: bool = True) -> AnswerTails:
  """The tails of R rows (row r's truth is `truths[r]`, its UTF-8 bytes, e.g. the first token's).

  Width W = N + the longest opening + `num_truth_tokens` (K): static for a given N. A truth of
  more than K tokens is cut to K. thoughts=False: every row's thought is empty (the baseline).
  """
  r, n = tokens_RN.shape
  k = int(num_truth_tokens)
  openings = {closed: [int(t) for t in tokenizer.encode(text)]
              for closed, text in ((True, OPENING_AFTER_MARKER), (False, OPENING_UNCLOSED))}
  width = n + max(len(o) for o in openings.values()) + k
  if thoughts:
    lengths, closed = thought_lengths(tokenizer, tokens_RN, lengths_R, done_R)
  else:
    lengths, closed = np.zeros(r, np.int32), np.zeros(r, bool)
  out = np.zeros((r, width), np.int32)
  start = np.zeros(r, np.int32)
  mask = np.zeros((r, k), bool)
  truth_ids: dict[bytes, list[int]] = {}
  for i in range(r):
    truth = bytes(truths[i])
    if truth not in truth_ids:
      truth_ids[truth] = [int(t) for t in tokenizer.encode(
          truth.decode("utf-8", "replace"))][:k]
    ids = ([int(t) for t in tokens_RN[i, :lengths[i]]] + openings[bool(closed[i])])
    start[i] = len(ids)
    ids += truth_ids[truth]
    out[i, :len(ids)] = ids
    mask[i, :len(ids) - start[i]] = True
  return AnswerTails(out, start, mask, lengths.astype(np.int32))


def answer_logprobs(model, prompt_tokens_BL: Array, prompt_lengths_B: Array, tail_tokens_RW: Array,
                    truth_start_R: Array, truth_mask_RK: Array, *, num_generations: int,
                    shared_prefix: bool = True, mesh: Mesh | None = None, rules: Any = None,
                    chunk_size: int = 256) -> Array:
  """logp_R fp32: sum over the truth slots of log p(truth token | prompt, tail before it).

  Rows b*G .. b*G+G-1 follow prompt b (G = num_generations). Traceable.
  """
  hidden_RWD = completion_hidden_states(model, prompt_tokens_BL, prompt_lengths_B,
                                        tail_tokens_RW, num_generations=num_generations,
                                        shared_prefix=shared_prefix)
  w, k = tail_tokens_RW.shape[1], truth_mask_RK.shape[1]
  # Hidden state i predicts tail token i: gather the K truth positions before unembedding.
  index_RK = jnp.minimum(truth_start_R[:, None] + jnp.arange(k, dtype=jnp.int32)[None], w - 1)
  hidden_RKD = jnp.take_along_axis(hidden_RWD, index_RK[..., None], axis=1)
  targets_RK = jnp.take_along_axis(tail_tokens_RW.astype(jnp.int32), index_RK, axis=1)
  logp_RK, _ = loss_lib.token_logprobs_and_entropy(
      hidden_RKD, model.unembedding().astype(hidden_RKD.dtype), targets_RK, temperature=1.0,
      chunk_size=chunk_size, mesh=mesh, rules=rules)
  return jnp.where(truth_mask_RK, logp_RK, 0.0).sum(axis=1)


class AnswerScorer:
  """`scorer(params, prompt_tokens, prompt_lengths, tails, num_generations=G) -> logp_R`: the
  jitted `answer_logprobs` (one compile per shape), batch-sharded over the mesh's batch rule,
  params by their logical axes. `params` may be the policy's, the teacher's or any copy."""

  def __init__(self, graphdef: nnx.GraphDef, *, mesh: Mesh | None = None,
               rules: mesh_lib.ShardingRules | None = None, shared_prefix: bool = True):
    self.graphdef, self.mesh = graphdef, mesh
    self.rules = rules or mesh_lib.ShardingRules()
    self.shared_prefix = shared_prefix
    self._fns: dict[tuple, Any] = {}

  def _fn(self, g: int):
    if g not in self._fns:
      def score(params, prompt_tokens, prompt_lengths, tail_tokens, truth_start, truth_mask):
        model = nnx.merge(self.graphdef, params)
        return answer_logprobs(model, prompt_tokens, prompt_lengths, tail_tokens, truth_start,
                               truth_mask, num_generations=g, shared_prefix=self.shared_prefix,
                               mesh=self.mesh, rules=self.rules)
      self._fns[g] = jax.jit(score)
    return self._fns[g]

  def _place(self, x, axes):
    if self.mesh is None or isinstance(x, jax.Array):
      return jnp.asarray(x)
    return jax.device_put(x, self.rules.sharding(self.mesh, axes, np.shape(x)))

  def __call__(self, params, prompt_tokens, prompt_lengths, tails: AnswerTails, *,
               num_generations: int) -> Array:
    """Global jax arrays as they are, or numpy arrays (one process) placed batch-sharded;
    logp [R] (batch-sharded)."""
    args = (self._place(prompt_tokens, ("batch", "length")),
            self._place(prompt_lengths, ("batch",)),
            self._place(tails.tokens, ("batch", "length")),
            self._place(tails.truth_start, ("batch",)),
            self._place(tails.truth_mask, ("batch", None)))
    return self._fn(int(num_generations))(params, *args)
