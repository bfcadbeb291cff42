"""Tests for rpt_jax/rl/reward.py against hand-worked cases (bytes, boundaries, variants)."""

import dataclasses
import math

import numpy as np
import pytest

from rpt_jax.rl import reward as reward_lib
from rpt_jax.rl.reward import (REWARDS, boundaries_from_spans, completion_and_boundaries,
                               dense_reward, first_token_reward, get_reward,
                               prefix_matching_reward, score_rollouts)

# "é世界" = c3 a9 | e4 b8 96 | e7 95 8c, tokenised as ["é", "世", "界"].
CJK = "é世界".encode("utf-8")
assert CJK == b"\xc3\xa9\xe4\xb8\x96\xe7\x95\x8c"
# "世界" with 世 byte-fallback tokenised as <0xE4><0xB8><0x96>, then "界": boundaries 1, 2, 3, 6.
FALLBACK = "世界".encode("utf-8")
PARA = b" para graph is"  # tokens [" para", " graph", " is"]

# (prediction, completion, boundaries, prefix_match, first_token), all worked by hand.
CASES = [
    ("é", CJK, [2, 5, 8], 1, 1),
    ("é世", CJK, [2, 5, 8], 1, 0),              # two tokens exactly
    ("é世界", CJK, [2, 5, 8], 1, 0),
    ("é世界!", CJK, [2, 5, 8], 0, 0),            # longer than the completion
    ("e", CJK, [2, 5, 8], 0, 0),                 # 1 byte, but not "é"'s first byte
    ("世", CJK, [2, 5, 8], 0, 0),                # right bytes length 3, wrong place
    ("世", FALLBACK, [1, 2, 3, 6], 1, 0),        # ends on a fallback boundary
    ("世界", FALLBACK, [1, 2, 3, 6], 1, 0),
    ("\udce4", FALLBACK, [1, 2, 3, 6], 1, 1),    # raw byte 0xE4 as surrogateescape
    ("\udce4\udcb8", FALLBACK, [1, 2, 3, 6], 1, 0),
    (b"\xe4", FALLBACK, [1, 2, 3, 6], 1, 1),     # bytes prediction
    ("\ufffd", FALLBACK, [1, 2, 3, 6], 0, 0),    # what a lossy decode of 0xE4 gives
    ("\ud800", FALLBACK, [1, 2, 3, 6], 0, 0),    # unencodable lone surrogate: no crash
    (" para", PARA, [5, 11, 14], 1, 1),          # leading space is part of the token
    ("para", PARA, [5, 11, 14], 0, 0),           # missing the space
    (" par", PARA, [5, 11, 14], 0, 0),           # stops inside a token
    (" para graph", PARA, [5, 11, 14], 1, 0),    # correct two-token prediction
    (" para gr", PARA, [5, 11, 14], 0, 0),
    (" para graph is", PARA, [5, 11, 14], 1, 0),
    (" para graph is.", PARA, [5, 11, 14], 0, 0),
    (" para graph", PARA, [5], 0, 0),            # right text, beyond the counted tokens
    (" Para", PARA, [5, 11, 14], 0, 0),          # case matters
    ("", PARA, [5, 11, 14], 0, 0),               # empty prediction
    (None, PARA, [5, 11, 14], 0, 0),             # no prediction
    (" para", PARA, [], 0, 0),                   # no boundaries: nothing can score
    (" para", PARA, np.array([5, 11, 14]), 1, 1),
]


@pytest.mark.parametrize("prediction,completion,boundaries,prefix,first", CASES)
def test_reward_table(prediction, completion, boundaries, prefix, first):
  assert prefix_matching_reward(prediction, completion, boundaries) == prefix
  assert first_token_reward(prediction, completion, boundaries) == first
  # dense: 1 when prefix matching is right, otherwise the given probability.
  assert dense_reward(prediction, completion, boundaries, 0.25) == (1.0 if prefix else 0.25)


def test_completion_must_be_bytes():
  with pytest.raises(ValueError, match="must be bytes"):
    prefix_matching_reward(" para", " para", [5])


def test_registry():
  assert set(REWARDS) >= {"prefix_match", "first_token", "dense"}
  assert get_reward("dense").needs_first_token_prob
  with pytest.raises(ValueError, match=r"unknown reward 'exact'.*'dense'.*'first_token'"):
    get_reward("exact")
  with pytest.raises(ValueError, match="already registered"):
    reward_lib.register_reward("dense", lambda *a: (0.0, False))


RESPONSES = [
    "think</think>\\boxed{ para}",           # next token: 1
    "think</think>\\boxed{ para graph}",     # two tokens: 1 (first_token: 0)
    "think</think>\\boxed{ par}",            # inside a token: 0
    "think \\boxed{ para}",                  # no </think>: 0, no prediction
    "think</think>\\boxed{}",                # empty box: 0, counted as no prediction
    "</think>\\boxed{é}",                    # other row's ground truth: 1
]
COMPLETIONS = [PARA] * 5 + [CJK]
BOUNDARIES = [[5, 11, 14]] * 5 + [[2, 5, 8]]
PROBS = np.array([0.5, 0.1, 0.2, 0.4, 0.0, 0.9])


def test_score_rollouts_prefix_match_metrics():
  batch = score_rollouts(RESPONSES, COMPLETIONS, BOUNDARIES,
                         response_lengths=[10, 20, 30, 40, 50, 60])
  assert batch.rewards.dtype == np.float32 and batch.has_prediction.dtype == bool
  np.testing.assert_array_equal(batch.rewards, [1, 1, 0, 0, 0, 1])
  np.testing.assert_array_equal(batch.has_prediction, [1, 1, 1, 0, 0, 1])
  assert batch.predictions == (" para", " para graph", " par", None, "", "é")
  m = batch.metrics()
  assert m == pytest.approx({"format_rate": 4 / 6, "accuracy": 3 / 6, "mean_reward": 3 / 6,
                             "mean_response_length": 35.0})


def test_score_rollouts_first_token_and_dense():
  first = score_rollouts(RESPONSES, COMPLETIONS, BOUNDARIES, reward="first_token")
  np.testing.assert_array_equal(first.rewards, [1, 0, 0, 0, 0, 1])
  assert first.metrics()["accuracy"] == pytest.approx(2 / 6)
  assert math.isnan(first.metrics()["mean_response_length"])

  dense = score_rollouts(RESPONSES, COMPLETIONS, BOUNDARIES, reward="dense",
                         first_token_probs=PROBS)
  np.testing.assert_allclose(dense.rewards, [1, 1, 0.2, 0.4, 0.0, 1], rtol=0, atol=1e-7)
  m = dense.metrics()
  assert m["accuracy"] == pytest.approx(3 / 6)  # share of exact hits, not of reward mass
  assert m["mean_reward"] == pytest.approx((3 + 0.2 + 0.4) / 6, abs=1e-6)


def test_score_rollouts_rlp_and_components():
  """RLP: the reward is the given information gain whatever the answer; `correct` is still the
  prefix match; components are logged as their means."""
  gains = np.array([0.5, -1.25, 2.0, 0.0, -0.5, 3.0])
  rlp = score_rollouts(RESPONSES, COMPLETIONS, BOUNDARIES, reward="rlp",
                       information_gains=gains)
  np.testing.assert_allclose(rlp.rewards, gains, rtol=0, atol=1e-7)
  prefix = score_rollouts(RESPONSES, COMPLETIONS, BOUNDARIES)
  np.testing.assert_array_equal(rlp.correct, prefix.correct)
  m = dataclasses.replace(rlp, components={"information_gain": gains}).metrics()
  assert m["information_gain"] == pytest.approx(gains.mean())
  with pytest.raises(ValueError, match="needs information_gains"):
    score_rollouts(RESPONSES, COMPLETIONS, BOUNDARIES, reward="rlp")
  with pytest.raises(ValueError, match="finite"):
    score_rollouts(RESPONSES, COMPLETIONS, BOUNDARIES, reward="rlp",
                   information_gains=gains * np.nan)


def test_score_rollouts_errors():
  with pytest.raises(ValueError, match="needs first_token_probs"):
    score_rollouts(RESPONSES, COMPLETIONS, BOUNDARIES, reward="dense")
  with pytest.raises(ValueError, match="shape"):
    score_rollouts(RESPONSES, COMPLETIONS, BOUNDARIES, reward="dense",
                   first_token_probs=PROBS[:3])
  with pytest.raises(ValueError, match=r"\[0, 1\]"):
    score_rollouts(RESPONSES, COMPLETIONS, BOUNDARIES, reward="dense",
                   first_token_probs=PROBS * 2)
  with pytest.raises(ValueError, match="completions has 5 rows"):
    score_rollouts(RESPONSES, COMPLETIONS[:5], BOUNDARIES)
  with pytest.raises(ValueError, match="unknown reward"):
    score_rollouts(RESPONSES, COMPLETIONS, BOUNDARIES, reward="nope")
  empty = score_rollouts([], [], []).metrics()
  assert all(math.isnan(v) for v in empty.values())


# "Hello wörld!" tokenised as ["Hello", " w", "ö", "rld", "!"]: 5, 2, 2, 3, 1 bytes.
DOC = "Hello wörld!".encode("utf-8")
SPANS = [(0, 5), (5, 7), (7, 9), (9, 12), (12, 13)]


def test_boundaries_from_spans():
  assert b"".join(DOC[s:e] for s, e in SPANS) == DOC
  assert boundaries_from_spans(SPANS, 1, 3) == [2, 4, 7]
  assert boundaries_from_spans(SPANS, 1, 100) == [2, 4, 7, 8]  # clipped at the document end
  assert boundaries_from_spans(SPANS, 0, 1) == [5]
  assert boundaries_from_spans(SPANS, 4, 8) == [1]
  # A zero-byte token adds no boundary.
  assert boundaries_from_spans([(0, 5), (5, 5), (5, 7)], 1, 8) == [2]
  with pytest.raises(ValueError, match="outside"):
    boundaries_from_spans(SPANS, 5, 8)
  with pytest.raises(ValueError, match="max_tokens"):
    boundaries_from_spans(SPANS, 0, 0)
  with pytest.raises(ValueError, match="tile"):
    boundaries_from_spans([(0, 5), (6, 7)], 0, 8)


def test_completion_and_boundaries_feed_the_reward():
  completion, boundaries = completion_and_boundaries(DOC, SPANS, 1, max_tokens=3)
  assert completion == b" w\xc3\xb6rld" and boundaries == [2, 4, 7]
  assert completion_and_boundaries(DOC, SPANS, 1) == (b" w\xc3\xb6rld!", [2, 4, 7, 8])
  for prediction, expected in [(" w", 1), (" wö", 1), (" wörld", 1), (" wörl", 0), (" wo", 0),
                               (" wör", 0), (" wörld!", 0)]:
    assert prefix_matching_reward(prediction, completion, boundaries) == expected, prediction
  with pytest.raises(ValueError, match="do not cover"):
    completion_and_boundaries(DOC + b"x", SPANS, 1)
