r"""RPT on TPU v5e-256 (256 chips, 64 hosts): DeepSeek-R1-Distill-Qwen-14B with the paper's recipe,
8,192-token responses included (splash attention; see "Memory" below).

    tpu_scripts/create.sh --accelerator-type=v5litepod-256 --zone=us-west4-a
    tpu_scripts/run.sh --config=configs/tpu_v5e.py --workdir=gs://BUCKET/rpt/run1
    python -m rpt_jax.compile_check --config=configs/tpu_v5e.py   # memory check, on any machine

The recipe, the checkpoint (`model.hf_path`: a folder on every worker, or gs:// through the
bucket's gcsfuse mount) and the data are as in configs/tpu_v4.py; the mesh, micro-batches and
response length differ.

Memory per chip (v5e: 16 GiB HBM, one TensorCore per chip). Mesh data=4 x fsdp=8 x tensor=8,
with `embed` sharded over data AND fsdp (sharding_rules below), so parameters are split all 256
ways while a micro-batch of 4 contexts still lands one context per data shard. P = 14,770,033,664
parameters. `compile_check.stated_gib` holds these figures; tests check them against an
eval_shape count:
  params          P x 4 B (fp32 master) / 256                                   = 0.21 GiB
  grads           the same layout, x2 while accumulating                        = 2 x 0.21
  optimizer       Adam mu + nu, P x 8 B / 256                                   = 0.43 GiB
  compute_params  the sampler's bf16 copy, P x 2 B / 256                        = 0.11 GiB
  kv_cache        the engine's 512 decode slots (64 x G=8) over the 32-way batch split = 16 rows
                  per chip, (5,120 + 8,192) slots, 8 KV heads / 8 tensor, 128, k+v, 48 layers,
                  bf16: 16 x 13,312 x 1 x 128 x 2 x 2 B x 48                    = 4.88 GiB
  train state during the whole step: params + Adam + 2 grads = 1.08 GiB.
Activations: the train step holds ONE response row per chip per micro-step (4 contexts x G=8 =
32 rows over the 32-way batch split) and one context's prefill: the residual stream saved at
each of 48 layers (N x 5,120 x 2 B x 48; 5,120-token prefill: 2.4 GiB). Attention is the splash
kernel (`model.attention`): no [N, S] scores, where dense attention held one layer's,
5 heads x N x (5,120 + N) x 4 B (fp32; x ~3 with probabilities and gradients: ~6 GiB at the
paper's N = 8,192). Decode steps read each row's live cache blocks.
Compiled for v5e:16x16 (libtpu 0.0.42.1, one program per command: `TPU_SKIP_MDS_QUERY=1 python
-m rpt_jax.compile_check --config=configs/tpu_v5e.py --programs=train_step`, traced as the TPU
runs it), per chip incl. the resident Adam state while sampling (budget 14.4 = 90% of 16 GiB):
  train_step       11.20 GiB (10.5 GiB temporaries) with splash and the layers scanned
                   (`model.scan_layers`, this config). Unrolled, the same step compiled to
                   17.89 GiB with splash (over the budget) and 14.1 with dense attention. Why,
                   from the buffer reports (`XLA_FLAGS=--xla_dump_to=DIR`, the
                   *memory-usage-report and *live-range files) of the unrolled step with fewer
                   layers (`--config.compile_check.hf_config.num_hidden_layers=N`): 2.03 /
                   2.40 / 5.26 GiB at 2 / 4 / 12 layers, 0.36 GiB per layer at depth; at the
                   peak (inside the micro-batch loop's backward) every layer's bf16
                   all-gathered MLP and attention weights and an MLP activation were live
                   besides the saved residual streams: the latency-hiding scheduler keeps them
                   across unrolled layers for overlap (as reported in jax-ml/jax#20763).
                   Lowering `--xla_tpu_scheduler_percent_shared_memory_limit` (60) changed
                   nothing; turning the scheduler off failed to compile; one scanned layer
                   body fixes it.
  sampler_prefill  6.20 GiB (layers scanned; 6.23 unrolled): the engine admitting one context
                   (prefill_contexts=1); 32 contexts (one per batch shard) needed 16.5 GiB
                   with splash or chunked alike (the cache insert over the two-axis batch
                   split is not partitioned)
  sampler_decode   8.44 GiB: a decode chunk over the 512 slots (5.1 GiB arguments: the donated
                   4.88 GiB slot cache + weights; 2.9 GiB temporaries; 0.4 GiB Adam).
Host layout: each tensor group spans hosts, so several processes hold each batch shard (the
report's `hosts_per_batch_shard`); they read the same rows of every global batch
(`rpt_jax.train.process_batch_rows`), as tests/test_multihost.py checks on 2 CPU processes.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import base  # noqa: E402  (the repo root must be importable first)
from configs import tpu_v4  # noqa: E402

GiB = 2**30


def get_config():
  c = base.get_config()
  c.workdir = ""  # --workdir=gs://BUCKET/rpt/RUN (shared by every worker)

  tpu_v4.use_r1_distill_qwen_14b(c, "gs://BUCKET/models")  # as in configs/tpu_v4.py

  c.mesh.update(data=4, fsdp=8, tensor=8)
  # rpt_jax.mesh.DEFAULT_RULES with `embed` over data x fsdp: fully sharded weights (ZeRO-3 over
  # 32 x tensor 8) while the batch is split over the same 32.
  c.sharding_rules = (
      ("batch", ("data", "fsdp")), ("embed", ("data", "fsdp")), ("mlp", "tensor"),
      ("heads", "tensor"), ("kv_heads", "tensor"), ("head_dim", None), ("vocab", "tensor"),
      ("length", None), ("cache_length", None), ("layers", None), ("norm", None))
  c.data.score_batch_size = 64  # a multiple of the 32-way batch split

  # Splash attention with the layers scanned: 11.2 GiB compiled. Unrolled, the scheduler keeps
  # per-layer weights live across 48 layers: 17.9 GiB (over the 14.4 budget; see the docstring).
  c.model.attention = "splash"
  c.model.scan_layers = True
  c.rl.rollout_micro_batch = 64  # 512 decode slots
  # One context per admission, its prefill repeated on every batch shard: admitting 32 (one per
  # shard) does not compile within 16 GiB (16.5 GiB: the cache insert over the two-axis batch
  # split is not partitioned); see the docstring.
  c.rl.prefill_contexts = 1
  c.rl.train_micro_batch = 4

  c.compile_check = dict(
      platform="tpu", topology="v5e:16x16", chip_config_name="default",
      chips_per_host_bounds=(2, 2, 1), accelerator_type="v5litepod-256", num_devices=256,
      device_kind="TPU v5 lite", num_processes=64, hbm_bytes=16 * GiB, hbm_fraction=0.9,
      hf_config=tpu_v4.R1_DISTILL_QWEN_14B,
      stated_gib=dict(params=0.21, grads=0.21, optimizer=0.43, compute_params=0.11,
                      kv_cache=4.88))
  return c
