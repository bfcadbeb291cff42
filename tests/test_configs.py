"""Every configs/*.py loads and validates for its intended devices; the real-hardware configs'
stated memory arithmetic agrees with an eval_shape count of the arrays they imply."""

import glob
import importlib.util
import math
import os

import pytest

from rpt_jax import compile_check, validate
from rpt_jax.spec import RunSpec
from rpt_jax import mesh as mesh_lib

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
HARDWARE = ("tpu_v4", "tpu_v5e", "gpu")


def load(name: str):
  spec = importlib.util.spec_from_file_location(f"configs_{name}",
                                                os.path.join(CONFIG_DIR, f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def all_config_names():
  return sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(CONFIG_DIR, "*.py"))
                if not os.path.basename(p).startswith("_"))


def test_hardware_configs_exist():
  assert set(HARDWARE) <= set(all_config_names())


@pytest.mark.parametrize("name", all_config_names())
def test_config_validates_for_its_devices(name):
  config = load(name)
  cc = config.get("compile_check") or {}
  devices = cc.get("num_devices", 1)
  processes = cc.get("num_processes", 1)
  # The checkpoints live on the target machines, not here.
  config.model.hf_path = config.data.proxy_hf_path = ""
  # The paper's 8,192-token responses fit a TPU chip only with ONE response row per device per
  # micro-step (fewer contexts than batch shards, their C x G rows split evenly): validate
  # accepts that as long as the rows divide the batch split.
  spec = RunSpec.from_config(config)
  validate.validate_run(spec, mode="train", num_devices=devices, num_processes=processes)
  if name in HARDWARE:
    model = spec.model.model_config(spec.untrained_vocab())
    validate.validate_against_model(spec, model.max_position_embeddings)
    assert config.model.param_dtype == "float32" and config.model.compute_dtype == "bfloat16"
    assert config.model.remat != "none"


@pytest.mark.parametrize("name", HARDWARE)
def test_paper_hyper_parameters(name):
  c = load(name)
  assert (c.rl.num_generations, c.rl.temperature, c.rl.batch_contexts) == (8, 0.8, 256)
  assert (c.rl.eps_low, c.rl.eps_high, c.rl.beta) == (0.2, 0.2, 0.0)
  assert c.optim.learning_rate == 1e-6 and c.train.steps == 1000
  assert c.rl.dynamic_sampling_from_step == 500
  assert c.data.max_prompt_tokens == 4096
  assert c.rl.max_new_tokens == 8192  # with fused attention, every pod config
  assert c.model.attention in ("auto", "splash", "cudnn")
  # v5e's splash train step fits only with one scanned layer body (11.2 vs 17.9 GiB unrolled;
  # the config's docstring).
  assert c.model.scan_layers or name != "tpu_v5e"


# R1-Distill-Qwen-14B by hand: 48 layers of q/k/v/o (+ q/k/v bias), SwiGLU, two RMSNorms;
# untied embedding and head; final norm.
D, F, N, K, H, V, LAYERS = 5120, 13824, 40, 8, 128, 152064, 48
LAYER = D * N * H + 2 * D * K * H + N * H * D + (N + 2 * K) * H + 3 * D * F + 2 * D
PARAMS_14B = 2 * V * D + LAYERS * LAYER + D


def test_r1_distill_qwen_14b_architecture():
  spec = RunSpec.from_config(load("tpu_v4"))
  model = spec.model.model_config(spec.untrained_vocab())
  assert model.num_params() == PARAMS_14B == 14_770_033_664
  assert (model.num_layers, model.num_heads, model.num_kv_heads, model.head_dim) == (48, 40, 8, 128)
  # KV cache per token in bf16: 2 (k, v) x 48 x 8 x 128 x 2 B = 192 KiB (DESIGN.md).
  assert 2 * model.num_layers * model.num_kv_heads * model.head_dim * 2 == 192 * 1024


@pytest.mark.parametrize("name", HARDWARE)
def test_stated_memory_matches_eval_shape_count(name):
  config = load(name)
  cc = config.compile_check
  mesh_shape = dict(zip(mesh_lib.MESH_AXES, mesh_lib.MeshConfig(**config.mesh.to_dict()).shape(
      cc.num_devices)))
  spec = RunSpec.from_config(config)
  model = spec.model.model_config(spec.untrained_vocab())
  counted = compile_check.estimate_memory(spec, model, mesh_shape)
  for key, stated in cc.stated_gib.items():
    # Stated to two decimals in the config; norms/biases replicated add a little.
    assert math.isclose(counted[key] / 2**30, stated, rel_tol=0.02, abs_tol=0.01), (
        name, key, counted[key] / 2**30, stated)
  # The headline: parameters, gradients and Adam state at 16 B/param over every chip.
  chips = math.prod(mesh_shape.values())
  assert math.isclose(counted["params"] + counted["grads"] + counted["optimizer"],
                      16 * PARAMS_14B / chips, rel_tol=0.02)
  # And the KV cache from the sampler docstring's formula.
  rl = config.rl
  rows = rl.rollout_micro_batch * rl.num_generations
  slots = max(config.data.prompt_buckets) + rl.max_new_tokens
  batch_ways = mesh_shape["data"] * mesh_shape["fsdp"]
  kv_ways = min(mesh_shape["tensor"], K)
  assert counted["kv_cache"] == rows * slots * 192 * 1024 // (batch_ways * kv_ways)
