"""Rewards for next-token reasoning: prefix matching on UTF-8 bytes, and the paper's variants.

This module owns the reward of one rollout given its response text and the ground truth of its
position, plus the helpers that cut that ground truth out of a tokenised document:

- the completion g: the UTF-8 bytes of the document from the position on (truncated to the last
  boundary, which scores identically: a prediction longer than that is never rewarded);
- the boundaries L_gt: cumulative byte lengths of the next tokens x_t, x_t x_t+1, ... taken from
  the document's OWN tokenisation.

Rewards (registry `REWARDS`, selected by name in the config):
- `prefix_match` (default, the paper's): 1 iff p == g[:len(p)] and len(p) in L_gt.
- `first_token`: 1 iff p is exactly the first token's bytes.
- `dense`: 1 if `prefix_match` is 1, else the given probability of the true first token.
- `rlp`: the given information gain of the thought (RLP, arXiv 2510.01265):
  log p(x_t | x_<t, thought) - log p_EMA(x_t | x_<t); `correct` is still the prefix match.

The model scores (first-token probability, information gain) come from
`rpt_jax.rl.answer_logprob`; the trainer computes them in the rollout phase.

Everything compares bytes, never str: a token boundary may fall inside a multi-byte character
(byte-fallback tokens), and str comparison could not express that.
"""

from __future__ import annotations

import dataclasses
import math
import types
from typing import Mapping, Protocol, Sequence

import numpy as np

from rpt_jax.rl.prompts import extract_prediction


def _prediction_bytes(prediction: str | bytes | None) -> bytes | None:
  """UTF-8 bytes of a prediction; None when there is none or it cannot be encoded."""
  if prediction is None:
    return None
  if isinstance(prediction, (bytes, bytearray)):
    return bytes(prediction)
  try:
    # surrogateescape: a str that carries raw bytes as U+DC80..U+DCFF (Python's convention for
    # undecodable bytes) compares as those bytes; valid text encodes exactly as strict UTF-8.
    return prediction.encode("utf-8", "surrogateescape")
  except UnicodeEncodeError:
    return None  # other lone surrogates: not bytes of any text, so never a match


def _check_completion(completion: bytes) -> None:
  if not isinstance(completion, (bytes, bytearray)):
    raise ValueError(
        f"completion must be bytes (UTF-8 of the document from the position on), got "
        f"{type(completion).__name__}; encode it with .encode('utf-8')")


def _prefix_hit(p: bytes | None, completion: bytes, boundaries: Sequence[int]) -> bool:
  if not p:
    return False  # empty prediction: 0 is never a boundary
  return len(p) in boundaries and completion[:len(p)] == p


def _first_token_hit(p: bytes | None, completion: bytes, boundaries: Sequence[int]) -> bool:
  if not p or len(boundaries) == 0:
    return False
  return len(p) == int(boundaries[0]) and completion[:len(p)] == p


def prefix_matching_reward(prediction: str | bytes | None, completion: bytes,
                           boundaries: Sequence[int]) -> float:
  """The paper's reward: 1.0 iff p == g[:len(p)] and len(p) is a token boundary, else 0.0.

  Args:
    prediction: the extracted answer (str, or raw bytes); None or empty scores 0.
    completion: g, UTF-8 bytes of the ground truth from this position on.
    boundaries: L_gt, cumulative byte lengths of the next tokens (positive, increasing).
  """
  _check_completion(completion)
  return 1.0 if _prefix_hit(_prediction_bytes(prediction), completion, boundaries) else 0.0


def first_token_reward(prediction: str | bytes | None, completion: bytes,
                       boundaries: Sequence[int]) -> float:
  """1.0 iff the prediction is exactly the next token's bytes (g[:boundaries[0]]), else 0.0."""
  _check_completion(completion)
  return 1.0 if _first_token_hit(_prediction_bytes(prediction), completion,
                                 boundaries) else 0.0


def dense_reward(prediction: str | bytes | None, completion: bytes, boundaries: Sequence[int],
                 first_token_prob: float) -> float:
  """1.0 if `prefix_matching_reward` is 1, else `first_token_prob`.

  `first_token_prob` is the policy's probability of the true next token, in [0, 1], computed by
  the caller. As the paper states the variant ("else"), it also applies to responses without a
  prediction.
  """
  _check_completion(completion)
  if _prefix_hit(_prediction_bytes(prediction), completion, boundaries):
    return 1.0
  return float(first_token_prob)


class RewardFn(Protocol):
  """A registered reward: (bytes prediction or None, completion, boundaries, score) -> (r, hit).

  `hit` is the exact-answer indicator behind `accuracy`; `score` is the model score the reward
  declares it needs (the true first token's probability, or the thought's information gain),
  None for rewards that need none.
  """

  def __call__(self, p: bytes | None, completion: bytes, boundaries: Sequence[int],
               score: float | None) -> tuple[float, bool]:
    ...


@dataclasses.dataclass(frozen=True)
class RewardSpec:
  fn: RewardFn
  needs_first_token_prob: bool = False
  needs_information_gain: bool = False


def _prefix_match_fn(p, completion, boundaries, prob):
  del prob
  hit = _prefix_hit(p, completion, boundaries)
  return float(hit), hit


def _first_token_fn(p, completion, boundaries, prob):
  del prob
  hit = _first_token_hit(p, completion, boundaries)
  return float(hit), hit


def _dense_fn(p, completion, boundaries, prob):
  hit = _prefix_hit(p, completion, boundaries)
  return (1.0 if hit else float(prob)), hit


def _rlp_fn(p, completion, boundaries, gain):
  return float(gain), _prefix_hit(p, completion, boundaries)


_REWARDS: dict[str, RewardSpec] = {}
REWARDS: Mapping[str, RewardSpec] = types.MappingProxyType(_REWARDS)


def register_reward(name: str, fn: RewardFn, *, needs_first_token_prob: bool = False,
                    needs_information_gain: bool = False, overwrite: bool = False) -> None:
  """Registers a reward under `name` (see `RewardFn` for the call signature)."""
  if not isinstance(name, str) or not name:
    raise ValueError(f"reward name must be a non-empty string, got {name!r}")
  if name in _REWARDS and not overwrite:
    raise ValueError(
        f"reward {name!r} is already registered; pick another name or pass overwrite=True")
  if needs_first_token_prob and needs_information_gain:
    raise ValueError(f"reward {name!r}: a reward takes one model score; choose "
                     "needs_first_token_prob or needs_information_gain")
  _REWARDS[name] = RewardSpec(fn, needs_first_token_prob, needs_information_gain)


def get_reward(name: str) -> RewardSpec:
  """The reward registered as `name`; ValueError listing the registered names otherwise."""
  try:
    return _REWARDS[name]
  except KeyError:
    raise ValueError(
        f"unknown reward {name!r}; registered rewards: {sorted(_REWARDS)}") from None


register_reward("prefix_match", _prefix_match_fn)
register_reward("first_token", _first_token_fn)
register_reward("dense", _dense_fn, needs_first_token_prob=True)
register_reward("rlp", _rlp_fn, needs_information_gain=True)


@dataclasses.dataclass(frozen=True)
class RewardBatch:
  """Rewards of N rollouts (one process's rows), with what the metrics need.

  Attributes:
    rewards: float32 [N].
    has_prediction: bool [N], True where a NON-EMPTY answer was extracted (an empty `\\boxed{}`
      counts as no usable prediction for `format_rate`).
    correct: bool [N], the exact-answer hit of the chosen reward (for `dense`: the prefix match).
    response_lengths: int32 [N] in tokens as given by the caller, or None if not given.
    predictions: the extracted answers (None where there is none), length N.
    components: named per-row parts of the objective [N] (e.g. 'first_token_prob',
      'information_gain', 'length_reward', 'thought_length'), logged as their means.
  """

  rewards: np.ndarray
  has_prediction: np.ndarray
  correct: np.ndarray
  response_lengths: np.ndarray | None
  predictions: tuple[str | None, ...]
  components: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)

  def metrics(self) -> dict[str, float]:
    """format_rate, accuracy, mean_reward, mean_response_length (NaN if unknown or N == 0),
    and the mean of each component under its name."""
    n = self.rewards.shape[0]

    def mean(x):
      return float(np.mean(x, dtype=np.float64)) if n else math.nan

    return {
        "format_rate": mean(self.has_prediction),
        "accuracy": mean(self.correct),
        "mean_reward": mean(self.rewards),
        "mean_response_length": (math.nan if self.response_lengths is None
                                 else mean(self.response_lengths)),
        **{name: mean(values) for name, values in self.components.items()},
    }


def score_rollouts(responses: Sequence[str], completions: Sequence[bytes],
                   boundaries: Sequence[Sequence[int]], *, reward: str = "prefix_match",
                   first_token_probs: np.ndarray | None = None,
                   information_gains: np.ndarray | None = None,
                   response_lengths: Sequence[int] | None = None) -> RewardBatch:
  """Extracts each response's answer and scores it against its row's ground truth.

  Args:
    responses: N decoded responses (text after the prompt's opened `<think>`).
    completions: N ground-truth byte strings (row i's position; repeat per rollout of a group).
    boundaries: N boundary lists (cumulative byte lengths of the next tokens).
    reward: a name in `REWARDS`.
    first_token_probs: float [N] in [0, 1], required by `dense`.
    information_gains: float [N] (nats, finite), required by `rlp`.
    response_lengths: N response lengths in tokens, for `mean_response_length`.

  Returns:
    A `RewardBatch`.
  """
  spec = get_reward(reward)
  n = len(responses)
  for name, seq in (("completions", completions), ("boundaries", boundaries)):
    if len(seq) != n:
      raise ValueError(f"{name} has {len(seq)} rows but responses has {n}; pass one per row")
  scores = None
  if spec.needs_first_token_prob:
    if first_token_probs is None:
      raise ValueError(f"reward {reward!r} needs first_token_probs (float [N] in [0, 1])")
    scores = np.asarray(first_token_probs, dtype=np.float64)
    if scores.shape != (n,):
      raise ValueError(f"first_token_probs has shape {scores.shape}, expected ({n},)")
    if not np.all((scores >= 0.0) & (scores <= 1.0)):
      raise ValueError("first_token_probs must be probabilities in [0, 1] (no NaN)")
  elif spec.needs_information_gain:
    if information_gains is None:
      raise ValueError(f"reward {reward!r} needs information_gains (float [N], nats)")
    scores = np.asarray(information_gains, dtype=np.float64)
    if scores.shape != (n,) or not np.all(np.isfinite(scores)):
      raise ValueError(f"information_gains must be finite floats of shape ({n},); got shape "
                       f"{scores.shape}")
  lengths = None
  if response_lengths is not None:
    lengths = np.asarray(response_lengths, dtype=np.int32)
    if lengths.shape != (n,):
      raise ValueError(f"response_lengths has shape {lengths.shape}, expected ({n},)")

  rewards = np.zeros(n, dtype=np.float32)
  has_prediction = np.zeros(n, dtype=bool)
  correct = np.zeros(n, dtype=bool)
  predictions = []
  for i, response in enumerate(responses):
    _check_completion(completions[i])
    prediction = extract_prediction(response)
    predictions.append(prediction)
    p = _prediction_bytes(prediction)
    has_prediction[i] = bool(p)
    rewards[i], correct[i] = spec.fn(p, completions[i], boundaries[i],
                                     None if scores is None else float(scores[i]))
  return RewardBatch(rewards, has_prediction, correct, lengths, tuple(predictions))


def boundaries_from_spans(spans: Sequence[tuple[int, int]], start_index: int,
                          max_tokens: int) -> list[int]:
  """Cumulative byte lengths of tokens start_index, start_index+1, ... (at most max_tokens).

  Args:
    spans: a document's token byte spans, `spans[i] = (start, end)`, tiling its bytes.
    start_index: index of the first token to predict (x_t).
    max_tokens: how many following tokens count as valid stopping points.

  Returns:
    Strictly increasing positive byte counts, measured from `spans[start_index][0]`. Tokens of
    zero bytes add no new boundary (no prediction can stop between them).
  """
  if not 0 <= start_index < len(spans):
    raise ValueError(
        f"start_index={start_index} is outside the document's {len(spans)} tokens")
  if max_tokens < 1:
    raise ValueError(f"max_tokens={max_tokens} must be >= 1")
  origin = spans[start_index][0]
  out: list[int] = []
  prev_end = origin
  for start, end in spans[start_index:start_index + max_tokens]:
    if start != prev_end or end < start:
      raise ValueError(
          f"token spans must tile the document bytes; got span ({start}, {end}) after a token "
          f"ending at {prev_end}. Use Tokenizer.encode_with_byte_spans")
    prev_end = end
    if end - origin > (out[-1] if out else 0):
      out.append(end - origin)
  return out


def completion_and_boundaries(doc_bytes: bytes, spans: Sequence[tuple[int, int]],
                              position: int, max_tokens: int = 8) -> tuple[bytes, list[int]]:
  """Ground truth for predicting token `position` of a document.

  Returns:
    (completion, boundaries): completion is the document's bytes from token `position` on,
    truncated to the last boundary (longer ground truth cannot change any reward above);
    boundaries as in `boundaries_from_spans`.
  """
  _check_completion(doc_bytes)
  if not spans or spans[-1][1] != len(doc_bytes) or spans[0][0] != 0:
    raise ValueError(
        f"spans do not cover this document's {len(doc_bytes)} bytes (first/last span "
        f"{spans[0] if spans else None}/{spans[-1] if spans else None}); they must come from "
        "tokenising the same text")
  boundaries = boundaries_from_spans(spans, position, max_tokens)
  start = spans[position][0]
  end = start + (boundaries[-1] if boundaries else 0)
  return bytes(doc_bytes[start:end]), boundaries
