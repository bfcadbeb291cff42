"""Attention memory and decode cost: `chunked` (online softmax, live-length decode) vs `xla`.

Run:  python benchmarks/attention.py [--lengths 1024,2048,4096,8192 --cache 4096 --batch 8]
      python benchmarks/attention.py --tpu        (+ 1b: compiled for a TPU v4 chip, libtpu)
      python benchmarks/attention.py --smoke      (tiny shapes, seconds)

Prints, in one run, for a small qwen2-style model (2 layers, 8/2 heads of 64, remat per layer
as the pod configs run):
  1. the compiled temporary bytes (`compiled.memory_analysis().temp_size_in_bytes`) of a train
     step (forward + backward to every parameter) at each length T, for `xla` (dense [T, T]
     scores) and `chunked`, their ratio, and each one's growth from T to 2T (2x: linear,
     4x: quadratic);
  2. the time of one decode step (one token per row, KV cache donated) at live lengths 10%,
     50% and 100% of the cache, and with one row at 100% and the rest at 10% (the long tail),
     for both: `xla` reads the whole cache every step, `chunked` only the live blocks, so its
     time must grow with the live length (and, ragged, with the rows' summed live lengths).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from rpt_jax.model import attention  # noqa: E402
from rpt_jax.model.config import ModelConfig  # noqa: E402
from rpt_jax.model.transformer import KVCache, init_model  # noqa: E402
from timing import best_time  # noqa: E402  (benchmarks/timing.py)

CONFIG = ModelConfig(family="qwen2", vocab_size=512, hidden_size=256, intermediate_size=512,
                     num_layers=2, num_heads=8, num_kv_heads=2, head_dim=64,
                     attention_bias=True, max_position_embeddings=16384, remat="full")
SMOKE = dataclasses.replace(CONFIG, hidden_size=64, intermediate_size=128, num_heads=4,
                            head_dim=16)


def train_step_temp_bytes(config: ModelConfig, implementation: str, length: int,
                          batch: int = 1) -> int:
  """Temporary bytes XLA allocates for grad(sum of final hidden states^2) at [batch, length]
  (compiled, never run: the dense version at 8k would need GiBs)."""
  model = init_model(dataclasses.replace(config, attention=implementation))
  graphdef, state = nnx.split(model)

  def loss(state, tokens):
    hidden, _ = nnx.merge(graphdef, state).hidden_states(tokens)
    return jnp.sum(jnp.square(hidden.astype(jnp.float32)))

  tokens = jax.ShapeDtypeStruct((batch, length), jnp.int32)
  compiled = jax.jit(jax.grad(loss)).lower(state, tokens).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def tpu_train_step_temp_bytes(config: ModelConfig, implementation: str, length: int) -> int:
  """`train_step_temp_bytes` compiled ahead of time for one TPU v4 chip described by libtpu
  (`jax[tpu]` installed, no TPU needed), traced as the TPU runs it, in bf16."""
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  from jax.sharding import Mesh, NamedSharding, PartitionSpec  # pylint: disable=g-import-not-at-top
  for key, value in dict(TPU_SKIP_MDS_QUERY="1", TPU_WORKER_HOSTNAMES="localhost",
                         ALLOW_MULTIPLE_LIBTPU_LOAD="1", TPU_ACCELERATOR_TYPE="v4-8").items():
    os.environ.setdefault(key, value)
  device = topologies.get_topology_desc(
      platform="tpu", topology_name="v4:2x2x1", chip_config_name="megacore",
      chips_per_host_bounds=(2, 2, 1), num_slices=1).devices[0]
  one_chip = NamedSharding(Mesh(np.asarray([device]), ("x",)), PartitionSpec())
  config = dataclasses.replace(config, attention=implementation, compute_dtype="bfloat16")
  with attention.tracing_for_platform("tpu"):
    graphdef, state = nnx.split(nnx.eval_shape(lambda: init_model(config)))

    def loss(state, tokens):
      hidden, _ = nnx.merge(graphdef, state).hidden_states(tokens)
      return jnp.sum(jnp.square(hidden.astype(jnp.float32)))

    place = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one_chip)  # noqa: E731
    tokens = jax.ShapeDtypeStruct((1, length), jnp.int32, sharding=one_chip)
    compiled = jax.jit(jax.grad(loss)).lower(jax.tree.map(place, state), tokens).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def decode_step_seconds(config: ModelConfig, implementation: str, cache_length: int,
                        live: int | list[int], batch: int, iters: int) -> float:
  """Best wall time of one jitted decode step: row b at position live[b] - 1 (an int: every
  row) of a `cache_length`-slot cache (donated, so the cache write is in place)."""
  model = init_model(dataclasses.replace(config, attention=implementation, remat="none"))
  graphdef, state = nnx.split(model)

  @functools.partial(jax.jit, donate_argnums=1)
  def step(state, cache, tokens, positions):
    hidden, cache = nnx.merge(graphdef, state).hidden_states(tokens, positions, None,
                                                             cache=cache)
    return hidden, cache

  cache = KVCache.init(model.config, batch, cache_length)
  tokens = jnp.ones((batch, 1), jnp.int32)
  positions = jnp.broadcast_to(jnp.asarray(live, jnp.int32) - 1, (batch,))[:, None]
  holder = [cache]

  def once():
    hidden, holder[0] = step(state, holder[0], tokens, positions)
    return hidden

  return best_time(once, iters)


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--lengths", default="1024,2048,4096,8192")
  parser.add_argument("--cache", type=int, default=4096)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--iters", type=int, default=5)
  parser.add_argument("--smoke", action="store_true", help="tiny shapes (the test suite)")
  parser.add_argument("--tpu", action="store_true",
                      help="also: the train step compiled for a TPU v4 chip (libtpu), xla vs "
                      "splash vs chunked")
  args = parser.parse_args(argv)
  config, lengths = CONFIG, [int(x) for x in args.lengths.split(",")]
  cache, batch, iters = args.cache, args.batch, args.iters
  if args.smoke:
    config, lengths, cache, batch, iters = SMOKE, [64, 128], 256, 2, 1
  names = ("xla", "chunked")
  result = {"train_temp_bytes": {}, "decode_seconds": {}}
  print(f"1. train step temporaries (batch 1, {config.num_layers} layers, {config.num_heads} "
        "heads):")
  print(f"{'T':>6} {'xla MiB':>10} {'chunked MiB':>12} {'chunked/xla':>12} "
        f"{'xla growth':>11} {'chunked growth':>15}")
  prev = None
  for t in lengths:
    row = {n: train_step_temp_bytes(config, n, t) for n in names}
    result["train_temp_bytes"][t] = row
    growth = ["" if prev is None else f"{row[n] / prev[n]:.2f}x" for n in names]
    print(f"{t:>6} {row['xla'] / 2**20:>10.1f} {row['chunked'] / 2**20:>12.1f} "
          f"{row['chunked'] / row['xla']:>12.3f} {growth[0]:>11} {growth[1]:>15}")
    prev = row
  if args.tpu:
    tpu_names = ("xla", "splash", "chunked")
    print("1b. the same, compiled for one TPU v4 chip (bf16, libtpu ahead of time):")
    print(f"{'T':>6} " + " ".join(f"{n + ' MiB':>12}" for n in tpu_names)
          + f" {'splash/xla':>11}")
    result["tpu_train_temp_bytes"] = {}
    for t in lengths:
      row = {n: tpu_train_step_temp_bytes(config, n, t) for n in tpu_names}
      result["tpu_train_temp_bytes"][t] = row
      print(f"{t:>6} " + " ".join(f"{row[n] / 2**20:>12.1f}" for n in tpu_names)
            + f" {row['splash'] / row['xla']:>11.3f}")
  print(f"2. decode step (batch {batch}, cache {cache} slots), best of {iters}:")
  print(f"{'live':>21} {'xla ms':>9} {'chunked ms':>11} {'chunked/xla':>12} "
        f"{'chunked vs 100%':>16}")
  lives = {f"{p}%": max(1, cache * p // 100) for p in (10, 50, 100)}
  # The long tail of RPT rollouts: one row near the cache's end, the others early.
  lives["1 row 100%, rest 10%"] = [cache] + [max(1, cache // 10)] * (batch - 1)
  for label, live in lives.items():
    result["decode_seconds"][label] = {
        n: decode_step_seconds(config, n, cache, live, batch, iters) for n in names}
  full = result["decode_seconds"]["100%"]["chunked"]
  for label, row in result["decode_seconds"].items():
    print(f"{label:>21} {row['xla'] * 1e3:>9.2f} {row['chunked'] * 1e3:>11.2f} "
          f"{row['chunked'] / row['xla']:>12.2f} {row['chunked'] / full:>16.2f}")
  return result


if __name__ == "__main__":
  main()
