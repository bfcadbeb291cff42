"""Transformer numerics against Hugging Face transformers (PyTorch, fp32) on tiny random models."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from rpt_jax import mesh as mesh_lib
from rpt_jax.model import hf_io
from rpt_jax.model import attention
from rpt_jax.model.transformer import KVCache

FAMILIES = ["qwen2", "qwen2_tied", "llama3", "qwen3", "mistral"]


def hf_logits(model, tokens, attention_mask=None) -> np.ndarray:
  with torch.no_grad():
    mask = None if attention_mask is None else torch.as_tensor(np.asarray(attention_mask))
    return model(torch.as_tensor(np.asarray(tokens)), attention_mask=mask).logits.numpy()


@pytest.fixture(scope="module")
def ours(hf_models):
  """name -> our model loaded from the HF directory (unsharded)."""
  return {name: hf_io.load_hf(path)[0] for name, (_, path) in hf_models.items()}


def _with_attention(ours, hf_models, name, implementation):
  """Our `name` model computing attention with `implementation` (auto: the loaded one)."""
  if implementation == "auto":
    return ours[name]
  return hf_io.load_hf(hf_models[name][1], attention=implementation)[0]



def _tokens(shape, seed=0, vocab=320):
  return np.random.RandomState(seed).randint(3, vocab, shape).astype(np.int32)


def _forward(model, tokens, mask):
  graphdef, state = nnx.split(model)
  fn = jax.jit(lambda s, t, m: nnx.merge(graphdef, s)(t, attention_mask_BL=m))
  return np.asarray(fn(state, tokens, mask))


@pytest.mark.parametrize("name,implementation", [(f, "auto") for f in FAMILIES]
                         + [("qwen2", "chunked"), ("qwen3", "splash")])
def test_logits_match_hf_with_right_padding(name, implementation, hf_models, ours):
  hf_model, _ = hf_models[name]
  tokens = _tokens((3, 20))
  mask = np.ones_like(tokens)
  mask[1, 13:] = 0
  mask[2, 5:] = 0
  tokens[mask == 0] = 0
  ref = hf_logits(hf_model, tokens, mask)
  got = _forward(_with_attention(ours, hf_models, name, implementation), tokens, mask)
  assert np.abs(ref).max() > 1.0  # Logits of real size, so 1e-4 is a meaningful tolerance.
  real = mask.astype(bool)
  np.testing.assert_allclose(got[real], ref[real], atol=1e-4, rtol=0)


def test_row_chunked_attention_matches_hf(monkeypatch, hf_models, ours):
  """CPU attention in chunks of rows (a budget of one row's scores: 4 chunks) == HF."""
  hf_model, _ = hf_models["qwen2_tied"]
  tokens = _tokens((4, 20), seed=10)
  mask = np.ones_like(tokens)
  mask[1, 11:] = 0
  mask[3, 3:] = 0
  tokens[mask == 0] = 0
  monkeypatch.setattr(attention, "_CPU_SCORE_CHUNK_BYTES", 8 * 20 * 20 * 4)
  assert attention._rows_per_chunk(4, 8 * 20 * 20 * 4) == 1
  got = _forward(ours["qwen2_tied"], tokens, mask)
  real = mask.astype(bool)
  np.testing.assert_allclose(got[real], hf_logits(hf_model, tokens, mask)[real], atol=1e-4, rtol=0)


@pytest.mark.parametrize("chunk_bytes", [None, 1], ids=["whole", "row-chunks"])
def test_sharded_forward_equals_unsharded(chunk_bytes, monkeypatch, hf_models, ours):
  if chunk_bytes:  # One row per chunk: the chunk loop runs over a batch sharded 4 ways.
    monkeypatch.setattr(attention, "_CPU_SCORE_CHUNK_BYTES", chunk_bytes)
  mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(data=2, fsdp=2, tensor=2))
  model, _ = hf_io.load_hf(hf_models["qwen3"][1], mesh=mesh)
  q = model.layers[0].attn.q.value
  assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor", None)
  assert model.embed.value.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
  tokens = _tokens((4, 16), seed=1)
  mask = np.ones_like(tokens)
  mask[3, 9:] = 0
  graphdef, state = nnx.split(model)
  shardings = mesh_lib.state_shardings(state, mesh)
  batch = mesh_lib.ShardingRules().sharding(mesh, ("batch", "length"))
  fn = jax.jit(lambda s, t, m: nnx.merge(graphdef, s)(t, attention_mask_BL=m),
               in_shardings=(shardings, batch, batch))
  got = np.asarray(fn(state, tokens, mask))
  want = _forward(ours["qwen3"], tokens, mask)
  real = mask.astype(bool)
  np.testing.assert_allclose(got[real], want[real], atol=1e-5, rtol=0)


def test_sharded_embedding_lookup_compiles_without_rematerialization(capfd, hf_models, ours):
  """Table split (vocab over tensor, embed over fsdp), rows split over batch: the lookup and its
  gradient compile without XLA's "Involuntary full rematerialization" (stderr), and the
  gradient of the tied table equals the unsharded one."""
  mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(data=2, fsdp=2, tensor=2))
  model, _ = hf_io.load_hf(hf_models["qwen2_tied"][1], mesh=mesh)
  tokens = _tokens((8, 6), seed=11)  # A shape no other test compiles (no cache hit).
  weights = np.random.RandomState(12).randn(8, 6, 320).astype(np.float32)
  graphdef, state = nnx.split(model)
  batch = mesh_lib.ShardingRules().sharding(mesh, ("batch", "length"))
  grad_fn = lambda g: jax.grad(lambda s, t: jnp.sum(nnx.merge(g, s)(t) * weights))  # noqa: E731
  capfd.readouterr()
  got = jax.jit(grad_fn(graphdef), in_shardings=(mesh_lib.state_shardings(state, mesh), batch))(
      state, tokens)
  jax.block_until_ready(got)
  assert "Involuntary full rematerialization" not in capfd.readouterr().err
  plain_graphdef, plain_state = nnx.split(ours["qwen2_tied"])
  want = jax.jit(grad_fn(plain_graphdef))(plain_state, tokens)
  np.testing.assert_allclose(got["embed"].value, want["embed"].value, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name,implementation", [("qwen2", "auto"), ("qwen3", "auto"),
                                                 ("qwen2", "chunked"), ("qwen3", "splash")])
def test_prefill_then_decode_matches_hf_full_forward(name, implementation, hf_models, ours):
  """Mixed prompt lengths, right-padded; each row decodes at its own positions."""
  hf_model, _ = hf_models[name]
  model = _with_attention(ours, hf_models, name, implementation)
  b, prompt_len, steps = 3, 8, 5
  lengths = np.array([8, 5, 2])
  seq = _tokens((b, prompt_len + steps), seed=2)
  prompt = seq[:, :prompt_len].copy()
  prompt_mask = (np.arange(prompt_len)[None] < lengths[:, None]).astype(np.int32)
  prompt[prompt_mask == 0] = 0
  graphdef, state = nnx.split(model)

  @jax.jit
  def step(state, tokens, positions, mask, cache):
    m = nnx.merge(graphdef, state)
    hidden, cache = m.hidden_states(tokens, positions, mask, cache=cache)
    return m.logits(hidden), cache

  cache = KVCache.init(model.config, b, prompt_len + steps)
  positions = np.broadcast_to(np.arange(prompt_len), (b, prompt_len)).astype(np.int32)
  logits, cache = step(state, prompt, positions, prompt_mask, cache)
  got = {(r, p): np.asarray(logits[r, p]) for r in range(b) for p in range(lengths[r])}
  for t in range(steps):
    pos = lengths + t
    tok = seq[np.arange(b), pos][:, None]
    logits, cache = step(state, tok, pos[:, None].astype(np.int32), np.ones((b, 1), np.int32),
                         cache)
    got.update({(r, pos[r]): np.asarray(logits[r, 0]) for r in range(b)})
  for r in range(b):  # Reference: HF on each row's real tokens alone, no padding.
    real = np.concatenate([seq[r, :lengths[r]], seq[r, lengths[r]:lengths[r] + steps]])
    ref = hf_logits(hf_model, real[None])[0]
    for p in range(len(real)):
      np.testing.assert_allclose(got[(r, p)], ref[p], atol=1e-4, rtol=0, err_msg=f"{r},{p}")


def test_cache_holds_hf_keys_and_values_per_head_per_slot(hf_models, ours):
  """After a right-padded prefill, cache.k[layer][row, head, slot] is HF's (post-rope) key of
  that row's token at position slot (HF caches [B, KVH, S, Dh] too); padding slots stay 0."""
  hf_model, _ = hf_models["qwen2"]
  model = ours["qwen2"]
  lengths, width, slots = np.array([8, 5, 2]), 8, 10
  tokens = _tokens((3, width), seed=9)
  mask = (np.arange(width)[None] < lengths[:, None]).astype(np.int32)
  graphdef, state = nnx.split(model)
  cache = jax.jit(lambda s, t, m, c: nnx.merge(graphdef, s).hidden_states(t, None, m, cache=c)[1])(
      state, tokens, mask, KVCache.init(model.config, 3, slots))
  assert cache.k[0].shape == (3, 2, slots, 16) and cache.length == slots
  assert KVCache.LOGICAL_AXES == ("batch", "kv_heads", "cache_length", "head_dim")
  for r, n in enumerate(lengths):
    with torch.no_grad():
      hf_cache = hf_model(torch.as_tensor(tokens[r:r + 1, :n]), use_cache=True)["cache"]
    for layer in range(2):
      for got, want in ((cache.k[layer], hf_cache.layers[layer].keys),
                        (cache.v[layer], hf_cache.layers[layer].values)):
        np.testing.assert_allclose(np.asarray(got[r, :, :n]), want[0].numpy(), atol=1e-5)
        assert not np.asarray(got[r, :, n:]).any()


def _shared_prefix_case():
  """2 contexts (lengths 6, 4) x G=2 completions of up to 4 tokens (some padded)."""
  ctx = _tokens((2, 6), seed=3)
  ctx_len = np.array([6, 4])
  ctx_mask = (np.arange(6)[None] < ctx_len[:, None]).astype(np.int32)
  comp = _tokens((4, 4), seed=4)
  comp_len = np.array([4, 4, 3, 2])
  comp_mask = (np.arange(4)[None] < comp_len[:, None]).astype(np.int32)
  weights = np.random.RandomState(5).randn(4, 4, 320).astype(np.float32)
  return ctx, ctx_len, ctx_mask, comp, comp_len, comp_mask, weights


def _shared_prefix_loss(model, ctx, ctx_len, ctx_mask, comp, comp_mask, weights):
  """Prefill contexts once, repeat the cache G=2 times, score completions through the cache."""
  cache = KVCache.init(model.config, 2, 10)
  _, cache = model.hidden_states(ctx, None, ctx_mask, cache=cache)
  positions = (np.repeat(ctx_len, 2)[:, None] + np.arange(4)[None]).astype(np.int32)
  hidden, _ = model.hidden_states(comp, positions, comp_mask, cache=cache.repeat(2))
  return jnp.sum(model.logits(hidden) * weights * comp_mask[..., None])


@pytest.mark.parametrize("chunk_bytes,implementation",
                         [(None, "auto"), (1, "auto"), (None, "chunked"), (None, "splash"),
                          (None, "scan")],
                         ids=["whole", "row-chunks", "chunked", "splash", "scan-layers"])
def test_shared_prefix_cache_loss_and_grads_match_torch(chunk_bytes, implementation, monkeypatch,
                                                        hf_models, ours):
  """scan-layers: the layer stack as one rematerialised lax.scan (context prefill and the
  completions through its cache both have many tokens per row, so both scan)."""
  if chunk_bytes:  # Gradients through the rematerialised chunk loop too.
    monkeypatch.setattr(attention, "_CPU_SCORE_CHUNK_BYTES", chunk_bytes)
  hf_model, path = hf_models["qwen2"]
  if implementation == "scan":
    model = hf_io.load_hf(path, scan_layers=True, remat="full")[0]
    graphdef, state = nnx.split(model)
    jaxpr = str(jax.make_jaxpr(lambda s: nnx.merge(graphdef, s).hidden_states(
        np.zeros((1, 4), np.int32)))(state))
    assert jaxpr.count("scan[") == 1 and jaxpr.count("remat") == 1  # One body for all layers.
  else:
    model = _with_attention(ours, hf_models, "qwen2", implementation)
  ctx, ctx_len, ctx_mask, comp, comp_len, comp_mask, weights = _shared_prefix_case()
  loss, grads = nnx.jit(nnx.value_and_grad(_shared_prefix_loss))(
      model, ctx, ctx_len, ctx_mask, comp, comp_mask, weights)
  hf_model.zero_grad()
  ref_loss = 0.0
  for r in range(4):  # Reference: each row as one unpadded sequence through PyTorch autograd.
    c = ctx_len[r // 2]
    seq = np.concatenate([ctx[r // 2, :c], comp[r, :comp_len[r]]])
    logits = hf_model(torch.as_tensor(seq[None])).logits[0, c:]
    row = (logits * torch.as_tensor(weights[r, :comp_len[r]])).sum()
    row.backward()
    ref_loss += row.item()
  np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-5)
  hf_params = dict(hf_model.named_parameters())
  want_embed = hf_params["model.embed_tokens.weight"].grad.numpy()
  np.testing.assert_allclose(np.asarray(grads.embed.value), want_embed, atol=1e-4, rtol=1e-4)
  want_q = hf_params["model.layers.0.self_attn.q_proj.weight"].grad.numpy()  # [N*H, D]
  got_q = np.asarray(grads.layers[0].attn.q.value)  # [D, N, H]
  np.testing.assert_allclose(got_q.reshape(64, -1).T, want_q, atol=1e-4, rtol=1e-4)
  want_k = hf_params["model.layers.0.self_attn.k_proj.bias"].grad.numpy()
  np.testing.assert_allclose(np.asarray(grads.layers[0].attn.k_bias.value).reshape(-1), want_k,
                             atol=1e-4, rtol=1e-4)


def _simple_loss(model, tokens, weights):
  return jnp.sum(model(tokens) * weights)


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_policies_keep_gradients(remat, hf_models, ours):
  model = hf_io.load_hf(hf_models["qwen2"][1], remat=remat)[0]
  tokens = _tokens((2, 8), seed=7)
  weights = np.random.RandomState(8).randn(2, 8, 320).astype(np.float32)
  grad_fn = nnx.jit(nnx.grad(_simple_loss))
  g_remat, g_plain = grad_fn(model, tokens, weights), grad_fn(ours["qwen2"], tokens, weights)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4),
               nnx.to_pure_dict(g_remat), nnx.to_pure_dict(g_plain))
  graphdef, state = nnx.split(model)
  jaxpr = str(jax.make_jaxpr(lambda s: _simple_loss(nnx.merge(graphdef, s), tokens, weights))(state))
  assert jaxpr.count("remat") == 2  # One checkpointed region per layer.


def test_bf16_compute_close_to_fp32_hf(hf_models):
  hf_model, path = hf_models["llama3"]
  model = hf_io.load_hf(path, dtype="bfloat16", compute_dtype="bfloat16")[0]
  assert model.layers[0].mlp.up.value.dtype == jnp.bfloat16
  tokens = _tokens((2, 12), seed=6)
  got = np.asarray(model(tokens))
  assert got.dtype == np.float32
  ref = hf_logits(hf_model, tokens)
  err = np.abs(got - ref).max() / np.abs(ref).max()
  assert err < 0.05, err


def test_unembedding_is_tied_embedding_transposed(ours):
  tied, untied = ours["qwen2_tied"], ours["qwen2"]
  np.testing.assert_array_equal(tied.unembedding(), tied.embed.value.T)
  assert untied.unembedding().shape == (64, 320)
  assert not hasattr(tied, "lm_head")


def test_params_carry_logical_axes(ours):
  for path, var in nnx.to_flat_state(nnx.state(ours["qwen3"], nnx.Param)):
    axes = var.get_metadata().get("logical_axes")
    assert axes is not None and len(axes) == var.value.ndim, path
    assert set(axes) <= {"embed", "mlp", "heads", "kv_heads", "head_dim", "vocab", "norm"}


def test_context_longer_than_sliding_window_is_refused(ours):
  with pytest.raises(ValueError, match="sliding_window=64"):
    ours["mistral"](np.zeros((1, 65), np.int32))
  with pytest.raises(ValueError, match="max_position_embeddings=256"):
    ours["qwen2"].hidden_states(np.zeros((1, 4), np.int32),
                                cache=KVCache.init(ours["qwen2"].config, 1, 300))


def test_init_model_sharded_equals_unsharded():
  from rpt_jax.model.config import ModelConfig
  from rpt_jax.model.transformer import init_model
  cfg = ModelConfig("llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1,
                    num_heads=4, num_kv_heads=2, head_dim=8)
  mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(data=2, fsdp=2, tensor=2))
  sharded, plain = init_model(cfg, seed=3, mesh=mesh), init_model(cfg, seed=3)
  assert sharded.layers[0].mlp.down.value.sharding.spec == jax.sharding.PartitionSpec(
      "tensor", "fsdp")
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),  # jit vs eager ulps.
               nnx.to_pure_dict(nnx.state(sharded)), nnx.to_pure_dict(nnx.state(plain)))
  assert np.std(np.asarray(plain.embed.value)) == pytest.approx(0.02, rel=0.1)
