"""Top-k entropy, the proxy scorer (windowed, sharded), filters and buckets vs numpy by hand."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rpt_jax import mesh as mesh_lib
from rpt_jax.data import filtering


def np_topk_entropy(logits, k):
  """Independent reference: sort, keep the k largest, softmax, -sum p log p (float64)."""
  top = -np.sort(-np.asarray(logits, np.float64), axis=-1)[..., :k]
  top = top - top.max(axis=-1, keepdims=True)
  p = np.exp(top) / np.exp(top).sum(axis=-1, keepdims=True)
  return -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), axis=-1)


def test_topk_entropy_matches_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 5, 50)).astype(np.float32) * 3
  np.testing.assert_allclose(filtering.topk_entropy(jnp.asarray(logits), 16),
                             np_topk_entropy(logits, 16), rtol=1e-5, atol=1e-6)


def test_topk_entropy_ties_uniform_and_small_vocab():
  # 20 equal logits: the top 16 are uniform whichever tied ids are picked -> log(16).
  assert float(filtering.topk_entropy(jnp.zeros(20), 16)) == pytest.approx(np.log(16), abs=1e-6)
  # Ties straddling the k-th place: values matter, not which tied id is kept.
  tied = np.array([5.0] * 3 + [1.0] * 20 + [-2.0] * 5, np.float32)
  want = np_topk_entropy(tied, 16)  # 3 x 5.0 and 13 x 1.0
  by_hand = -np.sum([p * np.log(p) for p in
                     np.r_[[np.e ** 5] * 3, [np.e] * 13] / (3 * np.e ** 5 + 13 * np.e)])
  assert want == pytest.approx(by_hand, abs=1e-12)
  assert float(filtering.topk_entropy(jnp.asarray(tied), 16)) == pytest.approx(want, abs=1e-6)
  # V < k: the full-softmax entropy over all V logits.
  small = np.array([2.0, 0.5, -1.0, 0.0, 1.0], np.float32)
  p = np.exp(small) / np.exp(small).sum()
  assert float(filtering.topk_entropy(jnp.asarray(small), 16)) == pytest.approx(
      -np.sum(p * np.log(p)), abs=1e-6)
  # A one-hot-like row (masked vocabulary at -inf) has entropy 0, not NaN.
  masked = jnp.asarray([3.0] + [-jnp.inf] * 30)
  assert float(filtering.topk_entropy(masked, 16)) == 0.0


# Hand-made scores: position:   0       1     2     3     4     5     6     7
ENTROPY = np.array([np.nan, 0.2, 0.6, 1.2, 0.0, 2.0, 0.9, 1.6], np.float32)
CORRECT = np.array([False, True, False, True, False, False, True, False])


def select(name, **kw):
  kw = {"threshold": 0.9, "min_context_tokens": 2, "rng": filtering.document_rng(0, 7), **kw}
  return filtering.select_positions(ENTROPY, CORRECT, filter_name=name, **kw).tolist()


def test_filters_keep_exactly_the_right_positions():
  assert select("entropy") == [3, 5, 6, 7]          # entropy >= 0.9 and t >= 2
  assert select("entropy", min_context_tokens=4) == [5, 6, 7]
  assert select("entropy", min_context_tokens=0) == [3, 5, 6, 7]  # t = 0 is never eligible
  assert select("proxy_miss") == [2, 4, 5, 7]       # argmax wrong and t >= 2
  assert select("all") == [2, 3, 4, 5, 6, 7]
  rand = select("random")
  assert len(rand) == 4 and set(rand) <= {2, 3, 4, 5, 6, 7} and rand == sorted(rand)
  assert rand == select("random")                   # seeded
  draws = {tuple(select("random", rng=filtering.document_rng(0, d))) for d in range(20)}
  assert len(draws) > 1                             # a different draw per document
  capped = select("entropy", max_positions=2)
  assert len(capped) == 2 and set(capped) <= {3, 5, 6, 7}
  with pytest.raises(ValueError, match="unknown position filter 'nope'"):
    select("nope")


def test_difficulty_buckets_are_nested_counts():
  buckets = filtering.difficulty_buckets(ENTROPY, (0.5, 1.0, 1.5))
  assert buckets.tolist() == [0, 0, 1, 2, 0, 3, 1, 3]
  assert filtering.difficulty_buckets(np.array([0.5, 1.0, 1.5, 1.5001])).tolist() == [0, 1, 2, 3]


def test_document_windows_by_hand():
  ws = filtering.document_windows(40, seq_len=16, overlap=4)
  assert [(w.start, w.end, w.first_target) for w in ws] == [(0, 16, 1), (12, 28, 16),
                                                            (24, 40, 28)]
  assert filtering.document_windows(1, 16, 4) == []
  with pytest.raises(ValueError, match="overlap"):
    filtering.document_windows(10, 8, 8)


def reference_scores(forward, ids, seq_len, overlap):
  """Per position t: the model's prediction for t from the documented context ids[s:t].

  The context of t starts at s = 0 when t < seq_len, else at the start of the latest window
  whose first new target is <= t: ((t - seq_len) // stride + 1) * stride. `forward` maps
  [1, seq_len] tokens to logits; rows before the zero padding are exact since the model is causal.
  """
  stride = seq_len - overlap
  ent, arg = np.full(len(ids), np.nan), np.full(len(ids), -1)
  by_start = {}
  for t in range(1, len(ids)):
    s = 0 if t < seq_len else ((t - seq_len) // stride + 1) * stride
    assert t - s == t or overlap <= t - s <= seq_len - 1
    by_start.setdefault(s, []).append(t)
  for s, ts in by_start.items():
    row = np.zeros((1, seq_len), np.int32)
    row[0, :max(ts) - s] = ids[s:max(ts)]
    logits = forward(row)[0]
    for t in ts:
      ent[t], arg[t] = np_topk_entropy(logits[t - s - 1], 16), np.argmax(logits[t - s - 1])
  return ent, arg


@pytest.mark.parametrize("logits_chunk", [None, 8])
def test_score_documents_windows_match_reference(proxy, tokenizer, reference_forward,
                                                 logits_chunk):
  rng = np.random.default_rng(1)
  docs = [rng.integers(3, tokenizer.vocab_size, n).astype(np.int32) for n in (5, 40, 1, 23)]
  scorer = filtering.make_proxy_scorer(proxy, batch_size=2, seq_len=16,
                                       logits_chunk=logits_chunk)
  out = list(filtering.score_documents(scorer, docs, overlap=4, pad_id=tokenizer.pad_id))
  assert [i for i, _, _ in out] == [0, 1, 2, 3]
  spread = []
  for (i, ent, arg), ids in zip(out, docs):
    want_ent, want_arg = reference_scores(reference_forward, ids, 16, 4)
    np.testing.assert_allclose(ent, want_ent, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(arg, want_arg)
    spread += ent[1:].tolist()
  assert np.std(spread) > 0.2  # the sharpened proxy gives a real range of entropies


def test_sharded_scorer_matches_unsharded(proxy, tokenizer):
  from flax import nnx

  tokens = np.random.default_rng(2).integers(3, tokenizer.vocab_size, (8, 16))
  mask = np.ones((8, 16), np.int32)
  mask[3, 10:] = 0
  ent0, arg0 = filtering.make_proxy_scorer(proxy, batch_size=8, seq_len=16)(tokens, mask)
  mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(data=2, fsdp=2, tensor=2))
  sharded = nnx.clone(proxy)
  state = nnx.state(sharded)
  nnx.update(sharded, jax.device_put(state, mesh_lib.state_shardings(state, mesh)))
  scorer = filtering.make_proxy_scorer(sharded, batch_size=8, seq_len=16, mesh=mesh)
  ent1, arg1 = scorer(tokens, mask)
  assert ent1.sharding.spec[0] == ("data", "fsdp")
  np.testing.assert_allclose(np.asarray(ent1), np.asarray(ent0), rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(arg1), np.asarray(arg0))
  assert np.isnan(np.asarray(ent1)[:, 0]).all() and (np.asarray(arg1)[:, 0] == -1).all()
  with pytest.raises(ValueError, match="divisible by the mesh's data x fsdp size 4"):
    filtering.make_proxy_scorer(proxy, batch_size=6, seq_len=16, mesh=mesh)
