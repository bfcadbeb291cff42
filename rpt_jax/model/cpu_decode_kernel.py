"""The CPU decode-step attention kernel (`cpu_decode_attention.cc`): built on first use, called
through XLA's FFI.

XLA:CPU runs a decode step's attention as separate fused ops (scores, softmax, weighted values),
so the KV cache streams through the cores more than once and the per-(row, KV head) matmuls are
tiny: 1.4-1.6 ms per layer for 128 rows x 320 keys of model (a) in benchmarks/sampler.py, at
~15 GB/s. The kernel reads each live key and value once per (row, KV head), with the G query
heads of that KV head in registers: 0.56-1.0 ms on the same input (min of 100 calls; the XLA
path 1.48-1.53 ms in the same runs), and it reads only a row's live keys instead of the whole
cache.

Built with the system C++ compiler (`c++`, or $CXX) against jaxlib's FFI headers, for this
CPU (-march=native), into ~/.cache/rpt_jax/kernels (or $RPT_JAX_KERNEL_CACHE), once per source,
jaxlib and CPU. Where there is no compiler or the build fails, `available()` is False and the
callers keep XLA's formulation (one log line says why). RPT_JAX_CPU_KERNEL=0 turns it off.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile

import jax
import jax.numpy as jnp

log = logging.getLogger(__name__)
Array = jax.Array

TARGET = "rpt_cpu_decode_attention"
_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu_decode_attention.cc")
# -ffast-math: the sums reassociate and exp vectorizes (2x the kernel's speed); a NaN input still
# comes out NaN (tests/model/test_cpu_decode_kernel.py).
_FLAGS = ("-O3", "-march=native", "-ffast-math", "-shared", "-fPIC", "-std=c++17")


def _cpu_name() -> str:
  """The CPU's model and instruction-set flags (-march=native builds for exactly these)."""
  lines = {}
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        key = line.split(":", 1)[0].strip()
        if key in ("model name", "flags", "Features") and key not in lines:
          lines[key] = line.strip()
  except OSError:
    pass
  return "\n".join(lines.values()) or platform.processor() or platform.machine()


def _build() -> str:
  """Path of the compiled kernel library (built now unless cached)."""
  import jaxlib  # pylint: disable=g-import-not-at-top
  compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
  if not compiler:
    raise RuntimeError("no C++ compiler (c++, g++ or $CXX) on PATH")
  with open(_SOURCE, "rb") as f:
    source = f.read()
  key = hashlib.sha256(b"\0".join([source, jaxlib.__version__.encode(), " ".join(_FLAGS).encode(),
                                   compiler.encode(), _cpu_name().encode()])).hexdigest()[:16]
  cache = os.environ.get("RPT_JAX_KERNEL_CACHE") or os.path.join(
      os.path.expanduser("~"), ".cache", "rpt_jax", "kernels")
  path = os.path.join(cache, f"cpu_decode_attention-{key}.so")
  if os.path.exists(path):
    return path
  os.makedirs(cache, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=cache) as tmp:  # parallel builds: rename is atomic
    built = os.path.join(tmp, "kernel.so")
    result = subprocess.run([compiler, *_FLAGS, f"-I{jax.ffi.include_dir()}", _SOURCE, "-o",
                             built], capture_output=True, text=True, check=False)
    if result.returncode:
      raise RuntimeError(f"{compiler} failed: {result.stderr.strip()[-500:]}")
    os.replace(built, path)
  return path


@functools.cache
def available() -> bool:
  """Whether the kernel is built and registered with XLA (cached per process)."""
  if os.environ.get("RPT_JAX_CPU_KERNEL", "1") == "0":
    log.info("CPU decode attention kernel off (RPT_JAX_CPU_KERNEL=0)")
    return False
  try:
    library = ctypes.cdll.LoadLibrary(_build())
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(library.RptCpuDecodeAttention),
                                platform="cpu")
  except (OSError, RuntimeError, AttributeError) as e:
    log.info("CPU decode attention kernel unavailable, XLA's formulation is used: %s", e)
    return False
  log.info("CPU decode attention kernel loaded")
  return True


def decode_attention(q_BKGH: Array, k_BKSH: Array, v_BKSH: Array, live_B: Array) -> Array:
  """out_BKGH (float32): each row's query heads over its first live_B keys (clamped to
  [1, S]); q, k, v float32 (no cast here: a cast would copy the cache), live int32. Call only
  where `available()`."""
  return jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(q_BKGH.shape, jnp.float32))(
      q_BKGH, k_BKSH, v_BKSH, live_B.astype(jnp.int32))


def applies(q_BLNH: Array, k_BKSH: Array, v_BKSH: Array, mesh, platform: str) -> bool:
  """Whether a decode step runs on the kernel: traced for the CPU, float32, on one device (the
  FFI call is not partitioned), and the kernel is built."""
  return (platform == "cpu" and (mesh is None or mesh.devices.size == 1)
          and all(x.dtype == jnp.float32 for x in (q_BLNH, k_BKSH, v_BKSH)) and available())


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def decode_step(reference, q_BLNH: Array, k_BKSH: Array, v_BKSH: Array, mask) -> Array:
  """One query per row against a KV cache (an `attention.Mask.cache`: row b reads slots
  [0, its position]): out_BLNH. Gradients are `reference`'s (the XLA formulation), recomputed:
  the kernel has no backward pass, and only tests differentiate a decode step."""
  del reference
  b, _, n, h = q_BLNH.shape
  kvh, s = k_BKSH.shape[1], k_BKSH.shape[2]
  live_B = jnp.minimum(mask.q_positions_BL[:, 0] + 1, s)
  out = decode_attention(q_BLNH.reshape(b, kvh, n // kvh, h), k_BKSH, v_BKSH, live_B)
  return out.reshape(b, 1, n, h).astype(v_BKSH.dtype)


def _decode_step_fwd(reference, q_BLNH, k_BKSH, v_BKSH, mask):
  return decode_step(reference, q_BLNH, k_BKSH, v_BKSH, mask), (q_BLNH, k_BKSH, v_BKSH, mask)


def _decode_step_bwd(reference, residuals, dout_BLNH):
  q_BLNH, k_BKSH, v_BKSH, mask = residuals
  _, vjp = jax.vjp(lambda q, k, v: reference(q, k, v, mask), q_BLNH, k_BKSH, v_BKSH)
  return (*vjp(dout_BLNH), None)


decode_step.defvjp(_decode_step_fwd, _decode_step_bwd)
