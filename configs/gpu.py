r"""RPT on one host with 8x NVIDIA H100 80 GB: DeepSeek-R1-Distill-Qwen-14B with the paper's recipe,
8,192-token responses included (cuDNN flash attention; see "Memory" below).

    XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 python -m rpt_jax.main --config=configs/gpu.py \
        --workdir=/data/rpt/run1 --config.model.hf_path=/data/models/DeepSeek-R1-Distill-Qwen-14B
    python -m rpt_jax.compile_check --config=configs/gpu.py   # on the GPU host: compiled figures

(JAX preallocates 75% of GPU memory unless XLA_PYTHON_CLIENT_MEM_FRACTION says otherwise.)
Install with `pip install -e ".[cuda]"`. The checkpoint folder holds config.json, the safetensors
and the tokenizer; the data is as in configs/tpu_v4.py.

Memory per GPU (80 GiB; budget 90% = 72 GiB). Mesh data=1 x fsdp=1 x tensor=8: every weight
is split over heads/mlp/vocab 8 ways (NVLink all-reduces), the batch is not split. P =
14,770,033,664 parameters. `compile_check.stated_gib` holds these figures; tests check them
against an eval_shape count:
  params          P x 4 B (fp32 master) / 8 (+ the replicated norms)            = 6.88 GiB
  grads           the same layout, x2 while accumulating                        = 2 x 6.88
  optimizer       Adam mu + nu, P x 8 B / 8                                     = 13.76 GiB
  compute_params  the sampler's bf16 copy, P x 2 B / 8                          = 3.44 GiB
  kv_cache        decode, 8 contexts x G=8 = 64 rows per GPU, (5,120 + 8,192) slots,
                  8 KV heads / 8 tensor, 128, k+v, 48 layers, bf16:
                  64 x 13,312 x 1 x 128 x 2 x 2 B x 48                          = 19.50 GiB
  train state during the whole step: params + Adam + 2 grads = 34.4 GiB.
With no batch split, a train micro-step of ONE context holds its G=8 response rows on every
GPU: the residual stream saved per layer (remat) is 8 x N x 5,120 x 2 B x 48 layers, ~30 GiB at
N = 8,192. Attention (model.attention 'auto': cuDNN flash attention in bf16 on the GPU) keeps no
[N, S] scores; with dense scores one layer's were 8 rows x 5 heads x N x (5,120 + N) x 4 B
(~17 GiB at N = 8,192, x ~3 with probabilities and gradients), which is why this config ran
4,096-token responses before. Expected now: train state 34.4 + residuals ~30 + one layer's
recomputed activations, ~68 of the 72 GiB budget; decode grows by the 6.0 GiB of longer cache.
To re-measure on the GPU host: `python -m rpt_jax.compile_check --config=configs/gpu.py`.
No GPU topology can be described without GPUs, so from a CPU machine the check counts arrays
only. Compiled on a TPU stand-in with the same 8-device mesh (v5p:2x2x2, attention traced as
on an accelerator, i.e. splash there; XLA's GPU buffer assignment differs, so treat these as
estimates), at 4,096-token responses with dense attention: train_step 69.1 GiB,
sampler_prefill 26.6 GiB, sampler_decode 38.8 GiB (incl. the resident Adam state) of the 72 GiB
budget; to be refreshed at 8,192 with the kernels. On the GPU host,
`python -m rpt_jax.compile_check --config=configs/gpu.py` compiles for the real devices.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import base  # noqa: E402  (the repo root must be importable first)
from configs import tpu_v4  # noqa: E402

GiB = 2**30


def get_config():
  c = base.get_config()
  c.workdir = ""  # --workdir=/data/rpt/RUN

  tpu_v4.use_r1_distill_qwen_14b(c, "/data/models")

  c.mesh.update(data=1, fsdp=1, tensor=8)
  c.data.score_batch_size = 16

  # 'auto': cuDNN flash attention on the GPUs (bf16, head_dim 128); splash when compile_check
  # traces the TPU stand-in from a CPU machine. Responses: the paper's 8,192 (configs/base.py).
  c.model.attention = "auto"
  c.rl.rollout_micro_batch = 8
  c.rl.train_micro_batch = 1

  c.compile_check = dict(
      platform="gpu", num_devices=8, device_kind="NVIDIA H100 80GB HBM3", num_processes=1,
      hbm_bytes=80 * GiB, hbm_fraction=0.9, hf_config=tpu_v4.R1_DISTILL_QWEN_14B,
      stated_gib=dict(params=6.88, grads=6.88, optimizer=13.76, compute_params=3.44,
                      kv_cache=19.50))
  return c
