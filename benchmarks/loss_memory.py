"""Peak temporary memory of per-token log-probs + entropies, forward and backward.

Compiles (never runs) jax.grad of  sum(c * logp) + sum(entropy)  w.r.t. hidden and unembed for
  * chunked:    rpt_jax.rl.loss.token_logprobs_and_entropy (chunks of `--chunk` positions),
  * unchunked:  full [B, T, V] logits + log_softmax (the baseline it replaces),
  * vocab-par.: the chunked path under a (fsdp=2, tensor=4) mesh of 8 simulated devices,
and prints XLA's `memory_analysis().temp_size_in_bytes` beside the size of one fp32 logits
tensor of [chunk, V] (a chunk is `--chunk` positions of the flattened B x T) and of [B, T, V].
Temp bytes exclude arguments and outputs (the [D, V]
unembed gradient is an output). The sharded row is per device.

  python benchmarks/loss_memory.py                      # B=8 T=1024 D=256 chunk=128, both vocabs
  python benchmarks/loss_memory.py --vocab 151936 --chunk 256

Measured (CPU, jax 0.10.2, defaults, chunks over rows x tokens): V=151,936: chunked 223 MiB
(3.0 x C*V*4) vs unchunked 14,244 MiB (3.0 x B*T*V*4); per device under fsdp2 x tensor4: 111 MiB.
V=8,192: 12 vs 768 MiB. Chunked temp grows with --chunk, not with B or T.
"""

from __future__ import annotations

import os

# Simulated CPU devices for the vocab-parallel row; must precede the JAX import.
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=8").strip()

import argparse  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from rpt_jax.mesh import MeshConfig, make_mesh  # noqa: E402
from rpt_jax.rl.loss import token_logprobs_and_entropy  # noqa: E402

MIB = 2 ** 20


def _unchunked(h, w, t, temperature):
  logsm = jax.nn.log_softmax(
      jnp.einsum("btd,dv->btv", h, w, preferred_element_type=jnp.float32) / temperature, -1)
  return (jnp.take_along_axis(logsm, t[..., None], -1)[..., 0],
          -(jnp.exp(logsm) * logsm).sum(-1))


def _temp_bytes(logprob_fn, b, t, d, v, shardings=(None, None, None)):
  """temp bytes of the compiled grad of a scalar built from (logp, entropy)."""

  def objective(h, w, tgt):
    logp, ent = logprob_fn(h, w, tgt)
    return (logp * jnp.linspace(0.5, 1.5, t)).sum() + ent.sum()

  shapes = [jax.ShapeDtypeStruct((b, t, d), jnp.float32, sharding=shardings[0]),
            jax.ShapeDtypeStruct((d, v), jnp.float32, sharding=shardings[1]),
            jax.ShapeDtypeStruct((b, t), jnp.int32, sharding=shardings[2])]
  compiled = jax.jit(jax.grad(objective, (0, 1))).lower(*shapes).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--length", type=int, default=1024)
  parser.add_argument("--dim", type=int, default=256)
  parser.add_argument("--chunk", type=int, default=128)
  parser.add_argument("--vocab", type=int, nargs="+", default=[151936, 8192])
  parser.add_argument("--temperature", type=float, default=0.8)
  parser.add_argument("--skip-sharded", action="store_true")
  args = parser.parse_args()
  b, t, d, c, tau = args.batch, args.length, args.dim, args.chunk, args.temperature

  print(f"backend={jax.default_backend()} devices={jax.device_count()} jax={jax.__version__} "
        f"B={b} T={t} D={d} chunk={c} (fp32, forward+backward, compile-only)")
  header = (f"{'vocab':>7} | {'variant':<26} | {'temp MiB':>9} | {'C*V*4 MiB':>11} | "
            f"{'B*T*V*4 MiB':>11} | {'temp/(C*V*4)':>14}")
  print(header)
  print("-" * len(header))
  for v in args.vocab:
    chunk_logits = c * v * 4  # One [chunk, V] fp32 logits block.
    full_logits = b * t * v * 4
    rows = [
        ("chunked", _temp_bytes(
            lambda h, w, tg: token_logprobs_and_entropy(h, w, tg, temperature=tau, chunk_size=c),
            b, t, d, v), chunk_logits),
        ("unchunked (full logits)", _temp_bytes(
            lambda h, w, tg: _unchunked(h, w, tg, tau), b, t, d, v), chunk_logits),
    ]
    if not args.skip_sharded and jax.device_count() >= 8:
      mesh = make_mesh(MeshConfig(data=1, fsdp=2, tensor=4), jax.devices()[:8])
      shardings = (NamedSharding(mesh, P("fsdp", None, None)),
                   NamedSharding(mesh, P("fsdp", "tensor")),
                   NamedSharding(mesh, P("fsdp", None)))
      rows.append((
          "chunked fsdp2 x tensor4/dev", _temp_bytes(
              lambda h, w, tg: token_logprobs_and_entropy(
                  h, w, tg, temperature=tau, chunk_size=c, mesh=mesh),
              b, t, d, v, shardings),
          c * (v // 4) * 4))  # Per device: one chunk of V / tensor columns.
    for name, temp, unit in rows:
      print(f"{v:>7} | {name:<26} | {temp / MIB:>9.1f} | {unit / MIB:>11.1f} | "
            f"{full_logits / MIB:>11.1f} | {temp / unit:>14.2f}")


if __name__ == "__main__":
  main()
