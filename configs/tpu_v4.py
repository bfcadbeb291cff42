r"""RPT on TPU v4-128 (64 chips, 16 hosts): DeepSeek-R1-Distill-Qwen-14B with the paper's recipe.

    tpu_scripts/create.sh --accelerator-type=v4-128
    tpu_scripts/run.sh --config=configs/tpu_v4.py --workdir=gs://BUCKET/rpt/run1
    python -m rpt_jax.compile_check --config=configs/tpu_v4.py   # memory check, on any machine

Paper settings kept (configs/base.py, PAPER.md Table 5): G=8, T=0.8, AdamW lr 1e-6, 256 contexts
per step, clip 0.2, 4,096-token contexts (prompt bucket 5,120 with template and chat markers),
8,192-token responses, 1,000 steps, dynamic sampling from step 500. bf16 compute, fp32 master
weights and Adam state, full remat per decoder layer.

The checkpoint: `model.hf_path` is a folder (config.json + *.safetensors) on every worker, or a
gs:// path read through the bucket's gcsfuse mount (rpt_jax.run_dir: `tpu_scripts/run.sh` mounts
the workdir's bucket and any `--mount BUCKET`):

    tpu_scripts/run.sh --workdir=gs://BUCKET/rpt/run1 -- \
      --config.model.hf_path=gs://BUCKET/models/DeepSeek-R1-Distill-Qwen-14B

Reading 30 GB through FUSE is slower than a local copy; to load from disk instead:

    gcloud compute tpus tpu-vm ssh $TPU_NAME --zone=$ZONE --worker=all --command=\
      'gcloud storage cp -r gs://BUCKET/models/DeepSeek-R1-Distill-Qwen-14B ~/'
    tpu_scripts/run.sh ... -- --config.model.hf_path=$HOME/DeepSeek-R1-Distill-Qwen-14B

The tokenizer is read from the same folder. The proxy that filters positions (the paper:
R1-Distill-Qwen-1.5B) is `data.proxy_hf_path`, handled the same way. Point `data.source` at the
corpus (e.g. `--config.data.source.kind=jsonl --config.data.source.path=...`); the default is
the built-in synthetic corpus.

Memory per chip (v4: 32 GiB HBM; megacore, one JAX device per chip). Mesh data=1 x fsdp=16 x
tensor=4 (a v4-128 is a 4x4x4 torus: `jax.make_mesh` needs each mesh axis to be a product of 4s,
so tensor=8 cannot be laid out). Parameters are split 64 ways (embed over fsdp, heads/mlp/vocab
over tensor), the batch 16 ways. P = 14,770,033,664 parameters (48 layers, d=5120, 40 query / 8
KV heads of 128, MLP 13,824, vocab 152,064, untied head). `compile_check.stated_gib` holds these
figures; tests check them against an eval_shape count:
  params          P x 4 B (fp32 master) / 64                                    = 0.86 GiB
  grads           the same layout, x2 while accumulating (running sum + micro-batch's) = 2 x 0.86
  optimizer       Adam mu + nu, P x 8 B / 64                                    = 1.72 GiB
  compute_params  the bf16 copy the sampler casts once per call, P x 2 B / 64    = 0.43 GiB
  kv_cache        the rollout engine's 256 decode slots (rollout_micro_batch 32 x G=8) over
                  the 16-way batch split = 16 rows per chip, (5,120 + 8,192) slots, 8 KV heads / 4
                  tensor, head_dim 128, k and v, 48 layers, bf16:
                  16 x 13,312 x 2 x 128 x 2 x 2 B x 48                          = 9.75 GiB
  train state during the whole step: params + Adam + 2 grads = 4.31 GiB.
Activations, train step (remat per layer): a micro-step of 2 contexts x G=8 = 16 rows puts ONE
response row on each chip (8,191 positions): its residual stream saved at each of 48 layers,
8,191 x 5,120 x 2 B x 48 = 3.75 GiB, plus the prefill of both contexts (2 contexts cannot be
split 16 ways, so every chip runs it: 2 x 5,120 x 5,120 x 2 B x 48 = 4.7 GiB of saved
residuals). Attention is the splash kernel (`model.attention`): no [N, S] scores, where dense
attention held one layer's, 10 heads x 8,191 x 13,311 x 4 B = 4.1 GiB (fp32; x ~3 with
probabilities and gradients) when recomputed. More contexts per micro-step multiply the
residuals: 16 contexts (1 per batch shard) need ~65 GiB of temporaries with dense scores.
Decode steps read each row's live cache blocks (rpt_jax.model.attention.chunked).
Compiled for v4:4x4x4 (libtpu 0.0.42.1, one program per command: `TPU_SKIP_MDS_QUERY=1 python
-m rpt_jax.compile_check --config=configs/tpu_v4.py --programs=train_step`, traced as the TPU
runs it, splash attention), per chip incl. the resident Adam state while sampling (budget 28.8):
  train_step       15.16 GiB (23.5 with dense attention: the [8,191, 13,311] scores, their
                   probabilities and gradients are gone); 17.23 with `model.scan_layers` (its stacked
                   copy of the fp32 weights and that copy's gradient, ~0.9 GiB each on this
                   64-way split, outweigh what the scan saves; 0.2 on v5e's 256-way split), so
                   v4 stays unrolled
  sampler_prefill  13.46 GiB: the engine's admission of 16 contexts (one per batch shard) into
                   the slot cache: 10.6 GiB arguments (the donated 9.75 GiB cache + weights),
                   1.1 GiB temporaries, 1.7 GiB Adam
  sampler_decode   23.20 GiB: a decode chunk over the 256 slots: the same arguments, 10.9 GiB
                   temporaries (mostly the bf16 weight shards all-gathered over fsdp, kept
                   across the loop's steps, and the step's activations), 1.7 GiB Adam.
Host layout: each tensor group spans hosts, so several processes hold each batch shard (the
report's `hosts_per_batch_shard`); they read the same rows of every global batch
(`rpt_jax.train.process_batch_rows`), as tests/test_multihost.py checks on 2 CPU processes.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import base  # noqa: E402  (the repo root must be importable first)

GiB = 2**30

# DeepSeek-R1-Distill-Qwen-14B's config.json (its architecture fields), so that the memory check
# runs where the checkpoint is not; a readable `model.hf_path/config.json` takes precedence.
R1_DISTILL_QWEN_14B = dict(
    model_type="qwen2", architectures=["Qwen2ForCausalLM"], vocab_size=152064,
    hidden_size=5120, intermediate_size=13824, num_hidden_layers=48, num_attention_heads=40,
    num_key_value_heads=8, hidden_act="silu", rms_norm_eps=1e-5, rope_theta=1000000.0,
    max_position_embeddings=131072, tie_word_embeddings=False, use_sliding_window=False,
    sliding_window=131072, bos_token_id=151646, eos_token_id=151643)


def use_r1_distill_qwen_14b(c, models: str) -> None:
  """The paper's policy (R1-Distill-Qwen-14B) and proxy (1.5B) from the folder `models` (a local
  path on every worker, or gs:// read through the bucket's gcsfuse mount: rpt_jax.run_dir),
  fp32 master weights, bf16 compute, full remat per decoder layer."""
  c.model.hf_path = f"{models}/DeepSeek-R1-Distill-Qwen-14B"
  c.model.param_dtype = "float32"
  c.model.compute_dtype = "bfloat16"
  c.model.remat = "full"
  c.data.proxy_hf_path = f"{models}/DeepSeek-R1-Distill-Qwen-1.5B"


def get_config():
  c = base.get_config()
  c.workdir = ""  # --workdir=gs://BUCKET/rpt/RUN (shared by every worker)

  use_r1_distill_qwen_14b(c, "gs://BUCKET/models")  # --config.model.hf_path=... to override

  c.mesh.update(data=1, fsdp=16, tensor=4)
  c.model.attention = "splash"  # the Pallas TPU kernel; 'auto' picks it on a TPU too
  c.data.score_batch_size = 64  # a multiple of the 16-way batch split

  c.rl.rollout_micro_batch = 32  # 256 decode slots
  # One context per batch shard per admission: a lone context's prefill would run on all 16.
  c.rl.prefill_contexts = 16
  c.rl.train_micro_batch = 2

  c.compile_check = dict(
      platform="tpu", topology="v4:4x4x4", chip_config_name="megacore",
      chips_per_host_bounds=(2, 2, 1), accelerator_type="v4-128", num_devices=64,
      device_kind="TPU v4", num_processes=16, hbm_bytes=32 * GiB, hbm_fraction=0.9,
      hf_config=R1_DISTILL_QWEN_14B,
      stated_gib=dict(params=0.86, grads=0.86, optimizer=1.72, compute_params=0.43,
                      kv_cache=9.75))
  return c
