"""The measurements of `benchmarks/device_check.sh`: one accelerator's figures in one JSON.

  python benchmarks/device_check.py --out device_check.json        (GPU, the ~1B config)
  python benchmarks/device_check.py --cpu --out /tmp/dc.json       (tiny shapes, seconds)

Measures, each against the chip's own peak:
  train_mfu         a bf16 train step (forward, backward, SGD update) of a ~1B-parameter
                    qwen2-style model: model FLOPs (3 x forward, PaLM's full-length attention
                    count) per second / the chip's dense bf16 peak (H100, H200: 989 TFLOP/s);
  decode_bandwidth  greedy decode steps in one jitted loop: bytes read (bf16 weights + each
                    row's live KV cache) per second / the chip's HBM bandwidth (H100 3.35,
                    H200 4.8 TB/s);
  sampler           `Sampler.generate` tokens/s (G completions per shared prompt);
  attention         each implementation's forward+backward time at one train shape and a
                    decode step at half a cache, with its ratio to `xla` measured in the same
                    run.
On CPU (`--cpu`) the peaks are measured here (best fp32 matmul, a streaming sum) and the model
is tiny: the run checks the script end to end, its figures mean nothing for an accelerator.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from rpt_jax.model import attention  # noqa: E402
from rpt_jax.model.config import ModelConfig  # noqa: E402
from rpt_jax.model.transformer import KVCache, init_model  # noqa: E402
from timing import best_time, matmul_peak  # noqa: E402  (benchmarks/timing.py)

# Dense bf16 FLOP/s and HBM bytes/s per chip, from the vendor's data sheets (SXM parts).
CHIPS = {"H200": (989e12, 4.8e12), "H100": (989e12, 3.35e12)}
# ~1B parameters: 18 layers of hidden 2,048, 16/8 heads of 128, MLP 5,632, vocab 32,000.
BILLION = ModelConfig(family="qwen2", vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                      num_layers=18, num_heads=16, num_kv_heads=8, head_dim=128,
                      attention_bias=True, max_position_embeddings=8192,
                      param_dtype="bfloat16", compute_dtype="bfloat16")
TINY = dataclasses.replace(BILLION, vocab_size=256, hidden_size=64, intermediate_size=128,
                           num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                           param_dtype="float32", compute_dtype="float32")


@dataclasses.dataclass(frozen=True)
class Shapes:
  train_batch: int = 4
  train_length: int = 2048
  decode_batch: int = 64
  decode_cache: int = 4096
  decode_steps: int = 64
  sampler_contexts: int = 8
  sampler_generations: int = 8
  sampler_prompt: int = 512
  sampler_new: int = 256
  attn_batch: int = 4
  attn_length: int = 4096
  iters: int = 5


CPU_SHAPES = Shapes(train_batch=2, train_length=64, decode_batch=4, decode_cache=128,
                    decode_steps=4, sampler_contexts=2, sampler_generations=2, sampler_prompt=16,
                    sampler_new=8, attn_batch=2, attn_length=128, iters=1)


def chip(cpu: bool, iters: int) -> dict:
  """name, peak FLOP/s and memory bytes/s: the data sheet's for a known GPU, measured on CPU."""
  if cpu:
    x = jnp.ones((16 * 2 ** 20,), jnp.float32)
    total = jax.jit(jnp.sum)
    seconds = best_time(lambda: total(x), max(iters, 3))
    return dict(name="cpu (measured peaks)", peak_flops=matmul_peak(((512, 512, 512),)),
                peak_bytes_per_s=x.nbytes / seconds)
  name = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                        capture_output=True, text=True, check=True).stdout.splitlines()[0]
  known = next((k for k in CHIPS if k in name), None)
  if known is None:
    raise SystemExit(f"GPU {name!r} has no data-sheet peak in benchmarks/device_check.py CHIPS; "
                     "add its dense bf16 FLOP/s and HBM bytes/s there.")
  return dict(name=name, peak_flops=CHIPS[known][0], peak_bytes_per_s=CHIPS[known][1])


def train_mfu(config: ModelConfig, shapes: Shapes, peak_flops: float) -> dict:
  """Model FLOP/s of a jitted train step (bf16 compute, params updated in place)."""
  model = init_model(dataclasses.replace(config, param_dtype="float32"))
  graphdef, state = nnx.split(model)
  b, t = shapes.train_batch, shapes.train_length

  @functools.partial(jax.jit, donate_argnums=0)
  def step(state, tokens):
    def loss(state):
      logits = nnx.merge(graphdef, state)(tokens[:, :-1])
      logp = jax.nn.log_softmax(logits)
      return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))
    value, grads = jax.value_and_grad(loss)(state)
    return jax.tree.map(lambda p, g: p - 1e-4 * g, state, grads), value

  tokens = jax.random.randint(jax.random.key(0), (b, t + 1), 0, config.vocab_size)
  holder = [state]

  def once():
    holder[0], value = step(holder[0], tokens)
    return value

  seconds = best_time(once, shapes.iters)
  flops = 3 * config.flops_per_token(t) * b * t
  return dict(seconds=seconds, tokens_per_s=b * t / seconds, model_flops_per_s=flops / seconds,
              mfu=flops / seconds / peak_flops, attention=attention.resolve(config.attention,
                                                                            dtype=jnp.bfloat16,
                                                                            head_dim=128))


def decode_bandwidth(config: ModelConfig, shapes: Shapes, peak_bytes: float) -> dict:
  """Bytes/s of greedy decode steps from half a cache: weights + live KV read per step."""
  model = init_model(config)
  graphdef, state = nnx.split(model)
  b, s, steps = shapes.decode_batch, shapes.decode_cache, shapes.decode_steps
  start = s // 2

  @functools.partial(jax.jit, donate_argnums=1)
  def run(state, cache, tokens_B1):
    m = nnx.merge(graphdef, state)

    def body(i, carry):
      cache, tok = carry
      hidden, cache = m.hidden_states(tok, jnp.full((b, 1), start + i, jnp.int32), None,
                                      cache=cache)
      return cache, jnp.argmax(m.logits(hidden), axis=-1).astype(jnp.int32)

    return jax.lax.fori_loop(0, steps, body, (cache, tokens_B1))

  holder = [KVCache.init(config, b, s)]
  tokens = jnp.ones((b, 1), jnp.int32)

  def once():
    holder[0], tok = run(state, holder[0], tokens)
    return tok

  seconds = best_time(once, shapes.iters)
  weight_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
  kv_per_token = 2 * config.num_layers * config.num_kv_heads * config.head_dim * jnp.dtype(
      config.compute_dtype).itemsize
  live_tokens = sum(b * (start + i + 1) for i in range(steps))
  total = steps * weight_bytes + live_tokens * kv_per_token
  return dict(seconds_per_step=seconds / steps, bytes_per_s=total / seconds,
              share_of_peak=total / seconds / peak_bytes, batch=b, cache=s)


def sampler_tokens_per_s(config: ModelConfig, shapes: Shapes) -> dict:
  from rpt_jax.rl.sampler import Sampler  # pylint: disable=g-import-not-at-top
  sampler = Sampler(init_model(config))
  c, p = shapes.sampler_contexts, shapes.sampler_prompt
  prompts = np.random.RandomState(0).randint(1, config.vocab_size, (c, p)).astype(np.int32)
  lengths = np.full((c,), p, np.int32)
  generate = lambda: sampler.generate(  # noqa: E731
      prompts, lengths, num_samples=shapes.sampler_generations,
      max_new_tokens=shapes.sampler_new, temperature=0.8, rng=jax.random.key(0)).tokens
  seconds = best_time(generate, max(1, shapes.iters // 2))
  rows = c * shapes.sampler_generations
  return dict(seconds=seconds, tokens_per_s=rows * shapes.sampler_new / seconds, rows=rows)


def attention_times(shapes: Shapes, dtype, names: tuple[str, ...]) -> dict:
  """fwd+bwd seconds of each implementation at [attn_batch, attn_length] (16/8 heads of 128 on
  an accelerator, 4/2 of 16 on CPU) and a decode step at half a cache; ratios to xla."""
  b, t = shapes.attn_batch, shapes.attn_length
  n, kvh, h = (4, 2, 16) if t <= 256 else (16, 8, 128)
  keys = jax.random.split(jax.random.key(1), 3)
  q = jax.random.normal(keys[0], (b, t, n, h), dtype)
  k, v = (jax.random.normal(key, (b, kvh, t, h), dtype) for key in keys[1:])
  positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  mask = attention.Mask.causal(positions, positions < t - t // 8)
  q1 = q[:, :1]
  decode_mask = attention.Mask.cache(jnp.full((b, 1), t // 2, jnp.int32), t)
  out = {}
  for name in names:
    grad = jax.jit(jax.grad(lambda q, k, v, name=name: jnp.sum(
        attention.attend(q, k, v, mask, name).astype(jnp.float32)), (0, 1, 2)))
    step = jax.jit(lambda q, k, v, name=name: attention.attend(q, k, v, decode_mask, name))
    out[name] = dict(train_seconds=best_time(lambda: grad(q, k, v), shapes.iters),
                     decode_seconds=best_time(lambda: step(q1, k, v), shapes.iters))
  for name in names:
    out[name]["train_vs_xla"] = out[name]["train_seconds"] / out["xla"]["train_seconds"]
    out[name]["decode_vs_xla"] = out[name]["decode_seconds"] / out["xla"]["decode_seconds"]
  return out


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--cpu", action="store_true", help="tiny shapes on CPU")
  parser.add_argument("--out", default="device_check.json")
  parser.add_argument("--tests", default="", help="the test run's summary line, recorded as is")
  args = parser.parse_args(argv)
  shapes, config = (CPU_SHAPES, TINY) if args.cpu else (Shapes(), BILLION)
  began = time.perf_counter()
  result = dict(platform=jax.default_backend(), jax=jax.__version__, tests=args.tests,
                chip=chip(args.cpu, shapes.iters), params=config.num_params())
  result["train"] = train_mfu(config, shapes, result["chip"]["peak_flops"])
  result["decode"] = decode_bandwidth(config, shapes, result["chip"]["peak_bytes_per_s"])
  result["sampler"] = sampler_tokens_per_s(config, shapes)
  names = ("xla", "chunked", "splash") if args.cpu else ("xla", "chunked", "cudnn")
  result["attention"] = attention_times(shapes, jnp.float32 if args.cpu else jnp.bfloat16, names)
  result["seconds"] = time.perf_counter() - began
  with open(args.out, "w") as f:
    json.dump(result, f, indent=1)
  c = result["chip"]
  print(f"device check: {c['name']}, jax {result['jax']}, {result['params'] / 1e9:.2f}B params, "
        f"{result['seconds']:.0f} s; tests: {args.tests or 'not run'}")
  print(f"{'measure':<34} {'figure':>16} {'of peak':>9}")
  tr, de, sa = result["train"], result["decode"], result["sampler"]
  print(f"{'train step (' + tr['attention'] + ') TFLOP/s':<34} "
        f"{tr['model_flops_per_s'] / 1e12:>16.3f} {tr['mfu']:>9.1%}")
  print(f"{'decode GB/s':<34} {de['bytes_per_s'] / 1e9:>16.2f} {de['share_of_peak']:>9.1%}")
  print(f"{'sampler tokens/s':<34} {sa['tokens_per_s']:>16.1f} {'':>9}")
  for name, row in result["attention"].items():
    print(f"{'attention ' + name + ' train / decode ms':<34} "
          f"{row['train_seconds'] * 1e3:>7.2f} /{row['decode_seconds'] * 1e3:>7.3f} "
          f"{row['train_vs_xla']:>4.2f}x/{row['decode_vs_xla']:.2f}x of xla")
  print(f"wrote {args.out}")
  return result


if __name__ == "__main__":
  main()
