"""RPT train-step throughput and MFU, with and without the shared-prefix pass, and log-prob memory.

Run:  python benchmarks/train_step.py                      # ~100M qwen2, G=8, 16 groups, 256+64
      python benchmarks/train_step.py --preset small        # a CPU-sized model and batch
      python benchmarks/train_step.py --compute-dtype bfloat16 --micro-contexts 8

For each pass (shared prefix: prefill each context once, repeat its KV cache G times; plain: G
separate [prompt | completion] rows) it times the jitted, donated `rpt_jax.rl.update` step (best
of --iters after a compile call) and prints:
  * tokens/s through the model (the tokens actually fed: shared B*Lp + B*G*(N-1), plain
    B*G*(Lp+N-1)) and "effective" tokens/s = B*G*(Lp+N) / time (the same for both passes, so it
    compares them directly);
  * model FLOPs actually executed, counted honestly: 3 x forward (backward = 2 x forward), where
    forward = 2 x matmul weights x tokens fed (q/k/v/o, MLP; no embedding lookup)
    + the LM head only on the B*G*N scored positions + causal attention (4 x layers x heads x
    head_dim per (query, visible key) pair; the masked half of the dense score matrix is not
    counted). Remat and the log-prob chunks' backward recompute are NOT counted (MFU, not HFU);
  * MFU = FLOPs / time / peak, the peak being a jitted large matmul measured in the same run in
    the compute dtype (`--compute-dtype`, default float32, as XLA runs it by default).
Then XLA's temp memory of the whole step (compile-time `memory_analysis`) and, via
benchmarks/loss_memory.py, the peak temp memory of the log-prob/entropy gradient at this batch's
rows x completion length for vocab 151,936 and 8,192 (chunked at --logprob-chunk vs full logits).

Measured (CPU, 2 shared cores under load ~7, jax 0.10.2; no GPU was available to this run), the
100M config with --groups 2 --iters 1 (16 rows): matmul peak 0.08 TFLOP/s; shared prefix 17.8 s
per step, 288 effective tok/s, MFU 60%, step temp 2.75 GiB; plain 67.6 s, 76 effective tok/s,
MFU 46%, 7.3 GiB. Log-prob gradient temp at 16 rows x 64 tokens: 1,781 MiB (V=151,936) and
96 MiB (V=8,192); chunks only split the sequence, so at 64-token completions chunk 256 = 64.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from rpt_jax.model.config import ModelConfig  # noqa: E402
from rpt_jax.model.transformer import Transformer  # noqa: E402
from rpt_jax.rl import optim, update  # noqa: E402
from rpt_jax.rl import train_state
from rpt_jax.rl.loss import LossConfig  # noqa: E402
from timing import best_time, matmul_peak  # noqa: E402  (benchmarks/timing.py)

MIB = 2 ** 20
PRESETS = {
    # ~100M parameters (hidden 768, 12 layers, 12/4 heads, MLP 2048, vocab 32k, tied).
    "100m": dict(model=dict(hidden_size=768, intermediate_size=2048, num_layers=12, num_heads=12,
                            num_kv_heads=4, head_dim=64, vocab_size=32000),
                 groups=16, generations=8, prompt=256, completion=64, matmul=4096),
    "small": dict(model=dict(hidden_size=256, intermediate_size=768, num_layers=4, num_heads=4,
                             num_kv_heads=2, head_dim=64, vocab_size=8192),
                  groups=4, generations=8, prompt=128, completion=32, matmul=2048),
    # Seconds: the test suite's check that the benchmark runs end to end.
    "smoke": dict(model=dict(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                             num_kv_heads=2, head_dim=16, vocab_size=512),
                  groups=2, generations=2, prompt=16, completion=8, matmul=256),
}


def train_flops(cfg: ModelConfig, b: int, g: int, lp: int, n: int, shared: bool) -> float:
  """Executed model FLOPs of one train step (see the module docstring)."""
  d, f, h = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
  heads, kv = cfg.num_heads, cfg.num_kv_heads
  per_token = 2 * cfg.num_layers * (d * heads * h * 2 + 2 * d * kv * h + 3 * d * f)
  attn_pair = 4 * cfg.num_layers * heads * h  # q.k and p.v per (query, key) pair
  r = b * g
  if shared:
    tokens = b * lp + r * (n - 1)
    # Prefill: causal Lp x Lp per context; completion token j (0-based) sees Lp + j + 1 keys.
    pairs = b * lp * (lp + 1) / 2 + r * sum(lp + j + 1 for j in range(n - 1))
  else:
    t = lp + n - 1
    tokens = r * t
    pairs = r * t * (t + 1) / 2
  forward = per_token * tokens + attn_pair * pairs + 2 * d * cfg.vocab_size * r * n
  return 3.0 * forward, tokens


def make_batch(cfg: ModelConfig, b: int, g: int, lp: int, n: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(lp // 2, lp + 1, b).astype(np.int32)
  prompts = rng.integers(0, cfg.vocab_size, (b, lp)).astype(np.int32)
  completions = rng.integers(0, cfg.vocab_size, (b * g, n)).astype(np.int32)
  ends = rng.integers(n // 2, n + 1, b * g)
  mask = (np.arange(n)[None] < ends[:, None]).astype(np.int32)
  rewards = rng.integers(0, 2, b * g).astype(np.float32)
  adv = (rewards - rewards.reshape(b, g).mean(1).repeat(g)).astype(np.float32)
  return update.RolloutBatch(prompts, lengths, completions, mask, adv)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", choices=sorted(PRESETS), default="100m")
  parser.add_argument("--groups", type=int, help="contexts per step (B)")
  parser.add_argument("--generations", type=int, help="G")
  parser.add_argument("--prompt", type=int, help="Lp, prompt tokens (padded)")
  parser.add_argument("--completion", type=int, help="N, completion tokens")
  parser.add_argument("--micro-contexts", type=int, default=0, help="0: the whole batch")
  parser.add_argument("--compute-dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--remat", default="none", choices=("none", "full", "dots"))
  parser.add_argument("--logprob-chunk", type=int, default=256)
  parser.add_argument("--iters", type=int, default=3)
  parser.add_argument("--passes", default="shared,plain")
  parser.add_argument("--no-loss-memory", action="store_true")
  args = parser.parse_args()
  preset = PRESETS[args.preset]
  b = args.groups or preset["groups"]
  g = args.generations or preset["generations"]
  lp = args.prompt or preset["prompt"]
  n = args.completion or preset["completion"]
  micro = args.micro_contexts or b
  cfg = ModelConfig(family="qwen2", attention_bias=True, tie_word_embeddings=True,
                    max_position_embeddings=4096, rope_theta=1e6, compute_dtype=args.compute_dtype,
                    remat=args.remat, **preset["model"])

  dev = jax.devices()[0]
  print(f"JAX {jax.__version__} on {dev.device_kind} ({jax.default_backend()}) x"
        f"{jax.device_count()}; {os.cpu_count()} host cores")
  size = preset["matmul"]  # Not `n`: that is the completion length.
  peak = matmul_peak(((size, size, size),), args.compute_dtype, iters=10)
  print(f"model: qwen2 {cfg.num_params() / 1e6:.1f}M params, compute {cfg.compute_dtype}, "
        f"remat {cfg.remat}; batch: {b} contexts x G={g}, prompt {lp}, completion {n}, "
        f"micro-batch {micro} contexts, log-prob chunk {args.logprob_chunk}")
  print(f"{args.compute_dtype} matmul peak ({preset['matmul']}^3, best of 10): "
        f"{peak / 1e12:.2f} TFLOP/s\n")

  model = Transformer(cfg, rngs=nnx.Rngs(0))
  graphdef, _ = train_state.split_params(model)
  opt = optim.make_optimizer(1e-6)
  batch = make_batch(cfg, b, g, lp, n)
  batch = jax.tree.map(jnp.asarray, batch)
  effective = b * g * (lp + n)
  header = (f"{'pass':<14}{'step s':>9}{'fed tok/s':>12}{'eff tok/s':>12}{'TFLOP/step':>12}"
            f"{'TFLOP/s':>9}{'MFU':>7}{'temp MiB':>10}")
  rows = []
  for name in args.passes.split(","):
    shared = name == "shared"
    step = update.make_train_step(graphdef, LossConfig(), opt, num_generations=g,
                                  temperature=0.8, micro_batch_contexts=micro,
                                  shared_prefix=shared, logprob_chunk_size=args.logprob_chunk)
    state = train_state.create_train_state(model, opt)
    temp = step.lower(state, batch).compile().memory_analysis().temp_size_in_bytes
    holder = [state]

    def run(step=step, holder=holder):
      holder[0], metrics = step(holder[0], batch)
      return metrics["loss"]

    seconds = best_time(run, args.iters)
    flops, fed = train_flops(cfg, b, g, lp, n, shared)
    rows.append(f"{name:<14}{seconds:>9.3f}{fed / seconds:>12.0f}{effective / seconds:>12.0f}"
                f"{flops / 1e12:>12.2f}{flops / seconds / 1e12:>9.2f}"
                f"{flops / seconds / peak:>7.1%}{temp / MIB:>10.0f}")
    del state, holder
  print(header)
  print("-" * len(header))
  print("\n".join(rows))

  if not args.no_loss_memory:
    # Imported late: loss_memory sets XLA_FLAGS for simulated devices, which must not change
    # the backend this run already initialised.
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import loss_memory  # pylint: disable=g-import-not-at-top
    from rpt_jax.rl.loss import token_logprobs_and_entropy  # pylint: disable=g-import-not-at-top
    r, d = b * g, cfg.hidden_size
    chunk = min(args.logprob_chunk, n)
    print(f"\nlog-prob + entropy gradient, temp memory (compile-only, fp32): {r} rows x {n} "
          f"tokens, D={d}, chunk {chunk}")
    print(f"{'vocab':>8}{'chunked MiB':>13}{'full logits MiB':>17}{'B*T*V*4 MiB':>13}")
    for v in (151936, 8192):
      chunked = loss_memory._temp_bytes(  # pylint: disable=protected-access
          lambda h, w, t: token_logprobs_and_entropy(h, w, t, temperature=0.8,
                                                     chunk_size=chunk), r, n, d, v)
      full = loss_memory._temp_bytes(  # pylint: disable=protected-access
          lambda h, w, t: loss_memory._unchunked(h, w, t, 0.8), r, n, d, v)
      print(f"{v:>8}{chunked / MIB:>13.0f}{full / MIB:>17.0f}{r * n * v * 4 / MIB:>13.0f}")


if __name__ == "__main__":
  main()
