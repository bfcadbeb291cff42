"""The ahead-of-time memory check: compiled for a described TPU slice (libtpu, no TPU), and the
eval_shape fallback, against per-device byte counts worked out by hand."""

import importlib.util
import os

import ml_collections
import numpy as np
import pytest

from rpt_jax import compile_check, targets
from rpt_jax.spec import RunSpec

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")

GiB = 2**30
# A small qwen2 stand-in, sharded over a 4-chip v4 (megacore) as data=1 x fsdp=2 x tensor=2.
SMALL = dict(family="qwen2", vocab_size=2048, hidden_size=256, intermediate_size=512,
             num_layers=2, num_heads=4, num_kv_heads=2, head_dim=64, attention_bias=True,
             max_position_embeddings=512, eos_token_ids=(1,))
V4_8 = dict(platform="tpu", topology="v4:2x2x1", chip_config_name="megacore",
            chips_per_host_bounds=(2, 2, 1), accelerator_type="v4-8", num_devices=4)
BATCH, G, PROMPT, NEW, MICRO = 8, 4, 64, 32, 4


def load_config(name: str) -> ml_collections.ConfigDict:
  spec = importlib.util.spec_from_file_location(f"configs_{name}",
                                                os.path.join(CONFIG_DIR, f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def small_config(**target) -> ml_collections.ConfigDict:
  c = load_config("base")
  c.workdir = "/tmp/unused"
  c.mesh.update(data=1, fsdp=2, tensor=2)
  c.model.update(param_dtype="float32", compute_dtype="bfloat16", remat="full")
  c.data.prompt_buckets = (32, PROMPT)
  c.rl.update(batch_contexts=BATCH, num_generations=G, max_new_tokens=NEW,
              rollout_micro_batch=MICRO, train_micro_batch=MICRO)
  c.compile_check = dict(V4_8, model=SMALL, **target)
  return c


def params_per_device_by_hand() -> int:
  """fp32 bytes of one device's parameter shards, from the default rules written out: matrices
  split 4 ways (embed over fsdp=2 x heads/kv_heads/mlp/vocab over tensor=2), biases over tensor
  only, norms replicated."""
  v, d, f, n, k, h = 2048, 256, 512, 4, 2, 64
  matrices = 2 * v * d + 2 * (d * n * h + 2 * d * k * h + n * h * d + 3 * d * f)
  biases = 2 * (n * h + 2 * k * h)
  norms = d + 2 * 2 * d
  return 4 * (matrices // 4 + biases // 2 + norms)


def kv_cache_per_device_by_hand() -> int:
  rows = MICRO * G // 2  # batch over fsdp=2
  return 2 * 2 * rows * (PROMPT + NEW) * (2 // 2) * 64 * 2  # k/v x layers x ... x bf16


needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason="libtpu is not installed (pip install 'jax[tpu]'): no TPU topology to compile for")


@pytest.fixture(scope="module")
def aot_report():
  return compile_check.check_run_config(RunSpec.from_config(small_config()))


@needs_libtpu
def test_aot_compiles_every_program_for_a_described_v4_slice(aot_report):
  target = aot_report["target"]
  assert target["method"] == "aot" and target["device_kind"] == "TPU v4"
  assert target["num_devices"] == 4 and target["hbm_gib"] == 32.0
  assert set(aot_report["programs"]) == set(compile_check.PROGRAMS)
  for name, entry in aot_report["programs"].items():
    assert 0 < entry["peak_bytes"] < 32 * GiB, name
    assert entry["fits"], entry["message"]
  assert aot_report["fits"]


@needs_libtpu
def test_aot_arguments_are_the_sharded_arrays(aot_report):
  params, cache = params_per_device_by_hand(), kv_cache_per_device_by_hand()
  programs = aot_report["programs"]
  # The engine's admission and decode chunk both take the weights and the slot state (the
  # slot cache: MICRO x G slots of prompt + response positions) and donate the state, so it
  # is argument and output at once, not a temporary. TPU pads small arrays to tiles, hence
  # the tolerance.
  for name in ("sampler_prefill", "sampler_decode"):
    entry = programs[name]
    # The donated state: the cache plus the slots' small [S] vectors, each padded to a tile.
    assert cache <= entry["alias_bytes"] <= cache + 160 * 2**10, name
    np.testing.assert_allclose(entry["argument_bytes"], params + entry["alias_bytes"],
                               rtol=0.01, err_msg=name)
    # While sampling, the optimiser state is resident beside the program.
    assert entry["resident_other_bytes"] >= 2 * params, name
  # The train step takes the weights, Adam's mu and nu (each like the weights), and the batch;
  # it donates the state, so nearly all of its output aliases its input.
  train = programs["train_step"]
  np.testing.assert_allclose(train["argument_bytes"], 3 * params, rtol=0.02)
  assert train["alias_bytes"] >= 0.99 * 3 * params


def test_estimate_counts_by_hand():
  spec = RunSpec.from_config(small_config())
  model = spec.model.model_config(spec.untrained_vocab())
  est = compile_check.estimate_memory(spec, model, dict(data=1, fsdp=2, tensor=2))
  params = params_per_device_by_hand()
  assert est["params"] == est["grads"] == params
  assert est["compute_params"] == params // 2
  # Adam mu + nu like the params, plus a few replicated scalars (counts, hyper-parameters).
  assert 2 * params <= est["optimizer"] <= 2 * params + 256
  assert est["kv_cache"] == kv_cache_per_device_by_hand()


def test_fallback_without_libtpu_counts_arrays_and_says_so(monkeypatch):
  monkeypatch.setattr(targets, "libtpu_available", lambda: False)
  report = compile_check.check_run_config(RunSpec.from_config(small_config(hbm_bytes=4 * 2**20)))
  assert report["target"]["method"] == "eval_shape"
  assert "libtpu is not installed" in report["target"]["note"]
  params = params_per_device_by_hand()
  train = report["programs"]["train_step"]
  assert train["peak_bytes"] >= 5 * params  # params + 2 grads + mu + nu
  # A 4 MiB "chip" is too small: every verdict says how much over, and what was not counted.
  assert not report["fits"]
  for entry in report["programs"].values():
    assert not entry["fits"] and "OVER by" in entry["message"]
    assert "not counted" in entry["message"]


def test_gpu_target_checked_from_a_cpu_machine_falls_back():
  config = small_config()
  config.compile_check = dict(platform="gpu", num_devices=8, device_kind="NVIDIA H100 80GB HBM3",
                              model=SMALL)
  config.mesh.update(data=1, fsdp=4, tensor=2)
  report = compile_check.check_run_config(RunSpec.from_config(config))
  assert report["target"]["method"] == "eval_shape"
  assert report["target"]["hbm_gib"] == 80.0
  assert "not the target's" in report["target"]["note"]


def test_local_target_compiles_for_this_machines_devices():
  config = small_config()
  config.compile_check = dict(model=SMALL, hbm_bytes=GiB)  # The 8 simulated CPU devices.
  config.mesh.update(data=1, fsdp=4, tensor=2)
  report = compile_check.check_run_config(RunSpec.from_config(config),
                                          programs=("sampler_prefill",))
  assert report["target"]["method"] == "aot" and report["target"]["num_devices"] == 8
  entry = report["programs"]["sampler_prefill"]
  assert entry["fits"] and entry["argument_bytes"] > 0


def test_compiler_out_of_memory_message_is_reported_not_raised():
  message = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
             "temporaries (65.21G) exceeds available HBM (31.25G).")
  estimate = dict(params=GiB, optimizer=2 * GiB)
  figures = compile_check._oom_figures(message, estimate, "train_step")
  assert figures["temp"] == int(65.21 * GiB) and figures["peak"] == int(65.21 * GiB) + 3 * GiB
  assert compile_check._oom_figures("INTERNAL: something else", estimate, "train_step") is None


def test_errors_name_the_fix():
  config = small_config()
  config.mesh.fsdp = -1
  config.compile_check = dict(V4_8, num_devices=8, model=SMALL)
  if importlib.util.find_spec("libtpu") is not None:
    with pytest.raises(ValueError, match="num_devices=8"):
      compile_check.check_run_config(RunSpec.from_config(config))
  config = small_config()
  config.compile_check = dict(V4_8)  # no model, no hf_config
  config.model.hf_path = "/nonexistent/R1-Distill"
  spec = RunSpec.from_config(config)
  with pytest.raises(ValueError, match="compile_check.hf_config"):
    spec.model.model_config(spec.untrained_vocab())
  config.compile_check = dict(platform="gpu", num_devices=8, device_kind="Mystery GPU",
                              model=SMALL)
  config.mesh.fsdp = -1
  with pytest.raises(ValueError, match="compile_check.hbm_bytes"):
    compile_check.check_run_config(RunSpec.from_config(config))


@needs_libtpu
def test_mesh_the_slice_cannot_lay_out_is_refused():
  # v4-128 is a 4x4x4 torus: jax.make_mesh (what a run uses) needs every mesh axis to be a
  # product of 4s, so an 8-way tensor axis would stop the real run at start-up.
  devices = targets.tpu_topology_devices("v4:4x4x4", (2, 2, 1), "v4-128", "megacore")
  assert len(devices) == 64 and devices[0].device_kind == "TPU v4"
  with pytest.raises(ValueError, match="products of the slice's physical axis sizes"):
    targets.mesh_over(devices, (1, 8, 8), "v4:4x4x4")


@needs_libtpu
def test_batch_shards_that_cross_hosts_are_counted():
  from rpt_jax import mesh as mesh_lib
  devices = targets.tpu_topology_devices("v4:4x4x4", (2, 2, 1), "v4-128", "megacore")
  rules = mesh_lib.ShardingRules()
  fsdp_only = targets.mesh_over(devices, (1, 64, 1), "v4:4x4x4")
  assert targets.shared_batch_shards(fsdp_only, rules) == 1  # one chip per batch shard
  tensor4 = targets.mesh_over(devices, (1, 16, 4), "v4:4x4x4")
  # By hand: the batch shard of mesh row (0, j) is held by its 4 tensor chips; count the hosts.
  procs = [{d.process_index for d in tensor4.devices[0, j]} for j in range(16)]
  assert targets.shared_batch_shards(tensor4, rules) == max(len(p) for p in procs) > 1


@pytest.mark.skipif(not os.environ.get("RPT_FULL_COMPILE_CHECK"),
                    reason="compiles R1-Distill-Qwen-14B for v4-128 (~20 min on 2 CPU cores); "
                    "set RPT_FULL_COMPILE_CHECK=1")
@needs_libtpu
def test_full_v4_128_config():
  report = compile_check.check_run_config(RunSpec.from_config(load_config("tpu_v4")))
  assert report["target"]["method"] == "aot"
  for entry in report["programs"].values():
    assert entry["fits"], entry["message"]


def test_reports_the_model_the_run_builds(tmp_path):
  """compile_check counts the parameters of the policy the run itself builds (scratch Qwen2 with
  its q/k/v biases, vocabulary of the trained tokenizer), not a look-alike."""
  import micro_run
  from rpt_jax import pipeline
  spec = RunSpec.from_config(micro_run.micro_config())
  built = pipeline.Run(spec, str(tmp_path / "run"), progress=False)
  built.model  # pylint: disable=pointless-statement  # trains the tokenizer, builds the policy
  report = compile_check.check_run_config(spec, programs=())
  assert report["model"]["params"] == built.model_config.num_params()
  assert built.model_config.attention_bias
