"""Data-preparation throughput: positions scored per second and the host's share of wall time.

Trains a SentencePiece tokenizer on the synthetic corpus, builds a tiny proxy Transformer, runs
`rpt_jax.data.prepare.prepare` end to end, and separately times the jitted scorer alone on the
same number of [B, L] batches (block_until_ready), so

    host overhead = (prepare wall - compile - scorer forward time) / (prepare wall - compile)

is the share of time spent outside the model's forward pass (tokenising, window packing,
filtering, building and writing records). Run:

    python benchmarks/prepare.py [--docs 200 --hidden 256 --layers 4 --seq-len 512 --batch 8]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

import jax
import numpy as np
from flax import nnx

from rpt_jax.data import filtering, synthetic
from rpt_jax.data.prepare import PrepareConfig, prepare
from rpt_jax.data.sources import SourceConfig
from rpt_jax.model.config import ModelConfig
from rpt_jax.model.transformer import Transformer
from rpt_jax.tokenizer import train_sentencepiece


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--docs", type=int, default=120)
  parser.add_argument("--repeats", type=int, default=2,
                      help="timed passes of the scorer and of prepare(); the fastest counts")
  parser.add_argument("--hidden", type=int, default=256)
  parser.add_argument("--layers", type=int, default=4)
  parser.add_argument("--vocab", type=int, default=1024)
  parser.add_argument("--seq-len", type=int, default=512)
  parser.add_argument("--overlap", type=int, default=128)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--filter", default="entropy")
  parser.add_argument("--threshold", type=float, default=1.0)
  parser.add_argument("--logit-scale", type=float, default=40.0,
                      help="multiplies the random lm_head: a random init is near-uniform "
                      "(entropy ~ log 16 everywhere), which would keep every position")
  parser.add_argument("--max-prompt-tokens", type=int, default=512)
  parser.add_argument("--lines", type=int, nargs=2, default=(20, 40),
                      help="lines per synthetic document (longer documents -> more windows)")
  args = parser.parse_args()

  work = tempfile.mkdtemp(prefix="rpt_prepare_bench_")
  try:
    run(args, work)
  finally:
    shutil.rmtree(work, ignore_errors=True)


def run(args, work):
  synth = synthetic.SyntheticConfig(num_documents=args.docs, seed=0,
                                    lines_per_document=tuple(args.lines))
  docs = list(synthetic.synthetic_documents(synth))
  tokenizer = train_sentencepiece(docs[:400], args.vocab, os.path.join(work, "tok.model"))
  heads = max(1, args.hidden // 64)
  model_config = ModelConfig(
      family="qwen2", vocab_size=tokenizer.vocab_size, hidden_size=args.hidden,
      intermediate_size=3 * args.hidden, num_layers=args.layers, num_heads=heads,
      num_kv_heads=max(1, heads // 2), head_dim=args.hidden // heads,
      max_position_embeddings=args.seq_len, attention_bias=True)
  model = Transformer(model_config, rngs=nnx.Rngs(0))
  model.lm_head[...] = model.lm_head[...] * args.logit_scale
  config = PrepareConfig(
      source=SourceConfig(kind="synthetic", synthetic=synth), filter=args.filter,
      entropy_threshold=args.threshold, min_context_tokens=16,
      max_prompt_tokens=args.max_prompt_tokens,
      score_seq_len=args.seq_len, score_overlap=args.overlap, score_batch_size=args.batch,
      docs_per_shard=128, eval_fraction=0.1)

  # How many scorer batches prepare() will run, from the same windowing rule.
  lengths = [len(tokenizer.encode(d)) for d in docs]
  windows = sum(len(filtering.document_windows(n, args.seq_len, args.overlap)) for n in lengths
                if n > config.min_context_tokens)
  shard_windows = []
  for start in range(0, len(lengths), config.docs_per_shard):
    shard_windows.append(sum(len(filtering.document_windows(n, args.seq_len, args.overlap))
                             for n in lengths[start:start + config.docs_per_shard]
                             if n > config.min_context_tokens))
  batches = sum(-(-w // args.batch) for w in shard_windows)

  # Scorer alone: compile once, then the same number of batches, timed with block_until_ready.
  scorer = filtering.make_proxy_scorer(model, batch_size=args.batch, seq_len=args.seq_len,
                                       logits_chunk=config.logits_chunk)
  rng = np.random.default_rng(0)
  tokens = rng.integers(3, tokenizer.vocab_size, (args.batch, args.seq_len)).astype(np.int32)
  mask = np.ones_like(tokens)
  t0 = time.perf_counter()
  jax.block_until_ready(scorer(tokens, mask))
  compile_s = time.perf_counter() - t0
  # The same number of batches, dispatched back to back like prepare() does; the fastest of
  # `repeats` passes (other processes may share the CPU).
  forward_s = float("inf")
  for _ in range(args.repeats):
    t0 = time.perf_counter()
    for _ in range(batches):
      out = scorer(tokens, mask)
    jax.block_until_ready(out)
    forward_s = min(forward_s, time.perf_counter() - t0)

  prepare_s = float("inf")
  for repeat in range(args.repeats):
    t0 = time.perf_counter()
    manifest = prepare(config, tokenizer, model, os.path.join(work, f"out{repeat}"),
                       show_progress=False)
    prepare_s = min(prepare_s, time.perf_counter() - t0)
  run_s = prepare_s - compile_s  # prepare builds (and compiles) its own scorer once
  scored = manifest["documents"]["positions_scored"]
  kept = manifest["documents"]["positions_selected"]
  host = max(0.0, run_s - forward_s) / run_s

  rows = [
      ("device", str(jax.devices()[0].platform)),
      ("proxy", f"{model_config.num_layers}L hidden {args.hidden}, vocab {tokenizer.vocab_size}, "
                f"{model_config.num_params() / 1e6:.2f}M params"),
      ("documents / tokens", f"{len(docs)} / {sum(lengths)}"),
      ("windows / batches [B, L]", f"{windows} / {batches} [{args.batch}, {args.seq_len}]"),
      ("positions scored / kept", f"{scored} / {kept} (filter {args.filter})"),
      ("records written", str(sum(manifest['counts'][s]['records'] for s in ('train', 'eval')))),
      ("scorer compile (s)", f"{compile_s:.2f}"),
      ("prepare wall, excl. compile (s)", f"{run_s:.2f} (fastest of {args.repeats})"),
      ("scorer forward alone (s)", f"{forward_s:.2f} (fastest of {args.repeats})"),
      ("positions scored / s", f"{scored / run_s:,.0f}"),
      ("positions scored / s (forward only)", f"{scored / forward_s:,.0f}"),
      ("host overhead share", f"{100 * host:.1f}% (target < 20%)"),
  ]
  width = max(len(k) for k, _ in rows)
  for key, value in rows:
    print(f"{key:<{width}}  {value}")


if __name__ == "__main__":
  main()
