"""SlotEngine against the static Sampler (the reference: its rows are checked against HF generate
and teacher-forced log-probs in test_sampler.py), on a tiny random HF Qwen2 model in fp32: same
tokens and log-probs for any slot count, prefill batch, chunk length and mesh; one compile
across refills; over-sampling returns whole groups and their staleness."""
import jax
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from rpt_jax import mesh as mesh_lib
from rpt_jax.model import hf_io
from rpt_jax.rl.engine import SlotEngine
from rpt_jax.rl.sampler import Sampler

VOCAB = 96
G = 2
# Seven right-padded prompts of mixed lengths (bucket 9).
LENGTHS = np.array([9, 4, 1, 7, 3, 9, 5], np.int32)


@pytest.fixture(scope="module")
def hf_path(tmp_path_factory):
  config = transformers.Qwen2Config(
      vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
      rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=None, eos_token_id=None,
      pad_token_id=0)
  torch.manual_seed(0)
  model = transformers.Qwen2ForCausalLM(config).eval()
  with torch.no_grad():  # O(1)-scale logits: distinct, non-degenerate samples.
    for name, p in model.named_parameters():
      if "embed" in name or "lm_head" in name:
        p.normal_(0.0, 0.5)
  path = str(tmp_path_factory.mktemp("qwen2"))
  model.save_pretrained(path)
  return path


@pytest.fixture(scope="module")
def model(hf_path):
  return hf_io.load_hf(hf_path)[0]


@pytest.fixture(scope="module")
def static(model):
  return Sampler(model)


def _prompts(lengths=LENGTHS, seed=0):
  tokens = np.random.RandomState(seed).randint(3, VOCAB, (len(lengths), 9)).astype(np.int32)
  tokens[np.arange(9)[None] >= lengths[:, None]] = 0
  return tokens, lengths


def _budgets(rows, seed=1):
  return np.random.RandomState(seed).randint(1, 14, rows).astype(np.int32)


@pytest.fixture(scope="module")
def case(static):
  """Prompts, per-row budgets, EOS ids that stop some rows early, and the static rollouts."""
  tokens, lengths = _prompts()
  budgets = _budgets(len(lengths) * G)
  kwargs = dict(num_samples=G, temperature=0.8, rng=jax.random.key(4))
  plain = np.asarray(static.generate(tokens, lengths, max_new_tokens=13, **kwargs).tokens)
  eos = (int(plain[0, 2]), int(plain[5, 4]))  # Rows 0 and 5 (at least) stop on an EOS id.
  kwargs.update(max_new_tokens=budgets, eos_ids=eos)
  want = static.generate(tokens, lengths, **kwargs)
  return tokens, lengths, kwargs, want


def _assert_same(got, want):
  np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))
  np.testing.assert_allclose(np.asarray(got.logprobs), np.asarray(want.logprobs), atol=1e-5,
                             rtol=0)
  np.testing.assert_array_equal(np.asarray(got.lengths), np.asarray(want.lengths))
  np.testing.assert_array_equal(np.asarray(got.done), np.asarray(want.done))


def test_case_has_eos_stops_budget_stops_and_sampling(case):
  _, _, kwargs, want = case
  lengths, done = np.asarray(want.lengths), np.asarray(want.done)
  assert done.sum() >= 2 and (~done).sum() >= 2
  assert (lengths[~done] == kwargs["max_new_tokens"][~done]).all()  # Budget stops.
  assert (lengths[done] < kwargs["max_new_tokens"][done]).any()  # EOS before the budget.
  assert len({tuple(r) for r in np.asarray(want.tokens)}) > 8


@pytest.mark.parametrize("slots,prefill_contexts,chunk_steps,live_prefix", [
    (2, 1, 1, True), (4, 1, 3, True), (4, 1, 3, False), (6, 2, 5, True), (5, 1, 16, True),
    (14, 3, 2, True), (32, 4, 4, True)])
def test_engine_equals_static_sampler(slots, prefill_contexts, chunk_steps, live_prefix, model,
                                      case):
  """Slot counts from one context at a time to all at once (5: one slot never used), prefill
  batches with dummy contexts, chunks of 1..16 steps: each gives another refill order; chunks
  decoded on the cache prefix their rows reach, or on the whole cache."""
  tokens, lengths, kwargs, want = case
  engine = SlotEngine(model, decode_slots=slots, prefill_contexts=prefill_contexts,
                      chunk_steps=chunk_steps, live_prefix=live_prefix)
  got = engine.generate(tokens, lengths, **kwargs)
  _assert_same(got, want)
  assert int(got.num_steps) == int(np.asarray(want.lengths).max())
  stats = engine.last_stats
  assert stats["tokens"] + stats["first_tokens"] == int(np.asarray(want.lengths).sum())
  assert 0 < stats["slot_utilization"] <= 1


def test_greedy_and_uniform_budget_equal_static(model, static):
  tokens, lengths = _prompts(seed=3)
  kwargs = dict(num_samples=G, max_new_tokens=7, temperature=0.0, rng=jax.random.key(0))
  got = SlotEngine(model, decode_slots=4, chunk_steps=3).generate(tokens, lengths, **kwargs)
  _assert_same(got, static.generate(tokens, lengths, **kwargs))


def test_sharded_engine_equals_unsharded(hf_path, model, case):
  tokens, lengths, kwargs, want = case
  mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(data=2, fsdp=2, tensor=2))
  sharded_model, _ = hf_io.load_hf(hf_path, mesh=mesh)
  engine = SlotEngine(sharded_model, decode_slots=8, prefill_contexts=2, chunk_steps=4,
                      mesh=mesh)
  got = engine.generate(tokens, lengths, **kwargs)
  assert got.tokens.sharding.spec == jax.sharding.PartitionSpec("data", None)  # 14 rows
  cache = engine.programs.state_shardings(8, 9 + 13).cache.k[0].spec
  assert cache == jax.sharding.PartitionSpec(("data", "fsdp"), "tensor", None, None)
  _assert_same(got, want)


@pytest.mark.parametrize("live_prefix", [False, True])
def test_one_compile_across_refills_data_and_weights(model, live_prefix):
  """Two calls of 7 contexts through 4 slots (G=2: at most 2 contexts in flight, so many
  refills), new prompts, budgets and weights, then the first call again: the admission and the
  chunk are traced once per slot-cache length they run at (one without live_prefix; at most
  LIVE_PREFIXES with it), and the repeated call traces nothing."""
  engine = SlotEngine(model, decode_slots=4, chunk_steps=3, live_prefix=live_prefix)
  kwargs = dict(num_samples=G, temperature=0.8, cache_tokens=13)
  for seed in (0, 1, 0):
    tokens, lengths = _prompts(seed=10 + seed)
    params = jax.tree.map(lambda x, s=seed: x * (1 + 0.05 * s), nnx.state(model))
    engine.generate(tokens, lengths, max_new_tokens=_budgets(len(lengths) * G, seed),
                    rng=jax.random.key(seed), params=params, **kwargs)
    assert engine.last_stats["admissions"] == len(lengths)
    if seed == 1:
      traced = dict(engine.trace_counts)
  lengths = {kind: {key[2] for key in engine._fns if key[0] == kind}  # pylint: disable=protected-access
             for kind in ("admit", "chunk")}
  assert dict(engine.trace_counts) == traced == {k: len(v) for k, v in lengths.items()}
  assert len(lengths["chunk"]) <= SlotEngine.LIVE_PREFIXES
  assert (len(lengths["chunk"]) > 1) == live_prefix
  assert live_prefix or lengths["admit"] == {9 + 13}  # the whole cache: prompt + cache_tokens
  for key, fn in engine._fns.items():  # pylint: disable=protected-access
    assert fn._cache_size() == 1, key  # pylint: disable=protected-access


def test_over_sampling_returns_whole_groups(model, case):
  """Abort after 3 of 7 groups: the 3 returned are whole and equal the static rows of their
  contexts; the other contexts are reported as dropped (in flight) or unstarted."""
  tokens, lengths, kwargs, want = case
  engine = SlotEngine(model, decode_slots=4, chunk_steps=2)
  got = engine.generate_groups(tokens, lengths, groups_needed=3, **kwargs)
  ids = got.context_ids
  assert len(ids) == 3 and got.output.tokens.shape[0] == 3 * G
  rows = (ids[:, None] * G + np.arange(G)).reshape(-1)
  _assert_same(got.output, jax.tree.map(lambda x: x[rows] if x.ndim else x, want))
  np.testing.assert_array_equal(got.prompt_tokens, tokens[ids])
  assert sorted([*ids, *got.dropped, *got.unstarted]) == list(range(len(lengths)))
  assert len(got.dropped) >= 1 and len(got.carried) == 0
  assert (got.staleness == 0).all()
  assert engine._state is None  # pylint: disable=protected-access  (slot cache freed)


def test_carried_partial_rollouts_finish_next_call_with_staleness(model, case):
  """carry_over=True: the aborted groups stay in their slots and come back first from the next
  call, one policy version stale; with unchanged weights their rows equal the static rows of
  the first call (each row keeps its own random stream across calls)."""
  tokens, lengths, kwargs, want = case
  engine = SlotEngine(model, decode_slots=4, chunk_steps=2)
  first = engine.generate_groups(tokens, lengths, groups_needed=3, carry_over=True,
                                 policy_version=7, context_ids=100 + np.arange(7), **kwargs)
  assert len(first.carried) >= 1 and len(first.dropped) == 0
  assert (first.staleness == 0).all()
  carried = first.carried
  new_tokens, new_lengths = _prompts(seed=20)
  second = engine.generate_groups(new_tokens, new_lengths, groups_needed=len(carried) + 7,
                                  policy_version=8, context_ids=200 + np.arange(7),
                                  **{**kwargs, "rng": jax.random.key(9)})
  ids = second.context_ids
  assert sorted(ids.tolist()) == sorted([*carried.tolist(), *range(200, 207)])
  np.testing.assert_array_equal(second.staleness, np.where(ids < 200, 1, 0))
  pos = np.flatnonzero(ids < 200)
  old = ids[pos] - 100
  got_rows = (pos[:, None] * G + np.arange(G)).reshape(-1)
  want_rows = (old[:, None] * G + np.arange(G)).reshape(-1)
  take = lambda out, r: jax.tree.map(lambda x: np.asarray(x)[r] if x.ndim else x, out)
  _assert_same(take(second.output, got_rows), take(want, want_rows))
  np.testing.assert_array_equal(second.prompt_tokens[pos], tokens[old])


def test_bad_engine_inputs_raise_clear_errors(model, case):
  tokens, lengths, kwargs, _ = case
  with pytest.raises(ValueError, match="decode_slots=1 must be >= num_samples=2"):
    SlotEngine(model, decode_slots=1).generate(tokens, lengths, **kwargs)
  with pytest.raises(ValueError, match="chunk_steps=0 must be >= 1"):
    SlotEngine(model, decode_slots=4, chunk_steps=0)
  with pytest.raises(ValueError, match="cache_tokens=5 is below the largest max_new_tokens"):
    SlotEngine(model, decode_slots=4).generate(tokens, lengths, cache_tokens=5, **kwargs)
  engine = SlotEngine(model, decode_slots=4)
  engine.generate_groups(tokens, lengths, groups_needed=1, carry_over=True, **kwargs)
  with pytest.raises(ValueError, match="holds partial rollouts"):
    engine.generate(tokens, lengths, **kwargs)
  with pytest.raises(ValueError, match="carried partial rollouts have"):
    engine.generate_groups(tokens[:, :5], np.minimum(lengths, 5), groups_needed=1, **kwargs)
