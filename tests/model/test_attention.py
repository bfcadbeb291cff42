"""Every attention implementation against a dense float64 numpy reference (forward and a
hand-written backward), for GQA ratios 1/2/4, padding, causal, KV-cache and shared-prefix masks."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rpt_jax import mesh as mesh_lib
from rpt_jax.model import attention, attention_kernels
from rpt_jax.model.config import ModelConfig

N, H = 4, 8  # query heads, head dim


def reference(q, k, v, allowed, dout):
  """(out, dq, dk, dv) in float64: softmax over allowed keys; query head n reads KV head
  n // G. q [B, L, N, H], k/v [B, KVH, S, H], allowed [B, L, S], dout like q."""
  q, k, v, dout = (np.asarray(x, np.float64) for x in (q, k, v, dout))
  g = q.shape[2] // k.shape[1]
  kq, vq = np.repeat(k, g, axis=1), np.repeat(v, g, axis=1)  # [B, N, S, H]
  scale = q.shape[-1] ** -0.5
  scores = np.einsum("blnh,bnsh->bnls", q, kq) * scale
  scores = np.where(allowed[:, None], scores, -np.inf)
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  out = np.einsum("bnls,bnsh->blnh", probs, vq)
  dprobs = np.einsum("blnh,bnsh->bnls", dout, vq)
  dscores = probs * (dprobs - np.sum(dprobs * probs, -1, keepdims=True)) * scale
  dq = np.einsum("bnls,bnsh->blnh", dscores, kq)
  group_sum = lambda x: x.reshape(x.shape[0], -1, g, *x.shape[2:]).sum(2)  # noqa: E731
  dk = group_sum(np.einsum("bnls,blnh->bnsh", dscores, q))
  dv = group_sum(np.einsum("bnls,blnh->bnsh", probs, dout))
  return out, dq, dk, dv


def _case(layout: str, kv_heads: int, seed: int = 0):
  """(q, k, v, mask, real_BL): `real_BL` marks queries whose outputs are specified."""
  rng = np.random.RandomState(seed)
  b = 3
  if layout == "padded":  # right-padded rows, one row fully real
    lengths = np.array([37, 20, 5])
    pos = np.broadcast_to(np.arange(37), (b, 37))
    real = pos < lengths[:, None]
    mask = attention.Mask.causal(jnp.asarray(pos, jnp.int32), jnp.asarray(real))
    s = 37
  elif layout == "mid_padding":  # [prompt | padding | completion]: the plain train pass
    lp, n = 12, 9
    lengths = np.array([12, 7, 3])
    pos = np.concatenate([np.broadcast_to(np.arange(lp), (b, lp)),
                          lengths[:, None] + np.arange(n)[None]], axis=1)
    real = np.concatenate([np.arange(lp)[None] < lengths[:, None], np.ones((b, n), bool)], 1)
    mask = attention.Mask.causal(jnp.asarray(pos, jnp.int32), jnp.asarray(real))
    s = lp + n
  elif layout == "shared_prefix":  # G=3 completions of one context each, through its cache
    s, first = 40, np.array([9, 17, 4])
    pos = first[:, None] + np.arange(14)[None]
    real = np.ones_like(pos, bool)
    mask = attention.Mask.cache(jnp.asarray(pos, jnp.int32), s)
  else:  # decode: one query per row at its own live length
    s = 45
    pos = np.array([[3], [44], [20]])
    real = np.ones_like(pos, bool)
    mask = attention.Mask.cache(jnp.asarray(pos, jnp.int32), s)
  q = jnp.asarray(rng.randn(b, pos.shape[1], N, H), jnp.float32)
  k, v = (jnp.asarray(rng.randn(b, kv_heads, s, H), jnp.float32) for _ in range(2))
  return q, k, v, mask, real


def _run(name: str):
  if name == "cudnn_arrangement":  # cuDNN's argument arrangement, XLA as its backend (no GPU)
    return lambda q, k, v, m: attention_kernels.cudnn(q, k, v, m, backend="xla")
  return lambda q, k, v, m: attention.attend(q, k, v, m, name)


LAYOUTS = ["padded", "mid_padding", "shared_prefix", "decode"]
NAMES = ["xla", "chunked", "splash", "cudnn_arrangement"]


@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["mha", "gqa2", "gqa4"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", NAMES)
def test_forward_and_gradients_match_dense_reference(name, layout, kv_heads, monkeypatch):
  monkeypatch.setattr(attention, "KEY_BLOCK", 16)  # several blocks, the last one overlapping
  q, k, v, mask, real = _case(layout, kv_heads)
  dout = np.random.RandomState(1).randn(*q.shape) * real[:, :, None, None]
  run = _run(name)
  loss = lambda q, k, v: jnp.sum(run(q, k, v, mask) * dout)  # noqa: E731
  out, grads = jax.jit(lambda *x: (run(*x, mask), jax.grad(loss, (0, 1, 2))(*x)))(q, k, v)
  want = reference(q, k, v, np.asarray(mask.dense()), dout)
  np.testing.assert_allclose(np.asarray(out)[real], want[0][real], atol=1e-5, rtol=0)
  for got, ref, what in zip(grads, want[1:], ("dq", "dk", "dv")):
    np.testing.assert_allclose(np.asarray(got), ref, atol=1e-4, rtol=0, err_msg=what)


@pytest.mark.parametrize("step_cost", [0.0, 1e9], ids=["ragged", "batch"])
@pytest.mark.parametrize("kv_heads", [2, 1])
def test_decode_schedules_match_dense_reference(step_cost, kv_heads, monkeypatch):
  """Both decode schedules (over (row, live block) pairs, or every row up to the longest), for
  rows of very different live lengths, forward and gradients."""
  monkeypatch.setattr(attention, "KEY_BLOCK", 8)
  monkeypatch.setattr(attention, "_RAGGED_STEP_COST", step_cost)
  q, k, v, _, _ = _case("decode", kv_heads, seed=4)
  mask = attention.Mask.cache(jnp.asarray([[0], [44], [12]], jnp.int32), 45)
  dout = np.random.RandomState(5).randn(*q.shape)
  run = lambda q, k, v: attention.chunked(q, k, v, mask)  # noqa: E731
  out, grads = jax.jit(lambda *x: (run(*x), jax.grad(
      lambda *y: jnp.sum(run(*y) * dout), (0, 1, 2))(*x)))(q, k, v)
  want = reference(q, k, v, np.asarray(mask.dense()), dout)
  np.testing.assert_allclose(np.asarray(out), want[0], atol=1e-5, rtol=0)
  for got, ref in zip(grads, want[1:]):
    np.testing.assert_allclose(np.asarray(got), ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("step_cost", [0.0, 1e9], ids=["ragged", "batch"])
def test_decode_never_reads_keys_past_the_live_length(step_cost, monkeypatch):
  """Slots past every row's position hold NaN: a dense pass multiplies them (0 * NaN), the
  chunked loop stops before their blocks."""
  monkeypatch.setattr(attention, "KEY_BLOCK", 8)
  monkeypatch.setattr(attention, "_RAGGED_STEP_COST", step_cost)
  q, k, v, _, _ = _case("decode", 2)
  mask = attention.Mask.cache(jnp.asarray([[3], [17], [9]], jnp.int32), 45)
  np.testing.assert_array_equal(mask.live_lengths(), [4, 18, 10])
  k, v = k.at[:, :, 24:].set(jnp.nan), v.at[:, :, 24:].set(jnp.nan)
  assert np.isnan(np.asarray(attention.attend(q, k, v, mask, "xla"))).all()
  for name in ("chunked", "splash", "auto"):  # decode takes the live-length loop by any name
    got = attention.attend(q, k, v, mask, name)
    want = reference(q, k[:, :, :24], v[:, :, :24], np.asarray(mask.dense())[:, :, :24],
                     np.zeros(q.shape))[0]
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=0, err_msg=name)


def test_live_lengths_of_a_padded_self_attention_row():
  pos = jnp.broadcast_to(jnp.arange(6), (2, 6))
  mask = attention.Mask.causal(pos, jnp.asarray([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]]))
  np.testing.assert_array_equal(mask.live_lengths(), [4, 6])


def test_chunked_gradients_under_remat(monkeypatch):
  monkeypatch.setattr(attention, "KEY_BLOCK", 16)
  q, k, v, mask, real = _case("mid_padding", 2)
  dout = np.random.RandomState(2).randn(*q.shape) * real[:, :, None, None]
  loss = lambda q, k, v: jnp.sum(attention.chunked(q, k, v, mask) * dout)  # noqa: E731
  got = jax.jit(jax.grad(jax.checkpoint(loss), (0, 1, 2)))(q, k, v)
  want = reference(q, k, v, np.asarray(mask.dense()), dout)[1:]
  for g, w in zip(got, want):
    np.testing.assert_allclose(np.asarray(g), w, atol=1e-4, rtol=0)


@pytest.mark.parametrize("layout", ["mid_padding", "shared_prefix"])
@pytest.mark.parametrize("name", ["chunked", "splash"])
def test_sharded_on_eight_devices_equals_unsharded(name, layout, monkeypatch):
  """Batch over (data, fsdp), KV heads over tensor; splash runs per shard under shard_map."""
  monkeypatch.setattr(attention, "KEY_BLOCK", 16)
  mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(data=2, fsdp=2, tensor=2))
  rules = mesh_lib.ShardingRules()
  q, k, v, mask, real = _case(layout, 2)
  q, k, v = (jnp.concatenate([x, x[::-1]]) for x in (q, k, v))  # 6 rows -> 4 shards need 4k
  q, k, v = q[:4], k[:4], v[:4]
  mask = jax.tree.map(lambda x: jnp.concatenate([x, x[::-1]])[:4], mask)
  real = np.concatenate([real, real[::-1]])[:4]
  dout = np.random.RandomState(3).randn(*q.shape) * real[:, :, None, None]

  def fn(q, k, v, mesh=None):
    run = lambda *x: attention.attend(*x, mask, name, mesh=mesh, rules=rules)  # noqa: E731
    return run(q, k, v), jax.grad(lambda *x: jnp.sum(run(*x) * dout), (0, 1, 2))(q, k, v)

  shard = lambda axes: rules.sharding(mesh, axes)  # noqa: E731
  q_sh = shard(("batch", "length", "heads", "head_dim"))
  kv_sh = shard(("batch", "kv_heads", "cache_length", "head_dim"))
  got = jax.jit(lambda *x: fn(*x, mesh=mesh), in_shardings=(q_sh, kv_sh, kv_sh))(q, k, v)
  want = jax.jit(fn)(q, k, v)
  np.testing.assert_allclose(np.asarray(got[0])[real], np.asarray(want[0])[real], atol=1e-6)
  for g, w in zip(got[1], want[1]):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-6)


def test_auto_picks_per_platform():
  assert attention.resolve("auto", platform="tpu") == "splash"
  assert attention.resolve("auto", platform="gpu", dtype=jnp.bfloat16, head_dim=128) == "cudnn"
  assert attention.resolve("auto", platform="gpu", dtype=jnp.float32, head_dim=128) == "chunked"
  assert attention.resolve("auto", platform="gpu", dtype=jnp.bfloat16, head_dim=12) == "chunked"
  assert attention.resolve("auto", platform="cpu") == "xla"
  assert attention.resolve("chunked", platform="tpu") == "chunked"
  for name in ("auto", "chunked", "splash", "cudnn"):  # decode steps read live blocks only
    assert attention.resolve(name, platform="tpu", decode=True) == "chunked"
  assert attention.resolve("xla", platform="tpu", decode=True) == "xla"
  with pytest.raises(ValueError, match="model.attention='flash'"):
    attention.resolve("flash")
  with pytest.raises(ValueError, match="model.attention='flash'"):
    ModelConfig("llama", vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1,
                num_heads=2, num_kv_heads=1, head_dim=4, attention="flash")


def test_cudnn_refuses_float32_with_the_fix():
  q, k, v, mask, _ = _case("padded", 2)
  with pytest.raises(ValueError, match="model.compute_dtype='bfloat16'"):
    attention_kernels.cudnn(q, k, v, mask)


@pytest.mark.parametrize("queries", [1, 5])
def test_attention_traced_for_another_platform(queries):
  """compile_check traces programs for a TPU on this CPU: `auto` must then trace the TPU's
  formulation (the splash kernel; a decode step the live-length loop), not XLA:CPU's dense
  scores (a CPU decode step over at most two key blocks is one dense pass too)."""
  q, k, v, _, _ = _case("decode", 2)
  q = jnp.repeat(q, queries, axis=1)
  mask = attention.Mask.cache(jnp.asarray([[3], [20], [9]]) + jnp.arange(queries), 45)
  # A new function per trace: JAX caches traces by function, not by the traced-for platform.
  primitives = lambda: str(jax.make_jaxpr(  # noqa: E731
      lambda *xs: attention.attend(*xs, mask))(q, k, v))
  assert attention.trace_platform() == "cpu"
  here = primitives()
  with attention.tracing_for_platform("tpu"):
    assert attention.trace_platform() == "tpu"
    there = primitives()
  assert attention.trace_platform() == "cpu"
  assert "pallas_call" not in here and "while" not in here
  assert ("while" if queries == 1 else "pallas_call") in there
