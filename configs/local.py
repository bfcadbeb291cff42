"""The offline default: the whole RPT pipeline on a laptop CPU in minutes, no network.

Built-in synthetic maths corpus -> SentencePiece trained on it -> a ~1M-parameter Qwen2-style
policy pretrained on the training documents plus worked skill problems (rpt_jax.data.skills: sums
digit by digit with carries, sequence rules, equations, each answered in `</think> \\boxed{}`
form; never in the next-token-reasoning template; operands of at most 3 digits) -> positions
filtered by that policy's top-16 entropy -> evaluation -> RPT (GRPO, G=8) -> evaluation. Run:

    python -m rpt_jax.main --config=configs/local.py --workdir=/tmp/rpt_local

Differences from the paper's settings (configs/base.py), all for CPU minutes instead of TPU days:
a tiny model and vocabulary, short contexts (48 tokens) and responses (64 tokens), 16 contexts
per step, a larger learning rate (the paper's 1e-6 moves a 14B model; a 1M model needs more),
dynamic sampling from step 0 (a small model has many all-wrong groups), fp32 compute.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import base  # noqa: E402  (the repo root must be importable first)


def get_config():
  c = base.get_config()
  c.workdir = "/tmp/rpt_local"
  c.mesh.update(data=1, fsdp=-1, tensor=1)

  c.model.compute_dtype = "float32"
  c.model.remat = "none"
  c.model.scratch.update(
      family="qwen2", vocab_size=0, hidden_size=128, intermediate_size=384, num_layers=4,
      num_heads=4, num_kv_heads=2, head_dim=32, rope_theta=10000.0,
      max_position_embeddings=512, tie_word_embeddings=True)
  c.tokenizer.train_vocab_size = 1024

  c.data.source.synthetic_documents = 3000
  c.data.filter = "entropy"
  c.data.entropy_threshold = 0.5
  c.data.max_prompt_tokens = 48
  c.data.min_context_tokens = 8
  c.data.completion_tokens = 8
  c.data.eval_fraction = 0.1
  c.data.max_positions_per_document = 8
  c.data.score_seq_len = 256
  c.data.score_overlap = 64
  c.data.score_batch_size = 32
  c.data.prompt_buckets = (128, 192)

  # Half the rows are the corpus; the rest are worked skill problems (rpt_jax.data.skills), as
  # many chat turns as fit a row, operands growing from 1 to 3 digits over the run: the policy
  # can reason (and box answers) before RPT, but has never seen the next-token-reasoning
  # template.
  c.pretrain.update(steps=900, batch_size=16, seq_len=192, learning_rate=3e-3, warmup_steps=30,
                    reasoning_example_fraction=0.0, skill_example_fraction=0.5,
                    max_context_tokens=48, log_every=50)

  c.rl.batch_contexts = 16
  c.rl.num_generations = 8
  c.rl.temperature = 0.8
  c.rl.max_new_tokens = 64  # a 5-digit sum worked digit by digit, then the boxed answer
  c.rl.rollout_micro_batch = 16
  c.rl.train_micro_batch = 8  # contexts per accumulation micro-step (8 is ~2x faster than 16 on CPU)
  c.rl.dynamic_sampling_from_step = 0
  c.rl.dynamic_sampling_max_tries = 3

  c.optim.update(learning_rate=2e-4, warmup_steps=5, weight_decay=0.0)
  # 40 steps: reasoning accuracy is within ~2 points of its plateau by then (a 300-step run
  # ends at 11.6% on the hard split against 10.8% at step 41), and the whole run fits 10
  # minutes on 2 cores.
  c.train.update(steps=40, log_every=1, checkpoint_every=20, keep_checkpoints=2)
  c.eval.update(max_positions=400, num_samples=1, pass_k=(1,), temperature=0.8,
                batch_contexts=64)
  return c
