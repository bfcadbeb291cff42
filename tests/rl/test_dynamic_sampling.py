"""Dynamic sampling: spread detection by hand, batch filling across candidates, inert padding."""

import numpy as np
import pytest

from rpt_jax.rl.dynamic_sampling import DynamicSampler, groups_with_spread
from rpt_jax.rl.update import RolloutBatch

G = 2


def _candidate(tag: int, num_contexts: int, rewards):
  """A batch whose every entry encodes (tag, context) so selections can be read back."""
  ctx = np.arange(num_contexts)
  rows = np.repeat(ctx, G)
  return RolloutBatch(
      prompt_tokens=np.stack([np.full(3, 100 * tag + c) for c in ctx]).astype(np.int32),
      prompt_lengths=np.full(num_contexts, 3, np.int32),
      completion_tokens=np.stack([np.full(4, 100 * tag + c) for c in rows]).astype(np.int32),
      completion_mask=np.ones((num_contexts * G, 4), np.int32),
      advantages=np.linspace(-1, 1, num_contexts * G).astype(np.float32)), np.asarray(rewards)


def test_groups_with_spread_by_hand():
  rewards = np.array([0, 0, 1, 0, 1, 1, 0.5, 0.25, np.nan, 1])
  np.testing.assert_array_equal(groups_with_spread(rewards, 2), [False, True, False, True, False])
  np.testing.assert_array_equal(groups_with_spread(np.array([1, 1, 1, 0, 0, 0]), 3),
                                [False, False])
  with pytest.raises(ValueError, match="groups of group_size=4"):
    groups_with_spread(np.zeros(6), 4)


def test_fill_takes_spread_groups_across_candidates_lazily():
  consumed = []

  def candidates():
    specs = [(0, [0, 0, 1, 0, 1, 1]),   # only context 1 has spread
             (1, [0, 1, 1, 1, 1, 0]),   # contexts 0 and 2
             (2, [0, 1, 0, 1, 0, 1])]   # never needed
    for tag, rewards in specs:
      consumed.append(tag)
      yield _candidate(tag, 3, rewards)

  sampler = DynamicSampler(batch_contexts=3, group_size=G, from_step=10, max_tries=4)
  assert not sampler.active(9) and sampler.active(10)
  out = sampler.fill(candidates(), step=10)
  assert consumed == [0, 1] and out.tries == 2 and out.filled
  np.testing.assert_array_equal(out.source, [[0, 1], [1, 0], [1, 2]])
  np.testing.assert_array_equal(out.batch.prompt_tokens[:, 0], [1, 100, 102])
  np.testing.assert_array_equal(out.batch.completion_tokens[:, 0], [1, 1, 100, 100, 102, 102])
  np.testing.assert_array_equal(out.rewards, [1, 0, 0, 1, 1, 0])
  # Advantages travel with their rows (candidate 0 rows 2-3; candidate 1 rows 0-1 and 4-5).
  adv = np.linspace(-1, 1, 6).astype(np.float32)
  np.testing.assert_array_equal(out.batch.advantages, adv[[2, 3, 0, 1, 4, 5]])
  assert (out.num_seen, out.num_dropped, out.num_padded) == (6, 3, 0)
  assert out.metrics()["dynamic_sampling/dropped_fraction"] == pytest.approx(3 / 6)


def test_unfilled_batch_is_padded_with_inert_groups_after_max_tries():
  cands = [_candidate(0, 3, [0, 0, 1, 0, 1, 1]), _candidate(1, 3, [0, 0, 1, 1, 0, 0]),
           _candidate(2, 3, [0, 1, 0, 1, 0, 1])]
  out = DynamicSampler(batch_contexts=3, group_size=G, max_tries=2).fill(iter(cands), step=0)
  assert out.tries == 2 and not out.filled and out.num_padded == 2
  np.testing.assert_array_equal(out.padded, [False, True, True])
  np.testing.assert_array_equal(out.source, [[0, 1], [0, 0], [0, 2]])  # copies of dropped groups
  assert out.batch.prompt_tokens.shape == (3, 3) and out.batch.completion_mask.shape == (6, 4)
  np.testing.assert_array_equal(out.batch.completion_mask.sum(1), [4, 4, 0, 0, 0, 0])
  np.testing.assert_array_equal(out.batch.advantages[2:], 0.0)


def test_inactive_sampler_passes_the_first_candidate_through():
  cand = _candidate(0, 3, [0, 0, 0, 0, 1, 1])
  out = DynamicSampler(batch_contexts=3, group_size=G, from_step=500).fill(
      iter([cand, _candidate(1, 3, [0, 1] * 3)]), step=3)
  assert out.batch is cand[0] and out.filled and out.tries == 1 and out.num_dropped == 0


def test_bad_inputs_name_the_problem():
  with pytest.raises(ValueError, match="max_tries=0"):
    DynamicSampler(batch_contexts=2, group_size=G, max_tries=0)
  sampler = DynamicSampler(batch_contexts=2, group_size=G)
  with pytest.raises(ValueError, match=r"expected \(4,\)"):
    sampler.fill(iter([_candidate(0, 2, [0, 1, 0])]), step=0)
  with pytest.raises(ValueError, match="iterator was empty"):
    sampler.fill(iter([]), step=0)
