"""One full RPT step (data -> rollouts -> rewards -> update -> checkpoint) and its host overhead.

Run:  python benchmarks/rpt_step.py --preset a            # the sampler workload (~1-2 min CPU)
      python benchmarks/rpt_step.py --preset b --steps 2  # ~100M parameters (slow on CPU)
      python benchmarks/rpt_step.py --long-tail --steps 1  # long-tail rollouts, both engines
      python benchmarks/rpt_step.py --long-tail --oversample 4 --partial  # and over-sampling

Long-tail preset (`--long-tail`): RPT's response-length shape at 1/8 scale through the same
loop: max_new_tokens 512 and per-row budgets from a log-normal with sigma 1 and mean 64 (numpy
seed = the context's id, loader context n*B + r, so every run gives a context the same
budgets), as benchmarks/rollout_long_tail.py. The loop runs on the same data and initial weights
with rollouts from the static `Sampler` (micro-batch = all contexts), from the `SlotEngine`
(--slots decode slots) and, with --oversample O, from the SlotEngine over-sampling
(rl.oversample_contexts O: B + O contexts offered, the first B whole groups kept, the rest
dropped) and with --partial once more carrying the unfinished rows into the next step
(rl.partial_rollouts). It prints per step: rollout and train seconds, the tokens of the rows
kept, slot utilization (generated tokens / (slots x decode steps)), staleness (policy versions
a kept group lags) and contexts dropped / carried. Over-sampling keeps the groups that finish
first, so its kept rows are shorter than the plain engine's: read rollout seconds next to kept
tokens. The trainer is untouched: its `sampler` is replaced by a stand-in that draws the
budgets (the trainer itself passes one max_new_tokens to every row).
  Measured (`--long-tail --steps 2 --contexts 8 --slots 32 --oversample 4 --partial`, 64 rows
  per step, preset (a), fp32 CPU; idle 2-core machine, one 6.5-min run), per step:
    rollout engine          rollout s  kept tokens  slot util  staleness mean/max  dropped/carried
    static Sampler               4.51         3726          -          0 / 0             0 / 0
    SlotEngine (32 slots)        2.39         3726      43.5%          0 / 0             0 / 0
      over-sampled +4            2.96         3625      76.3%          0 / 0             4 / 0
      over-sampled +4, partial   2.80         4134      85.4%       0.75 / 1             0 / 7
  The engine's rollouts are 1.89x faster than the static sampler's. Over-sampling raises slot
  utilization but not speed at this size (0.81x the engine's rollout time; partial 0.85x, with
  more kept tokens as carried long rows come back): 4 more contexts are 50% more prefills and
  live rows for 8 kept groups. (A loaded run had shown over-sampling 1.19x faster: noise.)
  Train step 20-21 s in every run.

Workloads (random-init Qwen2 policies, 16 contexts x G=8 rollouts, 256-token prompts, 64-token
responses, temperature 0.8, no early stop):
  (a) vocab 8192, hidden 256, 4 layers, 8/2 heads (head_dim 32), MLP 768 (benchmarks/sampler.py)
  (b) vocab 32000, hidden 768, 12 layers, 12/4 heads (head_dim 64), MLP 2048, tied (~100M)

What runs is the real loop, `RPTTrainer.run`, on records made by the real data stage:
  * corpus: the built-in synthetic maths corpus, documents joined 4 at a time (~800 tokens) so
    every position has >= 256 tokens of context; `rpt_jax.data.prepare` (filter 'all', the
    policy as proxy) writes the records; the Grain `PromptLoader` builds v0-template prompts and
    left-truncates them to the 256-token bucket (all rows are exactly 256 tokens).
  * tokenizer: SentencePiece trained on that corpus. The corpus is so repetitive that it stops
    at ~600 pieces (asked for 8192), so the MODEL is built with the workload's vocabulary
    regardless and the reward decodes a sampled id v as piece v mod 600: the host decodes and
    scores the same number of tokens as with a real 8k vocabulary. Stop ids are cleared, so
    every rollout is 64 tokens (no early stop), as in the sampler benchmark.
  * dynamic sampling is off (a random policy's groups are all-zero; it would multiply rollouts),
    one optimiser update per step, accumulated over micro-batches of --train-micro contexts.
  * a checkpoint is saved after every step (asynchronous Orbax save; its blocking part is timed).

Timing: step 0 compiles and is excluded; the table is the mean over --steps later steps.
Phases are RPTTrainer's own `time/*` metrics (data, rollout, reward, train; checkpoint from the
loop). "Model compute" is the wall time of the jitted calls alone: `Sampler.generate(...)` and
`train_step(state, batch)` each measured from call to `block_until_ready` of its outputs (their
results are read right after in the loop anyway, so blocking adds no wait). Host overhead =
step wall time (between consecutive steps of the loop, checkpoint included) - model compute:
the data loader, decoding and scoring rewards, advantages, host<->device copies, Python
dispatch, metrics and the checkpoint. The target is < 15%.

No peer runs in this process: TRL's GRPOTrainer (PyTorch) on the same workload is the peer to
measure back to back on the same machine (a stored figure from another day is not a comparison).

Measured (CPU only: no accelerator was lent to this task; 2-core VM shared with other jobs,
load average 6-8; jax 0.10.2, fp32), mean over the steps after the compile step:
  (a) `--preset a --steps 3`: 8.65 s/step; generate 2.03 s, train_step 6.29 s,
      data 0.04 s, reward 0.004 s, checkpoint 0.28 s; host overhead 0.34 s = 3.9%.
      (--train-micro 16: 16.5 s/step, train_step 14.1 s; overhead 2.6%.)
  (b) `--preset b --steps 1 --train-micro 4`: 186 s/step (this job got 44% of the 2 cores);
      generate 53.7 s, train_step 131.6 s, reward 0.13 s; host overhead 0.36 s = 0.2%;
      peak RSS 9.1 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from configs import base  # noqa: E402
from rpt_jax import mesh as mesh_lib  # noqa: E402
from rpt_jax import tokenizer as tokenizer_lib  # noqa: E402
from rpt_jax.data import prepare as prepare_lib  # noqa: E402
from rpt_jax.data import synthetic  # noqa: E402
from rpt_jax.data.pipeline import PromptLoader  # noqa: E402
from rpt_jax.model.config import ModelConfig  # noqa: E402
from rpt_jax.model.transformer import init_model  # noqa: E402
from rpt_jax.rl.engine import SlotEngine  # noqa: E402
from rpt_jax.rl.sampler import Sampler  # noqa: E402
from benchmarks.rollout_long_tail import budgets_lognormal  # noqa: E402
from rpt_jax.spec import RunSpec  # noqa: E402
from rpt_jax.train import RPTTrainer  # noqa: E402

PRESETS = {
    "a": dict(vocab_size=8192, hidden_size=256, intermediate_size=768, num_layers=4,
              num_heads=8, num_kv_heads=2, head_dim=32, tie_word_embeddings=False),
    "b": dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_layers=12,
              num_heads=12, num_kv_heads=4, head_dim=64, tie_word_embeddings=True),
    # The smoke test's (tests/test_benchmarks.py): seconds, more ids than the tokenizer's pieces.
    "smoke": dict(vocab_size=1024, hidden_size=32, intermediate_size=64, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=8, tie_word_embeddings=False),
}


class WideVocabTokenizer:
  """The corpus tokenizer seen through a model vocabulary larger than it: ids past its pieces
  decode as `id % vocab` (same number of decoded tokens), and no stop ids (no early stop)."""

  def __init__(self, inner, model_vocab: int):
    self.inner, self.vocab_size = inner, model_vocab
    self.stop_ids: tuple[int, ...] = ()

  def decode(self, ids):
    n = self.inner.vocab_size
    return self.inner.decode([int(i) % n for i in ids])

  def __getattr__(self, name):  # encode, apply_chat_template, pad_id, name, ...
    return getattr(self.inner, name)


class LongTailRollouts:
  """Stands in for `RPTTrainer.sampler`: every call draws per-row budgets and generates with
  `sampler` (a static Sampler with the trainer's micro-batch, or a SlotEngine). A context's G
  budgets are log-normal (sigma 1, `mean`, capped at the trainer's max_new_tokens) with numpy
  seed = its context id, loader context n*B + r (the over-sampled loop's ids; `generate`
  numbers its calls' contexts the same way), so a context has the same budgets in every run.
  Records per call: slot utilization (engine) and the tokens of the rows returned."""

  def __init__(self, sampler, mean: float):
    self.sampler, self.mean, self.contexts = sampler, mean, 0
    self.utilization: list[float] = []
    self.kept_tokens: list[int] = []

  def __getattr__(self, name):  # slots, last_stats, drop_partial of the engine
    return getattr(self.sampler, name)

  def _budgets(self, context_ids, g: int, cap: int) -> np.ndarray:
    return np.concatenate([budgets_lognormal(g, self.mean, 1.0, cap, seed=int(i))
                           for i in context_ids])

  def _record(self, output) -> None:
    if isinstance(self.sampler, SlotEngine):
      stats = self.sampler.last_stats
      self.utilization.append(stats["tokens"] / max(self.sampler.slots * stats["decode_steps"], 1))
    self.kept_tokens.append(int(np.asarray(output.lengths).sum()))

  def generate(self, tokens, lengths, *, num_samples, max_new_tokens, micro_batch=None, **kw):
    b = np.shape(tokens)[0]
    budgets = self._budgets(range(self.contexts, self.contexts + b), num_samples,
                            max_new_tokens)
    self.contexts += b
    if not isinstance(self.sampler, SlotEngine):
      kw["micro_batch"] = micro_batch
    out = self.sampler.generate(tokens, lengths, num_samples=num_samples,
                                max_new_tokens=budgets, cache_tokens=max_new_tokens, **kw)
    self._record(out)
    return out

  def generate_groups(self, tokens, lengths, *, num_samples, max_new_tokens, context_ids,
                      cache_tokens=None, **kw):
    """The over-sampled loop's call; the cache keeps max_new_tokens (as `generate`'s)."""
    out = self.sampler.generate_groups(
        tokens, lengths, num_samples=num_samples, context_ids=context_ids,
        max_new_tokens=self._budgets(context_ids, num_samples, max_new_tokens),
        cache_tokens=cache_tokens or max_new_tokens, **kw)
    self._record(out.output)
    return out


def build_records(workdir: str, model, tokenizer, mesh, *, contexts: int, steps: int,
                  prompt_len: int) -> str:
  """Records with >= prompt_len tokens of context each, enough for `steps` batches."""
  docs = list(synthetic.synthetic_documents(synthetic.SyntheticConfig(num_documents=4000)))
  joined = ["\n\n".join(docs[i:i + 4]) for i in range(0, len(docs), 4)]
  per_doc = 16
  needed = -(-contexts * (steps + 1) // per_doc) + 2
  corpus = os.path.join(workdir, "corpus.jsonl")
  with open(corpus, "w") as f:
    for text in joined[:needed]:
      f.write(json.dumps({"text": text}) + "\n")
  c = base.get_config()
  c.data.source.update(kind="jsonl", path=corpus, field="text")
  c.data.update(filter="all", min_context_tokens=prompt_len, max_prompt_tokens=prompt_len,
                completion_tokens=8, eval_fraction=0.0, max_positions_per_document=per_doc,
                score_seq_len=512, score_overlap=128, score_batch_size=len(jax.devices()))
  records = os.path.join(workdir, "records")
  prepare_lib.prepare(RunSpec.from_config(c).prepare, tokenizer, model, records, mesh=mesh,
                      show_progress=False)
  return records


def run(preset: str, steps: int, *, contexts: int, generations: int, prompt_len: int,
        new_tokens: int, train_micro: int, compute_dtype: str, workdir: str,
        long_tail: str | None = None, slots: int = 32, mean: float = 64.0,
        oversample: int = 0, partial: bool = False) -> dict:
  """One timed loop. long_tail: None (every row runs new_tokens), 'static' or 'engine'
  (per-row long-tail budgets, see LongTailRollouts). oversample, partial: the engine loop's
  rl.oversample_contexts and rl.partial_rollouts."""
  mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(data=1, fsdp=-1, tensor=1))
  rules = mesh_lib.ShardingRules()
  docs = list(synthetic.synthetic_documents(synthetic.SyntheticConfig(num_documents=2000)))
  corpus_tok = tokenizer_lib.train_sentencepiece(
      docs, 8192, os.path.join(workdir, "tokenizer", "spm.model"))
  model_config = ModelConfig(
      family="qwen2", **PRESETS[preset], attention_bias=True, rope_theta=10000.0,
      max_position_embeddings=1024, param_dtype="float32", compute_dtype=compute_dtype,
      remat="none", pad_token_id=corpus_tok.pad_id, bos_token_id=corpus_tok.bos_id)
  model = init_model(model_config, seed=0, mesh=mesh, rules=rules)
  t0 = time.perf_counter()
  records = build_records(workdir, model, corpus_tok, mesh, contexts=contexts, steps=steps + 1,
                          prompt_len=prompt_len)
  prepare_s = time.perf_counter() - t0
  tokenizer = WideVocabTokenizer(corpus_tok, model_config.vocab_size)
  loader = PromptLoader(records, "train", tokenizer, batch_size=contexts, template="v0",
                        prompt_buckets=(prompt_len,), seed=0, shuffle=True, num_epochs=None)

  c = base.get_config()
  c.rl.update(batch_contexts=contexts, num_generations=generations, max_new_tokens=new_tokens,
              rollout_micro_batch=contexts, train_micro_batch=train_micro,
              dynamic_sampling_from_step=10 ** 9, decode_slots=slots,
              oversample_contexts=oversample, partial_rollouts=partial)
  c.data.prompt_buckets = (prompt_len,)  # rl.prompt_width: partial rollouts pad to it
  c.train.update(steps=steps + 1, checkpoint_every=1, log_every=1)
  trainer = RPTTrainer(model, tokenizer, RunSpec.from_config(c).rpt, mesh=mesh, rules=rules,
                       workdir=os.path.join(workdir, "run"), keep_checkpoints=2,
                       progress=False)

  # The jitted calls, timed to block_until_ready (their outputs are read right after anyway).
  device: dict[str, list[float]] = {"generate": [], "train_step": []}

  def timed(fn, name):
    def wrapper(*args, **kwargs):
      start = time.perf_counter()
      out = jax.block_until_ready(fn(*args, **kwargs))
      device[name].append(time.perf_counter() - start)
      return out
    return wrapper

  if long_tail:
    rollouts = (Sampler(model, mesh=mesh, rules=rules, pad_id=tokenizer.pad_id)
                if long_tail == "static" else
                SlotEngine(model, decode_slots=slots, mesh=mesh, rules=rules,
                           pad_id=tokenizer.pad_id))
    trainer.sampler = LongTailRollouts(rollouts, mean)
    if trainer.oversampled is not None:
      trainer.oversampled.sampler = trainer.sampler
  method = "generate" if trainer.oversampled is None else "generate_groups"
  setattr(trainer.sampler, method, timed(getattr(trainer.sampler, method), "generate"))
  trainer.train_step = timed(trainer.train_step, "train_step")
  per_step, stamps = [], [time.perf_counter()]

  def on_step(step, metrics):
    per_step.append(metrics)  # the loop adds time/checkpoint to this dict after the call
    stamps.append(time.perf_counter())

  trainer.run(iter(loader), on_step=on_step)
  trainer.checkpointer.wait_until_finished()
  walls = np.diff(stamps)  # wall of step i = from the end of step i-1's callback to step i's
  # Step i's wall ends before its own checkpoint: use the checkpoint of step i-1, which is in it.
  rows = []
  for i in range(1, len(per_step)):
    m = per_step[i]
    rows.append(dict(
        data=m["time/data"], rollout=m["time/rollout"], reward=m["time/reward"],
        train=m["time/train"], checkpoint=per_step[i - 1].get("time/checkpoint", 0.0),
        wall=walls[i], generate=device["generate"][i], train_step=device["train_step"][i]))
    if long_tail:
      rows[-1].update(kept_tokens=trainer.sampler.kept_tokens[i],
                      staleness_mean=m.get("rollout/staleness_mean", 0.0),
                      staleness_max=m.get("rollout/staleness_max", 0.0),
                      dropped=m.get("rollout/contexts_dropped", 0.0),
                      carried=m.get("rollout/contexts_carried", 0.0))
      if long_tail == "engine":
        rows[-1]["utilization"] = trainer.sampler.utilization[i]
  mean = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
  if "staleness_max" in mean:
    mean["staleness_max"] = float(max(r["staleness_max"] for r in rows))
  mean["model"] = mean["generate"] + mean["train_step"]
  mean["overhead"] = mean["wall"] - mean["model"]
  params = sum(x.size for x in jax.tree.leaves(trainer.params()))
  return dict(preset=preset, params=params, compile_step=float(walls[0]), prepare_s=prepare_s,
              tokenizer_pieces=corpus_tok.vocab_size, steps=len(rows), **mean)


def print_table(r: dict, args) -> None:
  wall = r["wall"]
  print(f"\nRPT step, preset ({r['preset']}): {r['params'] / 1e6:.1f}M params, "
        f"{args.contexts} contexts x G={args.generations}, {args.prompt_len}-token prompts, "
        f"{args.new_tokens}-token responses, {jax.devices()[0].device_kind} x "
        f"{len(jax.devices())}, compute {args.compute_dtype}; mean of {r['steps']} steps after "
        f"the compile step ({r['compile_step']:.1f} s); tokenizer {r['tokenizer_pieces']} pieces")
  print(f"| {'phase':<38} | {'seconds':>8} | {'share':>6} |")
  print(f"|{'-' * 40}|{'-' * 10}|{'-' * 8}|")
  rows = [("data (Grain loader, prompts)", r["data"]),
          ("rollout (sampler call + copies)", r["rollout"]),
          ("  of which jitted Sampler.generate", r["generate"]),
          ("reward (decode, score, advantages)", r["reward"]),
          ("train (assemble, update, metrics)", r["train"]),
          ("  of which jitted train_step", r["train_step"]),
          ("checkpoint (blocking part, async save)", r["checkpoint"]),
          ("step wall time", wall),
          ("model compute (jitted calls)", r["model"]),
          ("host overhead (wall - model compute)", r["overhead"])]
  for name, sec in rows:
    print(f"| {name:<38} | {sec:8.3f} | {100 * sec / wall:5.1f}% |")
  print(f"\nhost overhead: {100 * r['overhead'] / wall:.1f}% of the step (target < 15%)")
  print("peer: none ran in this process (TRL's GRPOTrainer on the same workload is the one to "
        "measure back to back)")


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--preset", choices=sorted(PRESETS), default="a")
  p.add_argument("--steps", type=int, default=3, help="timed steps after the compile step")
  p.add_argument("--contexts", type=int, default=16)
  p.add_argument("--generations", type=int, default=8)
  p.add_argument("--prompt-len", type=int, default=256)
  p.add_argument("--new-tokens", type=int, default=None,
                 help="max_new_tokens (default 64; 512 with --long-tail)")
  p.add_argument("--train-micro", type=int, default=8,
                 help="contexts per gradient-accumulation micro-step (configs/base.py: 8; on "
                 "CPU 8 runs ~2x faster than 16: the activations stay in cache)")
  p.add_argument("--compute-dtype", default=None,
                 help="default float32 on CPU, bfloat16 on GPU/TPU")
  p.add_argument("--json", default=None, help="also write the figures here")
  p.add_argument("--long-tail", action="store_true",
                 help="long-tail budgets (cap --new-tokens 512, mean 64); static vs engine")
  p.add_argument("--slots", type=int, default=32, help="SlotEngine decode slots (--long-tail)")
  p.add_argument("--oversample", type=int, default=0,
                 help="--long-tail: also run the engine loop with rl.oversample_contexts N")
  p.add_argument("--partial", action="store_true",
                 help="--long-tail --oversample: and once more with rl.partial_rollouts")
  args = p.parse_args()
  if (args.oversample or args.partial) and not args.long_tail:
    p.error("--oversample and --partial run with --long-tail only; add --long-tail.")
  if args.partial and not args.oversample:
    p.error("--partial carries rows over-sampling left unfinished; add --oversample N.")
  if args.long_tail:
    long_tail_main(args)
    return
  args.new_tokens = args.new_tokens or 64
  args.compute_dtype = args.compute_dtype or (
      "float32" if jax.default_backend() == "cpu" else "bfloat16")
  workdir = tempfile.mkdtemp(prefix="rpt_step_")
  try:
    result = run(args.preset, args.steps, contexts=args.contexts, generations=args.generations,
                 prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                 train_micro=min(args.train_micro, args.contexts),
                 compute_dtype=args.compute_dtype, workdir=workdir)
  finally:
    shutil.rmtree(workdir, ignore_errors=True)
  print_table(result, args)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=1)


def long_tail_main(args) -> None:
  """The rollout engines through the RPT loop on the long-tail budgets, on the same data and
  initial weights: static, SlotEngine, and with --oversample the SlotEngine over-sampling (and
  with --partial carrying partial rollouts too); prints rollout times, slot utilization and
  staleness side by side."""
  args.new_tokens = args.new_tokens or 512
  args.compute_dtype = args.compute_dtype or (
      "float32" if jax.default_backend() == "cpu" else "bfloat16")
  o = args.oversample
  runs = {"static": ("static Sampler", dict(long_tail="static")),
          "engine": (f"SlotEngine ({args.slots} slots)", dict(long_tail="engine"))}
  if o:
    runs["oversample"] = (f"  over-sampled +{o}", dict(long_tail="engine", oversample=o))
  if o and args.partial:
    runs["partial"] = (f"  over-sampled +{o}, partial",
                       dict(long_tail="engine", oversample=o, partial=True))
  results = {}
  for name, (_, kwargs) in runs.items():
    workdir = tempfile.mkdtemp(prefix="rpt_step_")
    try:
      results[name] = run(args.preset, args.steps, contexts=args.contexts,
                          generations=args.generations, prompt_len=args.prompt_len,
                          new_tokens=args.new_tokens,
                          train_micro=min(args.train_micro, args.contexts),
                          compute_dtype=args.compute_dtype, workdir=workdir, slots=args.slots,
                          **kwargs)
    finally:
      shutil.rmtree(workdir, ignore_errors=True)
  print(f"\nRPT step, long-tail rollouts, preset ({args.preset}): {args.contexts} contexts x "
        f"G={args.generations}, {args.prompt_len}-token prompts, budgets log-normal mean 64 "
        f"sigma 1 cap {args.new_tokens}; mean of {results['static']['steps']} steps after the "
        f"compile step")
  print(f"| {'rollout engine':<30} | {'rollout s':>9} | {'generate s':>10} | {'train s':>8} | "
        f"{'step s':>7} | {'kept tok':>8} | {'slot util':>9} | {'stale mean/max':>14} | "
        f"{'dropped/carried':>15} |")
  print(f"|{'-' * 32}|{'-' * 11}|{'-' * 12}|{'-' * 10}|{'-' * 9}|{'-' * 10}|{'-' * 11}|"
        f"{'-' * 16}|{'-' * 17}|")
  for name, (label, _) in runs.items():
    r = results[name]
    util = f"{100 * r['utilization']:.1f}%" if "utilization" in r else "-"
    print(f"| {label:<30} | {r['rollout']:9.2f} | {r['generate']:10.2f} | {r['train']:8.2f} | "
          f"{r['wall']:7.2f} | {r['kept_tokens']:8.0f} | {util:>9} | "
          f"{r['staleness_mean']:6.2f} / {r['staleness_max']:5.0f} | "
          f"{r['dropped']:6.1f} / {r['carried']:6.1f} |")
  engine = results["engine"]
  print(f"rollout: engine {engine['rollout']:.2f} s, static {results['static']['rollout']:.2f} s, "
        f"{results['static']['rollout'] / engine['rollout']:.2f}x faster")
  for name in ("oversample", "partial"):
    if name in results:
      r = results[name]
      print(f"over-sampled +{o}{', partial' if name == 'partial' else ''}: rollout "
            f"{r['rollout']:.2f} s/step vs engine {engine['rollout']:.2f} s "
            f"({engine['rollout'] / r['rollout']:.2f}x); slot utilization "
            f"{100 * r['utilization']:.1f}% vs {100 * engine['utilization']:.1f}%; staleness "
            f"mean {r['staleness_mean']:.2f} max {r['staleness_max']:.0f}; kept tokens/step "
            f"{r['kept_tokens']:.0f} vs {engine['kept_tokens']:.0f}")


if __name__ == "__main__":
  main()
