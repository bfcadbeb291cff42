"""Advantage estimators vs numpy loops and hand-worked numbers."""

import numpy as np
import pytest

from rpt_jax.rl import loss as loss_lib
from rpt_jax.rl.advantages import ADVANTAGE_ESTIMATORS, group_advantages


def _numpy_advantages(rewards, g, estimator, eps):
  out = np.zeros(len(rewards))
  for start in range(0, len(rewards), g):
    grp = np.asarray(rewards[start:start + g], np.float64)
    for i in range(g):
      if estimator == "grpo":
        mean = sum(grp) / g
        std = np.sqrt(sum((x - mean) ** 2 for x in grp) / g)
        out[start + i] = (grp[i] - mean) / (std + eps)
      elif estimator == "drgrpo":
        out[start + i] = grp[i] - sum(grp) / g
      elif estimator == "rloo":
        out[start + i] = grp[i] - (sum(grp) - grp[i]) / (g - 1)
  return out


@pytest.mark.parametrize("estimator", ["grpo", "drgrpo", "rloo"])
def test_estimators_match_numpy(estimator):
  rng = np.random.default_rng(0)
  g = 4
  rewards = np.concatenate([
      rng.integers(0, 2, 8).astype(np.float32),   # binary, as the prefix reward
      rng.uniform(size=8).astype(np.float32),     # dense reward
      np.ones(4, np.float32)])                    # a zero-spread group
  got = np.asarray(group_advantages(rewards, g, estimator=estimator))
  np.testing.assert_allclose(got, _numpy_advantages(rewards, g, estimator, 1e-6),
                             rtol=1e-5, atol=1e-5)
  assert got.dtype == np.float32 and got.shape == rewards.shape


def test_hand_worked_group():
  rewards = np.array([1.0, 0.0, 0.0, 0.0], np.float32)
  # mean 0.25, population std sqrt(0.25 * 0.75) = 0.4330127.
  np.testing.assert_allclose(group_advantages(rewards, 4, "grpo", eps=0.0),
                             [0.75 / 0.4330127, -0.25 / 0.4330127, -0.25 / 0.4330127,
                              -0.25 / 0.4330127], rtol=1e-6)
  np.testing.assert_allclose(group_advantages(rewards, 4, "drgrpo"), [0.75, -0.25, -0.25, -0.25])
  np.testing.assert_allclose(group_advantages(rewards, 4, "rloo"),
                             [1.0, -1 / 3, -1 / 3, -1 / 3], rtol=1e-6)
  # Equal rewards carry no signal under every estimator.
  for name in ("grpo", "drgrpo", "rloo"):
    np.testing.assert_array_equal(group_advantages(np.full(4, 0.7, np.float32), 4, name), 0.0)


def test_errors_and_registry():
  with pytest.raises(ValueError, match="groups of 3"):
    group_advantages(np.zeros(8), 3)
  with pytest.raises(ValueError, match="unknown advantage estimator"):
    group_advantages(np.zeros(8), 4, estimator="ppo")
  with pytest.raises(ValueError, match="rloo"):
    group_advantages(np.zeros(8), 1, estimator="rloo")
  with pytest.raises(ValueError, match="1-D"):
    group_advantages(np.zeros((2, 4)), 4)
  assert {"grpo", "drgrpo", "rloo"} <= set(ADVANTAGE_ESTIMATORS)
  # The contract names loss.py as the home of the registry: the re-export is the same object.
  assert loss_lib.ADVANTAGE_ESTIMATORS is ADVANTAGE_ESTIMATORS
  assert loss_lib.group_advantages is group_advantages
