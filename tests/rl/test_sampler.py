"""Sampler against HF transformers generate, teacher-forced log-probs, exact distributions,
and itself under sharding / micro-batching / per-row prefill (tiny random models, fp32)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from rpt_jax import mesh as mesh_lib
from rpt_jax.model import hf_io
from rpt_jax.rl.sampler import Sampler
from rpt_jax.rl.sampling import Sampling, inverse_cdf, row_uniforms, sample_tokens

VOCAB = 320
# name -> (HF architecture, config kwargs): GQA 4/2 with q/k/v biases; GQA 4/1 with
# llama3 rope scaling. Untied heads: a random tied model mostly predicts its input token again.
FAMILIES = {
    "qwen2": ("Qwen2", dict(num_attention_heads=4, num_key_value_heads=2,
                            tie_word_embeddings=False)),
    "llama": ("Llama", dict(num_attention_heads=4, num_key_value_heads=1,
                            tie_word_embeddings=False, rope_theta=500000.0,
                            rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                              high_freq_factor=4.0,
                                              original_max_position_embeddings=16))),
}
# Three right-padded prompts of mixed lengths.
LENGTHS = np.array([10, 6, 3], np.int32)


def _build_hf(name):
  arch, kwargs = FAMILIES[name]
  config = getattr(transformers, f"{arch}Config")(
      vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
      max_position_embeddings=128, rms_norm_eps=1e-6, bos_token_id=None, eos_token_id=None,
      pad_token_id=0, **kwargs)
  torch.manual_seed(0)
  model = getattr(transformers, f"{arch}ForCausalLM")(config).eval()
  with torch.no_grad():  # Peaked, O(1)-scale logits so greedy has no near-ties.
    for pname, p in model.named_parameters():
      if pname.endswith("bias"):
        p.normal_(0.0, 0.1)
      elif "norm" in pname:
        p.uniform_(0.5, 1.5)
      elif "embed" in pname or "lm_head" in pname:
        p.normal_(0.0, 0.5)
  return model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  """name -> (HF torch model, HF directory, our Transformer, unsharded Sampler)."""
  out = {}
  for name in FAMILIES:
    hf = _build_hf(name)
    path = str(tmp_path_factory.mktemp(name))
    hf.save_pretrained(path)
    model, _ = hf_io.load_hf(path)
    out[name] = (hf, path, model, Sampler(model))
  return out


def _prompts(lengths=LENGTHS, width=10, seed=0):
  tokens = np.random.RandomState(seed).randint(3, VOCAB, (len(lengths), width)).astype(np.int32)
  tokens[np.arange(width)[None] >= lengths[:, None]] = 0
  return tokens, lengths


@pytest.fixture(scope="module")
def greedy_qwen2(models):
  """One greedy run on qwen2 without EOS: 3 contexts x G=2, N=8."""
  tokens, lengths = _prompts()
  return models["qwen2"][3].generate(tokens, lengths, num_samples=2, max_new_tokens=8,
                                     temperature=0.0, rng=jax.random.key(0))


@pytest.mark.parametrize("name", list(FAMILIES))
def test_greedy_matches_hf_generate(name, models):
  hf, _, _, sampler = models[name]
  tokens, lengths = _prompts(seed=1)
  out = sampler.generate(tokens, lengths, num_samples=2, max_new_tokens=8, temperature=0.0,
                         rng=jax.random.key(0))
  for b, length in enumerate(lengths):  # HF: each prompt alone, unpadded.
    ids = torch.as_tensor(tokens[b:b + 1, :length], dtype=torch.long)
    res = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=8,
                      pad_token_id=0, return_dict_in_generate=True, output_logits=True)
    want = res.sequences[0, length:].numpy()
    assert len(want) == 8
    want_logp = np.array([torch.log_softmax(l[0], -1)[t].item()
                          for l, t in zip(res.logits, want)])
    for g in range(2):
      np.testing.assert_array_equal(np.asarray(out.tokens[2 * b + g]), want)
      np.testing.assert_allclose(np.asarray(out.logprobs[2 * b + g]), want_logp, atol=1e-4)
  assert not np.asarray(out.done).any() and (np.asarray(out.lengths) == 8).all()
  assert int(out.num_steps) == 8


@pytest.mark.parametrize("temperature", [1.0, 0.8])
def test_logprobs_equal_teacher_forced_forward(temperature, models):
  _, _, model, sampler = models["qwen2"]
  tokens, lengths = _prompts(seed=2)
  g, n = 2, 8
  out = sampler.generate(tokens, lengths, num_samples=g, max_new_tokens=n,
                         temperature=temperature, rng=jax.random.key(3))
  gen = np.asarray(out.tokens)
  assert len({tuple(r) for r in gen}) > 3  # Rows of one context differ: sampling happened.
  width = 10 + n
  seqs = np.zeros((len(gen), width), np.int32)
  mask = np.zeros_like(seqs)
  for r in range(len(gen)):
    length = lengths[r // g]
    seqs[r, :length + n] = np.concatenate([tokens[r // g, :length], gen[r]])
    mask[r, :length + n] = 1
  logits = np.asarray(jax.jit(lambda t, m: model(t, attention_mask_BL=m))(seqs, mask))
  logp = jax.nn.log_softmax(logits / temperature, axis=-1)
  for r in range(len(gen)):
    length = lengths[r // g]
    # Token i of the completion is predicted at position length - 1 + i.
    want = np.asarray(logp[r, length - 1 + np.arange(n), gen[r]])
    np.testing.assert_allclose(np.asarray(out.logprobs[r]), want, atol=1e-4, rtol=0)


def _expected(logits, temperature, top_k=0, top_p=1.0):
  """The sampling distribution by hand (numpy): softmax(l / T), then top-k, then nucleus."""
  p = np.exp(logits / temperature - np.max(logits / temperature))
  p /= p.sum()
  order = np.argsort(-p, kind="stable")
  keep = np.zeros(len(p), bool)
  keep[order[:top_k or len(p)]] = True
  q = np.where(keep, p, 0.0)
  q /= q.sum()
  before = np.cumsum(q[order]) - q[order]
  keep[order[before >= top_p]] = False
  q = np.where(keep, p, 0.0)
  return q / q.sum(), p


@pytest.mark.parametrize("temperature,top_k,top_p", [
    (1.0, 0, 1.0), (0.8, 0, 1.0), (1.7, 0, 1.0), (0.8, 3, 1.0), (1.0, 0, 0.7), (1.0, 4, 0.8)])
def test_sampling_matches_distribution(temperature, top_k, top_p):
  """20,000 draws from fixed 6-way logits: max |frequency - probability| < 0.015 (more than
  4 standard errors, sqrt(0.25 / 20000) = 0.0035); excluded tokens are never drawn."""
  logits = np.array([2.0, 1.0, 0.5, 0.0, -0.5, -1.5], np.float32)
  draws = 20_000
  want, full = _expected(logits.astype(np.float64), temperature, top_k, top_p)
  u = row_uniforms(jax.random.key(7), 0, jnp.arange(draws))
  method = Sampling(temperature, top_k, top_p)
  tokens, logprobs = jax.jit(sample_tokens, static_argnums=2)(
      jnp.broadcast_to(logits, (draws, 6)), u, method)
  freq = np.bincount(np.asarray(tokens), minlength=6) / draws
  assert np.abs(freq - want).max() < 0.015, (freq, want)
  assert freq[want == 0].sum() == 0
  if top_k or top_p < 1:
    assert (want == 0).any()  # The case really truncates.
  # Log-probs are those of the untruncated softmax(l / T), whatever was truncated.
  np.testing.assert_allclose(np.asarray(logprobs), np.log(full)[np.asarray(tokens)], atol=1e-5)


def test_blocked_inverse_cdf_matches_distribution():
  """The two-level draw over 1,000 entries (not a multiple of the 128-entry block), a third of
  them exactly 0: max |frequency - probability| < 0.01 over 20,000 draws, zeros never drawn,
  and the extreme uniforms land on the first / last positive entries."""
  rs = np.random.RandomState(0)
  weights = rs.exponential(size=1000) ** 3
  weights[rs.rand(1000) < 0.33] = 0.0
  weights[[0, 999]] = 0.0
  draws = 20_000
  u = row_uniforms(jax.random.key(3), 0, jnp.arange(draws))
  picks = np.asarray(jax.jit(inverse_cdf)(jnp.broadcast_to(weights.astype(np.float32),
                                                           (draws, 1000)), u))
  freq = np.bincount(picks, minlength=1000) / draws
  assert np.abs(freq - weights / weights.sum()).max() < 0.01
  assert freq[weights == 0].sum() == 0
  positive = np.flatnonzero(weights)
  edges = np.asarray(inverse_cdf(jnp.asarray(np.stack([weights] * 2), jnp.float32),
                                 jnp.array([1e-9, 1.0], jnp.float32)))
  np.testing.assert_array_equal(edges, [positive[0], positive[-1]])


def test_greedy_method_is_argmax_with_t1_logprobs():
  logits = np.array([[0.3, 2.0, -1.0], [5.0, 4.0, 4.5]], np.float32)
  tokens, logprobs = sample_tokens(jnp.asarray(logits), jnp.ones(2), Sampling(0.0))
  np.testing.assert_array_equal(tokens, [1, 0])
  p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  np.testing.assert_allclose(logprobs, np.log(p[[0, 1], [1, 0]]), atol=1e-6)


def test_sampler_first_tokens_follow_model_distribution(models):
  """2,048 rollouts of one prompt at T=0.8: first-token frequencies match softmax(HF logits/T)
  (max error 0.03, over 3 standard errors of the largest probability); rows and steps get
  independent draws."""
  hf, _, _, sampler = models["qwen2"]
  tokens, lengths = _prompts(np.array([7], np.int32), width=8, seed=0)
  out = sampler.generate(tokens, lengths, num_samples=2048, max_new_tokens=2, temperature=0.8,
                         rng=jax.random.key(11))
  with torch.no_grad():
    logits = hf(torch.as_tensor(tokens[:, :7], dtype=torch.long)).logits[0, -1].numpy()
  want = np.exp(logits / 0.8 - logits.max() / 0.8)
  want /= want.sum()
  first = np.asarray(out.tokens[:, 0])
  freq = np.bincount(first, minlength=VOCAB) / len(first)
  assert 0.2 < want.max() < 0.9  # Neither flat nor one-hot: the test has power.
  assert np.abs(freq - want).max() < 0.03
  second = np.asarray(out.tokens[:, 1])
  assert len(set(second.tolist())) > 10 and (first != second).any()


def test_sharded_greedy_equals_unsharded(models):
  _, path, _, sampler = models["qwen2"]
  mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(data=2, fsdp=2, tensor=2))
  sharded_model, _ = hf_io.load_hf(path, mesh=mesh)
  sharded = Sampler(sharded_model, mesh=mesh)
  tokens, lengths = _prompts(np.array([10, 6, 3, 8], np.int32), seed=5)
  kwargs = dict(num_samples=2, max_new_tokens=6, temperature=0.0, rng=jax.random.key(0))
  got = sharded.generate(tokens, lengths, **kwargs)
  want = sampler.generate(tokens, lengths, **kwargs)
  assert got.tokens.sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"), None)
  np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))
  np.testing.assert_allclose(np.asarray(got.logprobs), np.asarray(want.logprobs), atol=1e-5)
  np.testing.assert_array_equal(np.asarray(got.lengths), np.asarray(want.lengths))


def test_shared_prefill_equals_per_row_prefill(models):
  sampler = models["qwen2"][3]
  tokens, lengths = _prompts(seed=6)
  kwargs = dict(num_samples=3, max_new_tokens=6, temperature=0.8, rng=jax.random.key(5))
  shared = sampler.generate(tokens, lengths, **kwargs)
  per_row = sampler.generate(tokens, lengths, shared_prefill=False, **kwargs)
  assert len({tuple(r) for r in np.asarray(shared.tokens)}) > 3
  np.testing.assert_array_equal(np.asarray(shared.tokens), np.asarray(per_row.tokens))
  np.testing.assert_allclose(np.asarray(shared.logprobs), np.asarray(per_row.logprobs),
                             atol=1e-5)


def _expected_with_eos(tokens, logprobs, eos, pad_id, n):
  tokens, logprobs = tokens.copy(), logprobs.copy()
  lengths = np.full(len(tokens), n)
  done = np.zeros(len(tokens), bool)
  for r, row in enumerate(tokens):
    hits = np.flatnonzero(np.isin(row, list(eos)))
    if hits.size:
      lengths[r], done[r] = hits[0] + 1, True
      tokens[r, hits[0] + 1:] = pad_id
      logprobs[r, hits[0] + 1:] = 0.0
  return tokens, logprobs, lengths, done


@pytest.mark.parametrize("all_finish", [False, True])
def test_eos_rows_stop_and_pad(all_finish, models, greedy_qwen2):
  sampler = models["qwen2"][3]
  base_tokens, base_logp = np.asarray(greedy_qwen2.tokens), np.asarray(greedy_qwen2.logprobs)
  n = base_tokens.shape[1]
  if all_finish:  # Row r stops by step (r % 3) + 1 at the latest: the loop must exit early.
    eos = {int(base_tokens[r, r % 3 + 1]) for r in range(len(base_tokens))}
  else:
    eos = {int(base_tokens[0, 2])}
  tokens, lengths = _prompts()
  out = sampler.generate(tokens, lengths, num_samples=2, max_new_tokens=n, temperature=0.0,
                         eos_ids=sorted(eos), rng=jax.random.key(0))
  want_tok, want_logp, want_len, want_done = _expected_with_eos(base_tokens, base_logp, eos, 0, n)
  np.testing.assert_array_equal(np.asarray(out.tokens), want_tok)
  np.testing.assert_allclose(np.asarray(out.logprobs), want_logp, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(out.lengths), want_len)
  np.testing.assert_array_equal(np.asarray(out.done), want_done)
  after = np.arange(n)[None] >= want_len[:, None]
  assert (np.asarray(out.logprobs)[after] == 0).all()  # Exactly 0, not just close.
  if all_finish:
    assert want_done.all() and want_len.max() < n
    assert int(out.num_steps) == want_len.max()  # Exited as soon as the last row finished.
  else:
    assert not want_done.all() and int(out.num_steps) == n


def test_per_row_budgets_truncate_each_row(models):
  """Budgets per row: each row is the uniform-budget row cut at its own budget (or its EOS),
  padded after; the loop runs to the largest live budget; cache_tokens keeps one compile."""
  _, _, model, _ = models["qwen2"]
  sampler = Sampler(model)
  tokens, lengths = _prompts(seed=4)
  kwargs = dict(num_samples=2, temperature=0.8, rng=jax.random.key(6))
  full = sampler.generate(tokens, lengths, max_new_tokens=8, **kwargs)
  full_tok, full_logp = np.asarray(full.tokens), np.asarray(full.logprobs)
  eos = {int(full_tok[1, 1])}
  budgets = np.array([3, 8, 1, 5, 2, 6], np.int32)
  out = sampler.generate(tokens, lengths, max_new_tokens=budgets, eos_ids=sorted(eos),
                         cache_tokens=8, **kwargs)
  want_tok, want_logp, want_len, want_done = _expected_with_eos(full_tok, full_logp, eos, 0, 8)
  cut = np.arange(8)[None] >= budgets[:, None]
  want_tok[cut], want_logp[cut] = 0, 0.0
  want_done &= want_len <= budgets
  want_len = np.minimum(want_len, budgets)
  np.testing.assert_array_equal(np.asarray(out.tokens), want_tok)
  np.testing.assert_allclose(np.asarray(out.logprobs), want_logp, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(out.lengths), want_len)
  np.testing.assert_array_equal(np.asarray(out.done), want_done)
  assert int(out.num_steps) == want_len.max()
  counts = dict(sampler.trace_counts)
  sampler.generate(tokens, lengths, max_new_tokens=budgets[::-1].copy(), cache_tokens=8,
                   **kwargs)
  assert dict(sampler.trace_counts) == counts
  with pytest.raises(ValueError, match=r"one int per row \(shape \(6,\)"):
    sampler.generate(tokens, lengths, max_new_tokens=budgets[:4], **kwargs)


def test_micro_batches_match_one_batch_and_compile_once(models):
  _, _, model, _ = models["qwen2"]
  sampler = Sampler(model)  # Fresh, so its trace counts start at zero.
  tokens, lengths = _prompts(np.array([10, 6, 3, 9, 1], np.int32), seed=8)
  kwargs = dict(num_samples=2, max_new_tokens=6, rng=jax.random.key(2))
  for temperature in (0.0, 0.8):
    whole = sampler.generate(tokens, lengths, temperature=temperature, **kwargs)
    before = dict(sampler.trace_counts)
    parts = sampler.generate(tokens, lengths, temperature=temperature, micro_batch=2, **kwargs)
    # 3 micro-batches (the last padded with a dummy context): one decode trace, and one prefill
    # trace the first time (prefill does not depend on the sampling method).
    assert sampler.trace_counts["prefill"] == before["prefill"] + (temperature == 0.0)
    assert sampler.trace_counts["decode"] == before["decode"] + 1
    assert parts.tokens.shape == (10, 6)
    np.testing.assert_array_equal(np.asarray(parts.tokens), np.asarray(whole.tokens))
    np.testing.assert_allclose(np.asarray(parts.logprobs), np.asarray(whole.logprobs), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(parts.lengths), np.asarray(whole.lengths))
  # New weights each call (as the trainer passes them) reuse the compiled programs.
  counts = dict(sampler.trace_counts)
  scaled = jax.tree.map(lambda x: x * 1.05, nnx.state(model))
  moved = sampler.generate(tokens, lengths, temperature=0.8, micro_batch=2, params=scaled,
                           **kwargs)
  assert dict(sampler.trace_counts) == counts
  assert not np.allclose(np.asarray(moved.logprobs), np.asarray(parts.logprobs))


def test_bad_inputs_raise_clear_errors(models):
  sampler = models["qwen2"][3]
  tokens, lengths = _prompts()
  kwargs = dict(num_samples=2, max_new_tokens=4, temperature=1.0, rng=jax.random.key(0))
  with pytest.raises(ValueError, match="prompt_lengths must lie in"):
    sampler.generate(tokens, np.array([10, 0, 3]), **kwargs)
  with pytest.raises(ValueError, match="one length per prompt"):
    sampler.generate(tokens, lengths[:2], **kwargs)
  with pytest.raises(ValueError, match="max_position_embeddings=128"):
    sampler.generate(tokens, lengths, **{**kwargs, "max_new_tokens": 200})
  with pytest.raises(ValueError, match="top_p"):
    sampler.generate(tokens, lengths, top_p=0.0, **kwargs)


def test_remat_model_generates_like_its_plain_twin():
  """A policy configured with remat (as every TPU/GPU config is) must still decode: remat inside
  the while_loop used to fail to trace. Same weights, same greedy tokens as remat='none'."""
  import dataclasses
  from rpt_jax.model import ModelConfig, init_model
  cfg = ModelConfig(family="qwen2", vocab_size=64, hidden_size=32, intermediate_size=64,
                    num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, attention_bias=True,
                    remat="full")
  kw = dict(num_samples=2, max_new_tokens=5, temperature=0.0, rng=jax.random.key(0))
  toks = np.array([[1, 2, 3, 0], [4, 5, 0, 0]], np.int32)
  lens = np.array([3, 2], np.int32)
  remat = Sampler(init_model(cfg, seed=0)).generate(toks, lens, **kw)
  plain = Sampler(init_model(dataclasses.replace(cfg, remat="none"), seed=0)).generate(
      toks, lens, **kw)
  np.testing.assert_array_equal(np.asarray(remat.tokens), np.asarray(plain.tokens))
