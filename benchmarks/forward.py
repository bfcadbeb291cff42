"""Forward-pass throughput/MFU of the policy Transformer and peak host memory of `load_hf`.

Run:  python benchmarks/forward.py [--batch 8 --length 512 --iters 5 --no-torch --no-memory]

Prints, for a ~100M-parameter qwen2 config (hidden 768, 12 layers, 12/4 heads, MLP 2048, vocab
32k, tied embeddings) in fp32: tokens/s and achieved FLOP/s of a jitted forward (logits
included), this machine's fp32 matmul peak measured in the same run (best of jitted 2048^3,
4096^3 and lm_head-shaped matmuls, before and after) and the ratio (MFU); optionally PyTorch/transformers' forward on the same
weights as a peer. Then writes the model with `save_hf` and measures, in a fresh subprocess,
the peak resident memory `load_hf` adds (VmHWM after the load minus VmRSS before it) relative
to the checkpoint's size on disk (target <= 1.3x; on CPU the loaded weights themselves live in
host memory, so 1.0x is the floor).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from rpt_jax.model import hf_io  # noqa: E402
from rpt_jax.model.config import ModelConfig  # noqa: E402
from rpt_jax.model.transformer import Transformer  # noqa: E402
from timing import best_time, matmul_peak  # noqa: E402  (benchmarks/timing.py)

CONFIG = ModelConfig(family="qwen2", vocab_size=32000, hidden_size=768, intermediate_size=2048,
                     num_layers=12, num_heads=12, num_kv_heads=4, head_dim=64,
                     attention_bias=True, tie_word_embeddings=True, max_position_embeddings=4096,
                     rope_theta=1e6, rms_norm_eps=1e-6)


PEAK_SHAPES = ((2048, 2048, 2048), (4096, 4096, 4096), (4096, 768, 32000))


def forward_matmul_peak(iters: int = 5) -> float:
  """fp32 peak over 2048^3, 4096^3 and the model's lm_head shape; the CPU is shared, so the
  best is the peak."""
  return matmul_peak(PEAK_SHAPES, "float32", iters)


def bench_forward(model: Transformer, batch: int, length: int, iters: int) -> float:
  graphdef, state = nnx.split(model)
  fwd = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))
  tokens = jax.random.randint(jax.random.key(2), (batch, length), 0, CONFIG.vocab_size)
  return best_time(lambda: fwd(state, tokens), iters)


def bench_torch(path: str, batch: int, length: int, iters: int) -> float | None:
  try:
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
  tokens = torch.randint(0, CONFIG.vocab_size, (batch, length))
  with torch.no_grad():
    model(tokens)
    times = []
    for _ in range(iters):
      start = time.perf_counter()
      model(tokens)
      times.append(time.perf_counter() - start)
  return min(times)


_LOAD_PROBE = r"""
import json, sys
import jax
from rpt_jax.model import hf_io

def status(key):
  for line in open('/proc/self/status'):
    if line.startswith(key):
      return int(line.split()[1]) * 1024
before = status('VmRSS:')
model, _ = hf_io.load_hf(sys.argv[1], dtype=sys.argv[2])
jax.block_until_ready(jax.tree.leaves(model))
print(json.dumps(dict(before=before, hwm=status('VmHWM:'), after=status('VmRSS:'))))
"""


def load_memory(path: str, dtype: str) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run([sys.executable, "-c", _LOAD_PROBE, path, dtype], capture_output=True,
                       text=True, check=True, env=env, cwd=root)
  return json.loads(out.stdout.strip().splitlines()[-1])


def dir_bytes(path: str) -> int:
  return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)
             if f.endswith(".safetensors"))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--length", type=int, default=512)
  parser.add_argument("--iters", type=int, default=5)
  parser.add_argument("--no-torch", action="store_true")
  parser.add_argument("--no-memory", action="store_true")
  parser.add_argument("--smoke", action="store_true",
                      help="a 2-layer toy model and small peak shapes (the test suite's check)")
  args = parser.parse_args()
  if args.smoke:
    global CONFIG, PEAK_SHAPES  # pylint: disable=global-statement
    CONFIG = dataclasses.replace(CONFIG, vocab_size=512, hidden_size=64, intermediate_size=128,
                                 num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16)
    PEAK_SHAPES = ((256, 256, 256),)

  print(f"JAX {jax.__version__} on {jax.devices()[0].device_kind} x{jax.device_count()}; "
        f"{os.cpu_count()} host cores")
  cfg = CONFIG
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  tokens = args.batch * args.length
  flops = cfg.flops_per_token(args.length) * tokens
  peak = forward_matmul_peak()
  t_ours = bench_forward(model, args.batch, args.length, args.iters)
  peak = max(peak, forward_matmul_peak())  # Measured before and after: other load on the CPU varies.
  print(f"\nmodel: qwen2 {cfg.num_params() / 1e6:.1f}M params, forward {args.batch} x {args.length} "
        f"tokens, {cfg.flops_per_token(args.length) / 1e6:.1f} MFLOP/token (incl. attention)")
  print(f"fp32 matmul peak (best of 2048^3, 4096^3, 4096x768x32000): {peak / 1e9:.1f} GFLOP/s\n")
  print(f"{'forward':<28}{'time s':>9}{'tokens/s':>11}{'GFLOP/s':>10}{'MFU':>7}")
  rows = [("rpt_jax (jit, fp32)", t_ours)]

  with tempfile.TemporaryDirectory() as tmp:
    ckpt = os.path.join(tmp, "fp32")
    hf_io.save_hf(model, cfg, ckpt)
    if not args.no_torch:
      t_torch = bench_torch(ckpt, args.batch, args.length, max(2, args.iters // 2))
      if t_torch is not None:
        rows.append(("transformers (torch, fp32)", t_torch))
    for name, t in rows:
      print(f"{name:<28}{t:>9.3f}{tokens / t:>11.0f}{flops / t / 1e9:>10.1f}"
            f"{flops / t / peak:>7.1%}")
    if args.no_memory:
      return
    del model
    ckpt16 = os.path.join(tmp, "bf16")
    hf_io.save_hf(*hf_io.load_hf(ckpt), ckpt16, dtype="bfloat16")
    print(f"\n{'load_hf peak host memory':<28}{'ckpt MB':>9}{'peak+ MB':>10}{'ratio':>7}")
    for name, path, dtype in (("fp32 file -> fp32", ckpt, "float32"),
                              ("bf16 file -> bf16", ckpt16, "bfloat16")):
      mem = load_memory(path, dtype)
      size = dir_bytes(path)
      added = mem["hwm"] - mem["before"]
      print(f"{name:<28}{size / 2**20:>9.0f}{added / 2**20:>10.0f}{added / size:>7.2f}x")


if __name__ == "__main__":
  main()
