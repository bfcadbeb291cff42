"""Dynamic sampling: the choice of groups against a plain-Python reference, the device gather
against numpy indexing (unsharded and on 8 devices), and the trainer using exactly these two."""

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from rpt_jax import mesh as mesh_lib
from rpt_jax.rl import dynamic_sampling as ds
from rpt_jax.rl.rpt_config import RPTConfig
from rpt_jax.rl.update import RolloutBatch

G = 2


def reference_choice(candidate_rewards, g, active):
  """The rule written out directly: groups whose G rewards differ (and hold no NaN), in
  candidate order, the first B of them; missing slots copy dropped groups in turn (kept ones if
  nothing was dropped) and are padding."""
  b = len(candidate_rewards[0]) // g
  if not active:
    return [(0, i) for i in range(b)], [False] * b
  kept, dropped = [], []
  for k, rewards in enumerate(candidate_rewards):
    for i in range(b):
      group = list(rewards[i * g:(i + 1) * g])
      spread = max(group) > min(group) and not any(np.isnan(group))
      (kept if spread else dropped).append((k, i))
  kept = kept[:b]
  pads = dropped or kept
  source = kept + [pads[j % len(pads)] for j in range(b - len(kept))]
  return source, [j >= len(kept) for j in range(b)]


def _candidate(tag: int, num_contexts: int):
  """A batch whose every entry encodes (tag, context or row) so selections can be read back."""
  rows = num_contexts * G
  return RolloutBatch(
      prompt_tokens=(100 * tag + np.arange(num_contexts)[:, None] + np.zeros((1, 3))).astype(
          np.int32),
      prompt_lengths=np.full(num_contexts, 3, np.int32),
      completion_tokens=(100 * tag + np.arange(rows)[:, None] + np.zeros((1, 4))).astype(
          np.int32),
      completion_mask=np.ones((rows, 4), np.int32),
      advantages=(tag + np.linspace(-1, 1, rows)).astype(np.float32))


def test_groups_with_spread_by_hand():
  rewards = np.array([0, 0, 1, 0, 1, 1, 0.5, 0.25, np.nan, 1])
  np.testing.assert_array_equal(ds.groups_with_spread(rewards, 2),
                                [False, True, False, True, False])
  np.testing.assert_array_equal(ds.groups_with_spread(np.array([1, 1, 1, 0, 0, 0]), 3),
                                [False, False])
  with pytest.raises(ValueError, match="groups of group_size=4"):
    ds.groups_with_spread(np.zeros(6), 4)


def test_choice_equals_the_reference_on_random_rewards():
  rng = np.random.default_rng(0)
  for case in range(300):
    b, g, tries = rng.integers(1, 6), rng.integers(2, 5), rng.integers(1, 5)
    # Sparse rewards (as RPT's): many all-zero groups, some NaN.
    rewards = [rng.choice([0.0, 0.0, 0.0, 1.0, np.nan], p=[.3, .3, .2, .19, .01], size=b * g)
               for _ in range(tries)]
    active = bool(case % 5)
    choice = ds.choose_groups(rewards, g, active=active)
    source, padded = reference_choice(rewards, g, active)
    np.testing.assert_array_equal(choice.source, np.asarray(source).reshape(b, 2), str(case))
    np.testing.assert_array_equal(choice.padded, padded)
    assert choice.filled == (not any(padded))
    assert choice.is_first_candidate == (source == [(0, i) for i in range(b)] and
                                         not any(padded))


def test_choice_by_hand_and_its_metrics():
  rewards = [[0, 0, 1, 0, 1, 1],   # only context 1 has spread
             [0, 1, 1, 1, 1, 0]]   # contexts 0 and 2
  choice = ds.choose_groups(rewards, G, active=True)
  np.testing.assert_array_equal(choice.source, [[0, 1], [1, 0], [1, 2]])
  assert choice.filled and not choice.is_first_candidate
  assert choice.metrics() == {"dynamic_sampling/tries": 2.0,
                              "dynamic_sampling/dropped_fraction": 3 / 6,
                              "dynamic_sampling/padded_groups": 0.0,
                              "dynamic_sampling/filled": 1.0}
  assert ds.enough_groups(rewards, G) and not ds.enough_groups(rewards[:1], G)
  contexts, rows, keep = choice.rows(G)
  np.testing.assert_array_equal(contexts, [1, 3, 5])  # candidate k context c -> k*B + c
  np.testing.assert_array_equal(rows, [2, 3, 6, 7, 10, 11])
  np.testing.assert_array_equal(keep, 1.0)


def _gathered_by_numpy(candidates, choice):
  """The chosen groups picked out of each candidate with numpy, padding zeroed."""
  parts = []
  for (k, c), pad in zip(choice.source, choice.padded):
    cand = candidates[k]
    rows = slice(c * G, (c + 1) * G)
    parts.append((cand.prompt_tokens[c], cand.prompt_lengths[c],
                  cand.completion_tokens[rows], cand.completion_mask[rows] * (not pad),
                  cand.advantages[rows] * (not pad)))
  return [np.stack([p[i] for p in parts]) if i < 2 else np.concatenate([p[i] for p in parts])
          for i in range(5)]


@pytest.mark.parametrize("sharded", [False, True])
def test_device_gather_equals_numpy(sharded):
  b = 8
  rewards = [np.r_[[0, 1] * 3, [0, 0] * 5], np.r_[[1, 1] * 6, [1, 0] * 2], np.zeros(b * G)]
  candidates = [_candidate(k, b) for k in range(3)]
  choice = ds.choose_groups(rewards, G, active=True)
  assert not choice.filled and choice.padded.sum() == 3
  index = choice.rows(G)
  if sharded:
    mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(data=1, fsdp=8, tensor=1))
    batch = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    gather = jax.jit(ds.gather_groups, out_shardings=batch)
    candidates_in = jax.device_put(candidates, batch)
  else:
    gather, candidates_in = jax.jit(ds.gather_groups), candidates
  out = gather(candidates_in, *index)
  want = _gathered_by_numpy(candidates, choice)
  got = [out.prompt_tokens, out.prompt_lengths, out.completion_tokens, out.completion_mask,
         out.advantages]
  for name, g, w in zip(("prompt", "length", "completion", "mask", "advantage"), got, want):
    np.testing.assert_array_equal(np.asarray(g), w, name)


def test_trainer_assembles_with_choose_and_gather(monkeypatch):
  """The loop's path is the tested one: RPTTrainer.assemble calls choose_groups and
  gather_groups (no second implementation)."""
  from rpt_jax import train
  calls = []
  real_choose = ds.choose_groups
  monkeypatch.setattr(ds, "choose_groups",
                      lambda *a, **k: calls.append("choose") or real_choose(*a, **k))
  trainer = train.RPTTrainer.__new__(train.RPTTrainer)  # Only what assemble reads.
  trainer.G = G
  trainer.config = RPTConfig(steps=1, batch_contexts=2, dynamic_sampling_from_step=0)
  trainer.mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(data=1, fsdp=2, tensor=1),
                                    devices=jax.devices()[:2])
  trainer.batch_sharding = NamedSharding(trainer.mesh, PartitionSpec(("data", "fsdp")))
  trainer._gather = jax.jit(ds.gather_groups, out_shardings=trainer.batch_sharding)
  scored = [type("S", (), {"rewards": np.array(r, np.float32)})()
            for r in ([0, 0, 1, 0], [0, 1, 1, 1])]
  candidates = [(_candidate(k, 2), s) for k, s in enumerate(scored)]
  batch, choice = trainer.assemble(candidates, step=0)
  assert calls == ["choose"]
  np.testing.assert_array_equal(choice.source, [[0, 1], [1, 0]])
  want = _gathered_by_numpy([c for c, _ in candidates], choice)
  np.testing.assert_array_equal(np.asarray(batch.completion_tokens), want[2])


def test_bad_inputs_name_the_problem():
  with pytest.raises(ValueError, match=r"every candidate holds B=2 contexts x G=2 rows \(4,\)"):
    ds.choose_groups([np.zeros(4), np.zeros(6)], G, active=True)
  with pytest.raises(ValueError, match="no candidate"):
    ds.choose_groups([], G, active=True)
