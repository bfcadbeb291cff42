"""Long-tail rollouts: the slot engine vs the static sampler vs HF continuous batching.

Workload (defaults; RPT's mean:max response shape at 1/8 scale): model (a) of
benchmarks/sampler.py (Qwen2, vocab 8192, hidden 256, 4 layers, 8/2 heads, MLP 768, random
weights shared by every peer), 256 contexts x G=8 rollouts, 128-token prompts, temperature 0.8,
no EOS; row budgets (max new tokens) drawn from a log-normal with sigma 1 and mean 64
(mu = ln 64 - 1/2), rounded, capped at 512, numpy seed 0. Rows printed:

  static       `Sampler.generate` at each --static-micro micro-batch (contexts): every
               micro-batch decodes until its longest row; the best one is "static".
  engine       `SlotEngine.generate` with --slots decode slots.
  fixed-length the engine on the same prompts with every budget 64 (cache 128 + 64), and the
               same with the long-tail run's cache (128 + 512): the gap between the two is
               what attending over the larger cache still costs (on CPU the engine decodes
               each chunk on the cache prefix its live rows reach; see SlotEngine).
  HF CB        transformers' continuous batching manager (paged attention, PyTorch CPU), one
               request per row with its own max_new_tokens, on the first --hf-contexts contexts
               (it runs ~100x slower than ours on this CPU; tok/s is the comparable figure).

Figures: generated tokens/s (compile excluded: the static sampler's programs are compiled first
on a workload of the same shapes whose rows stop at once; the engine's, one decode chunk per
cache prefix, by running the same call once before the timed one); decode steps (forward
passes of the decode loops);
slot utilization = tokens produced by decode steps / (slots x decode steps), slots being the
micro-batch rows for the static sampler (the first token of each row comes from the prefill).
The LAST line is:
  long-tail: engine <E> tok/s, static <S> tok/s, <E/S>x; utilization <U>%; fixed-length <F> tok/s

  python benchmarks/rollout_long_tail.py                 # full size (~30 min on 2 loaded cores)
  python benchmarks/rollout_long_tail.py --smoke         # tiny shapes, seconds (the test)

Measured (full size, 2-core VM, nothing else running; jax 0.10.2, transformers 5.24, fp32;
125,302 tokens, max budget 512; `--static-micro 1 --hf-contexts 0`, ~4 min):
  static micro-batch 1: 828 tok/s (45,227 decode steps, utilization 34.1%); micro-batch 2 and 4
  ran slower in an earlier full run taken while niced jobs shared the cores (398 and 309 tok/s
  against 565 for micro-batch 1): micro-batch 1 is the best static one;
  engine, 128 slots: 5,852 tok/s, 1,014 steps, utilization 95.0% (host scheduling 3.3% of the
  run; 10 slot-cache resizes); fixed-length 64: 7,319 tok/s (engine / fixed-length 80%; with
  the long-tail run's cache 94%); HF continuous batching (4 contexts, that earlier loaded run):
  18 tok/s. Before the slot cache followed the live length (each chunk read a slice of the
  whole cache, materialised every step by XLA:CPU), a quiet run gave engine 3,578, fixed-length
  5,491 (65%).
  long-tail: engine 5852 tok/s, static 828 tok/s, 7.06x; utilization 95.0%; fixed-length 7319 tok/s
With the CPU decode attention kernel (rpt_jax/model/cpu_decode_kernel.py; idle, same command,
4 min 6 s): static 1,151 tok/s; engine 7,036 (95.0%, decode step 17.6 ms incl. admissions);
fixed-length 8,427 (engine / fixed-length 83%; with the same cache 98%):
  long-tail: engine 7036 tok/s, static 1151 tok/s, 6.11x; utilization 95.0%; fixed-length 8427 tok/s
The engine's live prefix still pays with the kernel (which reads only live keys): the cache
writes and the rest of the step scale with the cache (engine alone, same day: 6,689 tok/s with
it, 6,181 without).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.sampler import CONFIGS, hf_model  # noqa: E402
from rpt_jax.model import hf_io  # noqa: E402
from rpt_jax.rl.engine import SlotEngine  # noqa: E402
from rpt_jax.rl.sampler import Sampler  # noqa: E402

SMOKE = dict(vocab_size=256, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, intermediate_size=64)


def budgets_lognormal(rows: int, mean: float, sigma: float, cap: int, seed: int) -> np.ndarray:
  """[rows] int32 budgets: round(LogNormal(ln(mean) - sigma^2 / 2, sigma)) in [1, cap]."""
  draws = np.random.default_rng(seed).lognormal(np.log(mean) - sigma ** 2 / 2, sigma, rows)
  return np.clip(np.round(draws), 1, cap).astype(np.int32)


def build(config: dict, path: str):
  """(HF torch model, our Transformer) with the same random weights."""
  torch_model = hf_model(config, path)
  return torch_model, hf_io.load_hf(path)[0]


def timed(generate, prompts, lengths, budgets, cap, g, warm: int | None) -> tuple[float, object]:
  """(seconds, output) of one generate call after a compile call: of the same program shapes
  on the first `warm` contexts (every budget 1: the decode loops compile and exit at once), or
  with warm=None the same call (the engine compiles a decode chunk per cache prefix its rows
  reach, so only the workload itself compiles them all)."""
  kwargs = dict(num_samples=g, temperature=0.8, cache_tokens=cap)
  if warm is None:
    jax.block_until_ready(generate(prompts, lengths, max_new_tokens=budgets,
                                   rng=jax.random.key(1), **kwargs))
  else:
    jax.block_until_ready(generate(prompts[:warm], lengths[:warm],
                                   max_new_tokens=np.ones(warm * g, np.int32),
                                   rng=jax.random.key(1), **kwargs))
  start = time.perf_counter()
  out = jax.block_until_ready(generate(prompts, lengths, max_new_tokens=budgets,
                                       rng=jax.random.key(0), **kwargs))
  return time.perf_counter() - start, out


def static_steps(budgets: np.ndarray, g: int, micro: int) -> int:
  """Decode forward passes of the static sampler: each micro-batch runs to its largest budget
  (token 0 comes from the prefill)."""
  per_micro = micro * g
  return int(sum(budgets[i:i + per_micro].max() - 1 for i in range(0, len(budgets), per_micro)))


def run_hf(torch_model, prompts, budgets, g, contexts) -> tuple[float, int]:
  """(seconds, tokens) of transformers' continuous batching on the first `contexts` contexts:
  one request per row with its budget; the manager's start-up is not timed."""
  import torch  # pylint: disable=g-import-not-at-top
  from transformers import GenerationConfig  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(os.cpu_count() or 1)
  gen = GenerationConfig(do_sample=True, temperature=0.8, top_k=0, top_p=1.0,
                         max_new_tokens=int(budgets.max()), eos_token_id=-1, pad_token_id=0)
  rows = contexts * g
  with torch_model.continuous_batching_context_manager(generation_config=gen,
                                                       warmup=False) as manager:
    start = time.perf_counter()
    ids = [manager.add_request(prompts[r // g].tolist(), max_new_tokens=int(budgets[r]))
           for r in range(rows)]
    results = {}
    while len(results) < rows:
      res = manager.get_result(timeout=1)
      if res is not None and res.is_finished():
        results[res.request_id] = res
    seconds = time.perf_counter() - start
  tokens = sum(len(results[i].generated_tokens) for i in ids)
  assert tokens == int(budgets[:rows].sum()), (tokens, budgets[:rows].sum())
  return seconds, tokens


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--smoke", action="store_true", help="tiny model and workload (seconds)")
  p.add_argument("--contexts", type=int, default=256)
  p.add_argument("--samples", type=int, default=8)
  p.add_argument("--prompt-len", type=int, default=128)
  p.add_argument("--mean", type=float, default=64.0, help="mean budget (fixed-length value)")
  p.add_argument("--cap", type=int, default=512)
  p.add_argument("--slots", type=int, default=128, help="the engine's decode slots")
  p.add_argument("--prefill-contexts", type=int, default=1)
  p.add_argument("--chunk-steps", type=int, default=16)
  p.add_argument("--static-micro", default="1,2,4",
                 help="static micro-batch sizes (contexts) to try")
  p.add_argument("--hf-contexts", type=int, default=4, help="0 skips HF continuous batching")
  args = p.parse_args()
  if args.smoke:
    args.contexts, args.prompt_len, args.mean, args.cap = 6, 8, 6.0, 24
    args.slots, args.static_micro, args.hf_contexts = 8, "1,3", 1
  config = SMOKE if args.smoke else CONFIGS["a"]
  c, g, l = args.contexts, args.samples, args.prompt_len
  with tempfile.TemporaryDirectory() as path:
    torch_model, model = build(config, path)
  prompts = np.random.RandomState(0).randint(1, config["vocab_size"], (c, l)).astype(np.int32)
  lengths = np.full((c,), l, np.int32)
  budgets = budgets_lognormal(c * g, args.mean, 1.0, args.cap, seed=0)
  tokens = int(budgets.sum())
  print(f"{jax.devices()[0].platform} x{len(jax.devices())}, {os.cpu_count()} CPU cores | "
        f"{config} | {c} contexts x G={g}, prompts {l}, budgets log-normal mean {args.mean:g} "
        f"sigma 1 cap {args.cap}: mean {budgets.mean():.1f}, max {budgets.max()}, "
        f"{tokens} tokens")
  rows = []  # (label, seconds, tokens, decode steps, utilization)

  sampler = Sampler(model)
  static = []
  for micro in (int(m) for m in args.static_micro.split(",")):
    seconds, out = timed(lambda *a, m=micro, **k: sampler.generate(*a, micro_batch=m, **k),
                         prompts, lengths, budgets, args.cap, g, warm=micro)
    assert int(np.asarray(out.lengths).sum()) == tokens
    steps = static_steps(budgets, g, micro)
    static.append((tokens / seconds, micro))
    rows.append((f"static micro-batch {micro} ({micro * g} rows)", seconds, tokens, steps,
                 (tokens - c * g) / (micro * g * steps)))
  best_static, best_micro = max(static)

  engine = SlotEngine(model, decode_slots=args.slots, prefill_contexts=args.prefill_contexts,
                      chunk_steps=args.chunk_steps)
  seconds, out = timed(engine.generate, prompts, lengths, budgets, args.cap, g,
                       warm=None)
  assert int(np.asarray(out.lengths).sum()) == tokens
  stats = engine.last_stats
  engine_tps, util = tokens / seconds, stats["slot_utilization"]
  rows.append((f"engine ({args.slots} slots)", seconds, tokens, stats["decode_steps"], util))
  print(f"engine: {stats['chunks']} chunks, {stats['admissions']} admissions; host scheduling "
        f"{stats['host_s']:.2f} s of {stats['wall_s']:.2f} s "
        f"({100 * stats['host_s'] / stats['wall_s']:.1f}%), "
        f"{1e3 * stats['host_s'] / stats['chunks']:.1f} ms per chunk; decode step "
        f"{1e3 * (stats['wall_s'] - stats['host_s']) / stats['decode_steps']:.1f} ms "
        f"(incl. admissions)")
  fixed = np.full_like(budgets, int(args.mean))
  fixed_s, _ = timed(engine.generate, prompts, lengths, fixed, int(args.mean), g,
                     warm=None)
  fixed_stats = engine.last_stats
  fixed_tps = int(fixed.sum()) / fixed_s
  rows.append((f"engine, every budget {int(args.mean)}", fixed_s, int(fixed.sum()),
               fixed_stats["decode_steps"], fixed_stats["slot_utilization"]))
  wide_s, _ = timed(engine.generate, prompts, lengths, fixed, args.cap, g,
                    warm=None)
  wide_stats = engine.last_stats
  rows.append((f"  same, cache {l} + {args.cap}", wide_s, int(fixed.sum()),
               wide_stats["decode_steps"], wide_stats["slot_utilization"]))
  hf_tps = None
  if args.hf_contexts:
    hf_s, hf_tokens = run_hf(torch_model, prompts, budgets, g, min(args.hf_contexts, c))
    hf_tps = hf_tokens / hf_s
    rows.append((f"HF CB, first {args.hf_contexts} contexts", hf_s, hf_tokens, None, None))

  print(f"{'':34s} {'tok/s':>8s} {'seconds':>8s} {'tokens':>7s} {'steps':>6s} {'util':>6s} "
        f"{'ms/step':>8s}")
  for label, sec, tok, steps, u in rows:
    print(f"{label:34s} {tok / sec:8.0f} {sec:8.2f} {tok:7d} "
          f"{'' if steps is None else steps:>6} {'' if u is None else f'{100 * u:5.1f}%':>6} "
          f"{'' if steps is None else f'{1e3 * sec / steps:8.1f}':>8}")
  print(f"best static micro-batch: {best_micro} contexts")
  print(f"engine / fixed-length: {100 * engine_tps / fixed_tps:.0f}% (target >= 70%); with the "
        f"same cache: {100 * engine_tps * wide_s / int(fixed.sum()):.0f}%")
  if hf_tps is not None:
    print(f"engine / HF continuous batching: {engine_tps / hf_tps:.1f}x")
  print(f"long-tail: engine {engine_tps:.0f} tok/s, static {best_static:.0f} tok/s, "
        f"{engine_tps / best_static:.2f}x; utilization {100 * util:.1f}%; fixed-length "
        f"{fixed_tps:.0f} tok/s")


if __name__ == "__main__":
  main()
