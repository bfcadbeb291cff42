"""Timing helpers shared by the benchmarks: best-of-N wall time and this machine's matmul peak.

Benchmarks run as scripts (`python benchmarks/X.py`), so they import this as `timing`.
"""

import time

import jax
import jax.numpy as jnp


def best_time(fn, iters: int) -> float:
  """Best wall time of `iters` calls after one warm-up (compile) call; fn returns a pytree.

  The best, not the mean: on a shared CPU the fastest run is the one least disturbed.
  """
  jax.block_until_ready(fn())
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return min(times)


def matmul_peak(shapes=((2048, 2048, 2048),), dtype="float32", iters: int = 5) -> float:
  """Measured FLOP/s: the best jitted [m,k]@[k,n] over `shapes`, best of `iters` each."""
  mm = jax.jit(lambda x, y: x @ y)
  best = 0.0
  for m, k, n in shapes:
    a = jax.random.normal(jax.random.key(0), (m, k), jnp.dtype(dtype))
    b = jax.random.normal(jax.random.key(1), (k, n), jnp.dtype(dtype))
    best = max(best, 2 * m * k * n / best_time(lambda: mm(a, b), iters))
  return best
