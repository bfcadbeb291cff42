"""The CPU decode attention kernel against numpy softmax attention, its use by `attend`, and
the fallback when it cannot be built."""

import logging
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rpt_jax.model import attention, cpu_decode_kernel

needs_kernel = pytest.mark.skipif(not cpu_decode_kernel.available(),
                                  reason="no C++ compiler: the kernel cannot be built here")


def _numpy_decode(q_BKGH, k_BKSH, v_BKSH, live_B) -> np.ndarray:
  out = np.zeros(q_BKGH.shape)
  b, kvh, g, h = q_BKGH.shape
  for row in range(b):
    n = min(max(int(live_B[row]), 1), k_BKSH.shape[2])
    for kv in range(kvh):
      scores = k_BKSH[row, kv, :n].astype(np.float64) @ q_BKGH[row, kv].T / np.sqrt(h)  # [n, G]
      weights = np.exp(scores - scores.max(axis=0))
      out[row, kv] = (weights / weights.sum(axis=0)).T @ v_BKSH[row, kv, :n]
  return out


@needs_kernel
@pytest.mark.parametrize("g,h", [(4, 32), (2, 64), (5, 128), (1, 32), (9, 32), (3, 24)])
def test_kernel_equals_softmax_over_each_rows_live_keys(g, h):
  """Vector paths (Dh 32/64/128, G <= 8) and the plain loops (G 9, Dh 24); live lengths from 1
  to past the cache (clamped to S)."""
  rng = np.random.RandomState(g * 1000 + h)
  b, kvh, s = 5, 2, 37
  q = rng.randn(b, kvh, g, h).astype(np.float32)
  k, v = rng.randn(b, kvh, s, h).astype(np.float32), rng.randn(b, kvh, s, h).astype(np.float32)
  live = np.asarray([1, 5, 36, 37, 60], np.int32)
  got = jax.jit(cpu_decode_kernel.decode_attention)(q, k, v, live)
  np.testing.assert_allclose(np.asarray(got), _numpy_decode(q, k, v, live), rtol=2e-5,
                             atol=2e-5)


@needs_kernel
def test_nan_input_gives_nan_output():
  q = np.ones((1, 1, 2, 32), np.float32)
  k, v = np.ones((1, 1, 4, 32), np.float32), np.ones((1, 1, 4, 32), np.float32)
  v[0, 0, 2, 5] = np.nan
  out = np.asarray(cpu_decode_kernel.decode_attention(q, k, v, np.asarray([4], np.int32)))
  assert np.isnan(out[0, 0, :, 5]).all() and np.isfinite(np.delete(out, 5, axis=-1)).all()


@needs_kernel
def test_attend_runs_decode_steps_on_the_kernel_and_matches_the_xla_path():
  """A one-token step against a KV cache (row b at position p_b reads slots <= p_b): the jitted
  program calls the kernel, and its output equals `chunked`'s XLA formulation."""
  rng = np.random.RandomState(0)
  b, n, kvh, h, s = 3, 8, 2, 32, 40
  q = jnp.asarray(rng.randn(b, 1, n, h), jnp.float32)
  k, v = (jnp.asarray(rng.randn(b, kvh, s, h), jnp.float32) for _ in range(2))
  mask = attention.Mask.cache(jnp.asarray([[0], [17], [39]], jnp.int32), s)
  step = jax.jit(lambda q, k, v, mask: attention.attend(q, k, v, mask, "auto"))
  assert cpu_decode_kernel.TARGET in step.lower(q, k, v, mask).as_text()
  np.testing.assert_allclose(np.asarray(step(q, k, v, mask)),
                             np.asarray(attention.chunked(q, k, v, mask)), rtol=1e-5, atol=1e-5)


def test_without_a_compiler_decode_steps_keep_the_xla_path(monkeypatch, caplog, tmp_path):
  monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
  monkeypatch.setenv("RPT_JAX_KERNEL_CACHE", str(tmp_path))
  cpu_decode_kernel.available.cache_clear()
  try:
    with caplog.at_level(logging.INFO, logger=cpu_decode_kernel.__name__):
      assert not cpu_decode_kernel.available()
    assert "unavailable" in caplog.text
    q = jnp.ones((1, 1, 2, 8), jnp.float32)
    kv = jnp.ones((1, 1, 4, 8), jnp.float32)
    lowered = jax.jit(lambda q, k, v: attention.attend(
        q, k, v, attention.Mask.cache(jnp.zeros((1, 1), jnp.int32), 4))).lower(q, kv, kv)
    assert cpu_decode_kernel.TARGET not in lowered.as_text()
  finally:
    cpu_decode_kernel.available.cache_clear()


def test_the_switch_turns_it_off():
  code = ("from rpt_jax.model import cpu_decode_kernel as c; "
          "assert not c.available(); print('off')")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       env={**os.environ, "RPT_JAX_CPU_KERNEL": "0"})
  assert out.stdout.strip() == "off"
