r"""Will a run config fit its hardware? Compile its programs for the target, on any machine.

`check_run_config(config)` lowers and compiles, ahead of time, the three device programs of an RPT
step for the config's model and mesh, and reads per-device bytes from
`compiled.memory_analysis()`:

  sampler_prefill  one rollout micro-batch (`rl.rollout_micro_batch` contexts) at the longest
                   prompt bucket;
  sampler_decode   the same micro-batch's G rollouts decoded to `rl.max_new_tokens`;
  train_step       the whole update: `rl.batch_contexts` contexts at the longest bucket with G
                   responses of `rl.max_new_tokens`, gradients accumulated over micro-batches of
                   `rl.train_micro_batch` contexts, AdamW applied.

Nothing is materialised: the model is `nnx.eval_shape`d from its HF config.json (the checkpoint
folder's, or `compile_check.hf_config` in the config when the weights are elsewhere) and every
input is a `jax.ShapeDtypeStruct` carrying its sharding. With `compile_check.platform = 'tpu'`
the programs are compiled for a TPU topology described by libtpu (`jax[tpu]` installed, no TPU
needed): `jax.experimental.topologies.get_topology_desc`. Otherwise they are compiled for this
machine's own devices (e.g. on the 8-GPU host itself). Where neither is possible (libtpu missing,
or a GPU target checked from a CPU machine) the check falls back to counting the bytes of the
arrays each program holds by their shardings (`estimate_memory`): parameters, gradients,
optimiser state, KV cache; activations and XLA temporaries are then NOT counted, and the report
says so.

Per-device peak of a program = argument + output + temp - alias bytes. During rollouts the
optimiser state is resident too (the train state lives across the step), so the sampler
programs' totals add it. Budget = HBM per device (the `HBM_BYTES` table by device kind, or
`compile_check.hbm_bytes`) x `compile_check.hbm_fraction`. A program the TPU compiler rejects
for memory is reported (its temporaries from the error, fits=False), not raised.

The mesh is built as a run builds it (`jax.make_mesh`), so a mesh shape the slice cannot lay out
is an error here too. Also reported: whether `rpt_jax.validate` accepts the config (the figures
are produced either way), and how many processes hold each batch shard (`hosts_per_batch_shard`:
above 1 when the tensor axis crosses hosts; those processes then read identical rows, which
`rpt_jax.train.process_batch_rows` arranges and tests/test_multihost.py checks).

The target, in the config (see configs/tpu_v4.py):

    c.compile_check = dict(
        platform='tpu', topology='v4:4x4x4', chip_config_name='megacore',
        chips_per_host_bounds=(2, 2, 1), accelerator_type='v4-128', num_devices=64,
        num_processes=16, hbm_bytes=32 * 2**30, hbm_fraction=0.9,
        hf_config={...config.json...},      # or model={...ModelConfig fields...} (tests)
        stated_gib={...})                   # the config's own arithmetic, checked by tests

Command line (works today, on a machine without a TPU when libtpu is installed):

    python -m rpt_jax.compile_check --config=configs/tpu_v4.py

`python -m rpt_jax.main --config=... --mode=compile_check` calls the same function.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import re
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import Mesh, PartitionSpec

from rpt_jax import host_rows
from rpt_jax import mesh as mesh_lib
from rpt_jax import validate
from rpt_jax.model.config import ModelConfig
from rpt_jax.model.transformer import KVCache, Transformer, tracing_for_platform

GiB = 2**30

# HBM per JAX device, by `device.device_kind`. v4 and v5p run megacore: one JAX device per chip.
HBM_BYTES = {
    "TPU v2": 8 * GiB,  # per core
    "TPU v3": 16 * GiB,  # per core
    "TPU v4": 32 * GiB,
    "TPU v4 lite": 8 * GiB,
    "TPU v5 lite": 16 * GiB,  # v5e
    "TPU v5": 95 * GiB,  # v5p
    "TPU v6 lite": 32 * GiB,  # v6e (Trillium)
    "NVIDIA H100 80GB HBM3": 80 * GiB,
    "NVIDIA H100": 80 * GiB,
    "NVIDIA H200": 141 * GiB,
    "NVIDIA A100-SXM4-80GB": 80 * GiB,
    "NVIDIA A100-SXM4-40GB": 40 * GiB,
}
# Leaves room for what memory_analysis does not count (runtime reserve, fragmentation, infeed).
DEFAULT_HBM_FRACTION = 0.9
PROGRAMS = ("sampler_prefill", "sampler_decode", "train_step")
# libtpu needs these to describe a slice it is not running on (no metadata server, no peers);
# ALLOW_MULTIPLE_LIBTPU_LOAD: do not take the single-process TPU lock another JAX process holds.
_TPU_ENV = {"TPU_SKIP_MDS_QUERY": "1", "TPU_WORKER_HOSTNAMES": "localhost",
            "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}


@dataclasses.dataclass(frozen=True)
class Target:
  """Where the programs are compiled for: a mesh over real or described devices, or (mesh None)
  only a mesh shape, for the eval_shape fallback."""

  platform: str
  device_kind: str
  num_devices: int
  mesh_shape: dict[str, int]
  mesh: Mesh | None
  hbm_bytes: int
  method: str  # 'aot' | 'eval_shape'
  note: str = ""


# ------------------------------------------------------------------------------------------------
# The model, abstractly.
# ------------------------------------------------------------------------------------------------


def model_config_from_run_config(config: ml_collections.ConfigDict) -> ModelConfig:
  """The policy's ModelConfig without reading any weights.

  Order: `compile_check.model` (ModelConfig fields, for tests), the config.json in a local
  `model.hf_path`, `compile_check.hf_config` (the config.json as a dict, for checkpoints on GCS
  or not yet downloaded), else the from-scratch `model.scratch` architecture.
  """
  m = config.model
  dtypes = dict(param_dtype=m.param_dtype, compute_dtype=m.compute_dtype, remat=m.remat)
  cc = _target_settings(config)
  if cc.get("model"):
    fields = dict(cc["model"])
    fields.update(dtypes)
    return ModelConfig(**fields)
  if m.hf_path and os.path.isfile(os.path.join(m.hf_path, "config.json")):
    return ModelConfig.from_hf(m.hf_path, **dtypes)
  if cc.get("hf_config"):
    return ModelConfig.from_hf(dict(cc["hf_config"]), **dtypes)
  if m.hf_path:
    raise FileNotFoundError(
        f"model.hf_path={m.hf_path!r} has no readable config.json here; set "
        "compile_check.hf_config to the checkpoint's config.json contents (a dict) to check the "
        "config without the weights.")
  fields = m.scratch.to_dict()
  fields["vocab_size"] = fields.get("vocab_size") or config.tokenizer.train_vocab_size
  return ModelConfig(**fields, **dtypes)


def abstract_model(model_config: ModelConfig, mesh: Mesh | None,
                   rules: mesh_lib.ShardingRules) -> Transformer:
  """A Transformer whose parameters are ShapeDtypeStructs (no memory, no RNG work)."""
  return nnx.eval_shape(lambda: Transformer(model_config, rngs=nnx.Rngs(0), mesh=mesh,
                                            rules=rules))


def _value(variable: nnx.Variable) -> Any:
  return variable.get_value() if hasattr(variable, "get_value") else variable.value


def _with_shardings(tree: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


# ------------------------------------------------------------------------------------------------
# The target: a TPU topology described by libtpu, this machine's devices, or only a mesh shape.
# ------------------------------------------------------------------------------------------------


def _target_settings(config: ml_collections.ConfigDict) -> dict[str, Any]:
  cc = config.get("compile_check")
  return dict(cc.to_dict() if isinstance(cc, ml_collections.ConfigDict) else (cc or {}))


def libtpu_available() -> bool:
  return importlib.util.find_spec("libtpu") is not None


def tpu_topology_devices(topology: str, chips_per_host_bounds: Sequence[int],
                         accelerator_type: str, chip_config_name: str = "default",
                         num_slices: int = 1) -> list[jax.Device]:
  """The devices of a TPU slice described (not attached) by libtpu.

  topology: e.g. 'v4:4x4x4' (v4-128, 64 chips) or 'v5e:16x16' (v5e-256).
  chip_config_name: 'megacore' for v4/v5p (one JAX device per chip, both TensorCores, the whole
    chip's HBM, as JAX runs them), 'default' otherwise. Without 'megacore' a v4 is described core
    by core, each with half the HBM, and the compiler then checks against 16 GiB, not 32.
  """
  for key, value in dict(_TPU_ENV, TPU_ACCELERATOR_TYPE=accelerator_type).items():
    os.environ.setdefault(key, value)
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top

  desc = topologies.get_topology_desc(
      platform="tpu", topology_name=topology, chip_config_name=chip_config_name,
      chips_per_host_bounds=tuple(int(c) for c in chips_per_host_bounds), num_slices=num_slices)
  return list(desc.devices)


def _mesh_over(devices: Sequence[jax.Device], shape: tuple[int, ...], where: str) -> Mesh:
  """The ('data', 'fsdp', 'tensor') mesh a run would build over these devices.

  `jax.make_mesh`, as `rpt_jax.mesh.make_mesh` uses on a full slice: it maps each mesh axis onto
  physical torus axes and refuses shapes it cannot map (e.g. an 8-way axis on a v4 4x4x4, where
  every axis must be a product of 4s), which would stop the real run at start-up.
  """
  axis_types = (jax.sharding.AxisType.Auto,) * len(mesh_lib.MESH_AXES)
  try:
    return jax.make_mesh(shape, mesh_lib.MESH_AXES, axis_types, devices=list(devices))
  except NotImplementedError as e:
    raise ValueError(
        f"mesh {dict(zip(mesh_lib.MESH_AXES, shape))} cannot be laid out on {where} by "
        f"jax.make_mesh (what rpt_jax.mesh.make_mesh uses): {str(e).splitlines()[0]} Choose "
        "config.mesh sizes that are products of the slice's physical axis sizes.") from e


def shared_batch_shards(mesh: Mesh, rules: mesh_lib.ShardingRules) -> int:
  """The most processes that hold one batch shard (1 when every host feeds distinct rows).

  Above 1 when a non-batch axis (tensor) crosses hosts: those processes must feed identical
  rows to `jax.make_array_from_process_local_data`, which `rpt_jax.train.process_batch_rows`
  arranges (every process of a shard gets the same row set).
  """
  batch_axes = mesh_lib._as_tuple(rules.mesh_axes("batch"))  # pylint: disable=protected-access
  shards = math.prod(mesh.shape[a] for a in batch_axes)
  held = host_rows.rows_by_process(  # one row per batch shard
      jax.sharding.NamedSharding(mesh, rules.spec(("batch",))), shards)
  groups = [tuple(sorted(rows)) for rows in held.values()]
  return max(groups.count(rows) for rows in groups)


def _hbm_for(device_kind: str, settings: dict[str, Any]) -> int:
  if settings.get("hbm_bytes"):
    return int(settings["hbm_bytes"])
  if device_kind in HBM_BYTES:
    return HBM_BYTES[device_kind]
  for kind, size in sorted(HBM_BYTES.items(), key=lambda kv: -len(kv[0])):
    if device_kind.startswith(kind):
      return size
  raise ValueError(f"HBM per device of {device_kind!r} is not in rpt_jax.compile_check.HBM_BYTES; "
                   "set compile_check.hbm_bytes in the config.")


def resolve_target(config: ml_collections.ConfigDict, mesh: Mesh | None = None) -> Target:
  """Where to compile: `compile_check.platform` 'tpu' (a described slice), else this machine.

  `mesh`: this machine's run mesh (from `rpt_jax.main`); used when the target is this machine.
  Falls back to method 'eval_shape' (byte counts by sharding, no compiler) when libtpu is missing
  or this machine's devices are not the target's.
  """
  s = _target_settings(config)
  platform = s.get("platform") or "local"
  mesh_config = mesh_lib.MeshConfig(**config.mesh.to_dict())
  if platform == "tpu":
    chips = int(s["num_devices"])
    shape = mesh_config.shape(chips)
    named = dict(zip(mesh_lib.MESH_AXES, shape))
    kind = s.get("device_kind", "")
    if not libtpu_available():
      return Target(platform, kind, chips, named, None, _hbm_for(kind, s), "eval_shape",
                    "libtpu is not installed (pip install 'jax[tpu]'), so nothing was compiled: "
                    "the figures count parameters, gradients, optimiser state and KV cache by "
                    "their shardings; activations and XLA temporaries are NOT included.")
    devices = tpu_topology_devices(
        s["topology"], s.get("chips_per_host_bounds", (2, 2, 1)), s["accelerator_type"],
        s.get("chip_config_name") or "default", int(s.get("num_slices", 1)))
    if len(devices) != chips:
      hint = (" (it lists each TensorCore: set compile_check.chip_config_name='megacore' for "
              "v4/v5p)" if len(devices) == 2 * chips else "")
      raise ValueError(f"topology {s['topology']!r} has {len(devices)} devices{hint} but "
                       f"compile_check.num_devices={chips}; make them agree.")
    kind = devices[0].device_kind
    mesh = _mesh_over(devices, shape, f"a {s['topology']} slice")
    return Target(platform, kind, chips, named, mesh, _hbm_for(kind, s),
                  "aot", f"compiled for a described {s['topology']} slice "
                  f"({s['accelerator_type']}) with libtpu; no TPU attached.")
  # This machine: compile for its own devices if they are the target's.
  want = int(s.get("num_devices") or jax.device_count())
  want_kind = s.get("device_kind", "")
  here = jax.devices()
  shape = mesh_config.shape(want)
  named = dict(zip(mesh_lib.MESH_AXES, shape))
  kind = here[0].device_kind
  if len(here) == want and (not want_kind or kind == want_kind):
    if mesh is None or mesh.devices.size != want:
      mesh = _mesh_over(here, shape, "this machine")
    return Target(here[0].platform, kind, want, named, mesh, _hbm_for(kind, s), "aot",
                  f"compiled for this machine's {want} {kind} device(s).")
  kind = want_kind or kind
  return Target(s.get("platform") or here[0].platform, kind, want, named, None,
                _hbm_for(kind, s), "eval_shape",
                f"this machine has {len(here)} {here[0].device_kind} device(s), not the target's "
                f"{want} {want_kind or 'devices'}: nothing was compiled; the figures count "
                "parameters, gradients, optimiser state and KV cache by their shardings, "
                "activations and XLA temporaries NOT included. Run the check on the target "
                "machine for compiled figures.")


# ------------------------------------------------------------------------------------------------
# Lowering the three programs from abstract inputs.
# ------------------------------------------------------------------------------------------------


def _run_shapes(config: ml_collections.ConfigDict) -> dict[str, int]:
  rl = config.rl
  return dict(rollout_contexts=min(rl.rollout_micro_batch, rl.batch_contexts),
              batch_contexts=rl.batch_contexts, train_micro=min(rl.train_micro_batch,
                                                                rl.batch_contexts),
              prompt_len=max(config.data.prompt_buckets), new_tokens=rl.max_new_tokens,
              generations=rl.num_generations)


def lower_programs(config: ml_collections.ConfigDict, model_config: ModelConfig, mesh: Mesh,
                   rules: mesh_lib.ShardingRules,
                   programs: Sequence[str] = PROGRAMS) -> dict[str, Any]:
  """{name: jax.stages.Lowered} for the requested PROGRAMS, from abstract inputs only."""
  from rpt_jax.rl import optim, update  # pylint: disable=g-import-not-at-top
  from rpt_jax.rl.sampler import Sampler
  from rpt_jax.rl.sampling import Sampling
  from rpt_jax.train import RPTConfig

  sh = _run_shapes(config)
  b, lp, n, g = sh["rollout_contexts"], sh["prompt_len"], sh["new_tokens"], sh["generations"]
  i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)  # noqa: E731
  lowered = {}

  if {"sampler_prefill", "sampler_decode"} & set(programs):
    # The sampler never differentiates, so its model runs without remat (remat inside the
    # decode while_loop also trips NNX's trace-level check; see the issue "Pods" report).
    model = abstract_model(dataclasses.replace(model_config, remat="none"), mesh, rules)
    sampler = Sampler(model, mesh=mesh, rules=rules, pad_id=model_config.pad_token_id or 0)
    # pylint: disable-next=protected-access
    params = _with_shardings(sampler.params, sampler._param_shardings(sampler.params))
    prefill = sampler._prefill_fn(b, lp)  # pylint: disable=protected-access
    if "sampler_prefill" in programs:
      lowered["sampler_prefill"] = prefill.lower(params, i32(b, lp), i32(b))
    if "sampler_decode" in programs:
      logits, cache = jax.eval_shape(prefill, params, i32(b, lp), i32(b))
      method = Sampling(float(config.rl.temperature), int(config.rl.top_k),
                        float(config.rl.top_p))
      eos = tuple(sorted(set(model_config.eos_token_ids))) or (0,)
      decode = sampler._decode_fn(b, lp, g, n, method, eos)  # pylint: disable=protected-access
      key = jax.eval_shape(lambda: jax.random.key(0))
      lowered["sampler_decode"] = decode.lower(params, logits, cache, i32(b), i32(b * g), i32(),
                                               key)

  if "train_step" in programs:
    rpt = RPTConfig.from_config(config)
    optimizer = optim.make_optimizer(**rpt.optimizer)
    graphdef, train_params = update.split_params(abstract_model(model_config, mesh, rules))
    state = update.abstract_train_state(train_params, optimizer, mesh, rules)
    bt = sh["batch_contexts"]
    batch = update.RolloutBatch(
        prompt_tokens=i32(bt, lp), prompt_lengths=i32(bt), completion_tokens=i32(bt * g, n),
        completion_mask=i32(bt * g, n), advantages=jax.ShapeDtypeStruct((bt * g,), jnp.float32))
    step = update.make_train_step(
        graphdef, rpt.loss, optimizer, num_generations=g,
        temperature=max(rpt.temperature, 1e-6), micro_batch_contexts=sh["train_micro"],
        shared_prefix=rpt.shared_prefix, mesh=mesh, rules=rules)
    lowered["train_step"] = step.lower(state, batch)
  return lowered


# ------------------------------------------------------------------------------------------------
# Byte counts.
# ------------------------------------------------------------------------------------------------


class _MeshShape:
  """Stands in for a Mesh where only axis sizes matter (`ShardingRules.spec`)."""

  def __init__(self, shape: dict[str, int]):
    self.shape = dict(shape)


def _shard_bytes(shape: Sequence[int], dtype: Any, spec: PartitionSpec,
                 mesh_shape: dict[str, int]) -> int:
  """Bytes of one device's shard (ceil-divided dims, as XLA pads uneven shards)."""
  dims = list(shape)
  for i, entry in enumerate(spec):
    axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
    ways = math.prod(mesh_shape[a] for a in axes)
    dims[i] = -(-dims[i] // ways)
  return math.prod(dims) * jnp.dtype(dtype).itemsize


def estimate_memory(config: ml_collections.ConfigDict, model_config: ModelConfig,
                    mesh_shape: dict[str, int],
                    rules: mesh_lib.ShardingRules | None = None) -> dict[str, int]:
  """Per-device bytes of the arrays a run holds, from eval_shape and the sharding rules alone
  (default: the config's `sharding_rules`); `mesh_shape` maps each mesh axis to its size.

  params:     the fp32 (param_dtype) master weights, sharded by their logical axes;
  grads:      one gradient of the same layout (the train step holds two while accumulating:
              the running sum and the micro-batch's);
  optimizer:  the optimiser state (Adam mu and nu like the params, plus scalars), from
              `jax.eval_shape(optimizer.init, params)`;
  compute_params: the compute-dtype copy of the weights the sampler casts once per call;
  kv_cache:   the decode cache of one rollout micro-batch, B*G rows x (prompt bucket + response)
              slots, in the compute dtype.
  Activations and XLA temporaries are not included.
  """
  from rpt_jax.rl import optim  # pylint: disable=g-import-not-at-top
  from rpt_jax.train import RPTConfig

  rules = rules or mesh_lib.ShardingRules.from_config(config.get("sharding_rules"))
  fake = _MeshShape(mesh_shape)
  model = abstract_model(model_config, None, rules)
  params = nnx.state(model, nnx.Param)

  # Each array leaf (path includes the Variable's own key) -> its PartitionSpec.
  specs = {}
  for path, var in jax.tree_util.tree_flatten_with_path(
      params, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]:
    shape = _value(var).shape
    inner = jax.tree_util.tree_flatten_with_path(var)[0][0][0]
    specs[tuple(path) + tuple(inner)] = (
        shape, rules.spec(mesh_lib.variable_logical_axes(var), shape, fake))

  def sharded(path, leaf) -> int:
    """A leaf whose path ENDS with a parameter's path and has its shape shares its layout
    (Adam's mu/nu); anything else (counts, hyper-parameters) is replicated."""
    for i in range(len(path)):
      hit = specs.get(tuple(path[i:]))
      if hit is not None and hit[0] == tuple(leaf.shape):
        return _shard_bytes(leaf.shape, leaf.dtype, hit[1], mesh_shape)
    return math.prod(leaf.shape) * jnp.dtype(leaf.dtype).itemsize

  def tree_bytes(tree) -> int:
    return sum(sharded(path, leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0])

  out = {"params": tree_bytes(params)}
  out["grads"] = out["params"]
  cd = jnp.dtype(model_config.compute_dtype)
  out["compute_params"] = tree_bytes(jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, cd), params))
  optimizer = optim.make_optimizer(**RPTConfig.from_config(config).optimizer)
  opt_bytes = tree_bytes(jax.eval_shape(optimizer.init, params))
  out["optimizer"] = opt_bytes
  sh = _run_shapes(config)
  rows = sh["rollout_contexts"] * sh["generations"]
  cache_shape = KVCache.shape(model_config, rows, sh["prompt_len"] + sh["new_tokens"])
  spec = rules.spec(KVCache.LOGICAL_AXES, cache_shape, fake)
  out["kv_cache"] = 2 * model_config.num_layers * _shard_bytes(
      cache_shape, model_config.compute_dtype, spec, mesh_shape)
  return out


# The TPU compiler's out-of-memory messages, e.g. "... the total memory required for HLO
# temporaries (65.21G) exceeds available HBM (15.25G)" or "Used 45.03G of 31.25G hbm".
_OOM_PATTERNS = (
    re.compile(r"required for HLO temporaries \(([\d.]+)([KMGT]?)\)", re.I),
    re.compile(r"Used ([\d.]+)([KMGT]?)(?:i?B)? of [\d.]+[KMGT]?(?:i?B)? hbm", re.I),
)
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def _memory_figures(compiled) -> dict[str, int]:
  stats = compiled.memory_analysis()
  figures = {name: int(getattr(stats, f"{name}_size_in_bytes", 0) or 0)
             for name in ("argument", "output", "temp", "alias", "generated_code")}
  figures["peak"] = (figures["argument"] + figures["output"] + figures["temp"]
                     - figures["alias"])
  return figures


def _oom_figures(message: str, estimate: dict[str, int], name: str) -> dict[str, int] | None:
  """Figures from a compiler out-of-memory error: its temporaries, plus the program's
  arguments as counted by sharding (the compiler does not report them on failure)."""
  for pattern in _OOM_PATTERNS:
    match = pattern.search(message)
    if match:
      temp = int(float(match.group(1)) * _UNITS[match.group(2).upper()])
      args = {"train_step": estimate["params"] + estimate["optimizer"],
              "sampler_prefill": estimate["params"],
              "sampler_decode": estimate["params"]}[name]
      return dict(temp=temp, argument_estimate=args, peak=temp + args)
  return None


def _gib(x: float) -> float:
  return round(x / GiB, 3)


def _verdict(name: str, peak: int, resident: int, budget: int, hbm: int) -> dict[str, Any]:
  total = peak + resident
  fits = total <= budget
  message = (f"{name}: {_gib(total)} GiB per device of a {_gib(budget)} GiB budget "
             f"({_gib(hbm)} GiB HBM)")
  if not fits:
    message += (f": OVER by {_gib(total - budget)} GiB. Lower the micro-batch, raise fsdp/tensor, "
                "or shorten prompt_buckets/max_new_tokens.")
  return dict(total_bytes=total, total_gib=_gib(total), fits=fits, message=message)


# ------------------------------------------------------------------------------------------------
# The check.
# ------------------------------------------------------------------------------------------------


def check_run_config(config: ml_collections.ConfigDict, mesh: Mesh | None = None,
                     rules: mesh_lib.ShardingRules | None = None, *,
                     programs: Sequence[str] = PROGRAMS) -> dict[str, Any]:
  """Compiles (or, failing that, counts) the run's device programs; returns a JSON-able report.

  config: a run config; `compile_check` names the target (see configs/tpu_v4.py).
  mesh: this machine's run mesh (ignored for a described TPU target).
  rules: logical -> mesh axis rules (default: the config's `sharding_rules`).
  programs: a subset of PROGRAMS to check.

  Report: target (platform, device kind, devices, mesh, HBM, budget, method, note), model
  (family, parameter count), estimate (byte counts by sharding), programs: for each, the
  memory_analysis figures, resident_other_bytes, total_bytes/gib, fits and a message; and `fits`
  for all of them. A program that the TPU compiler rejects for memory is reported with
  fits=False and the compiler's own figures instead of raising.
  """
  rules = rules or mesh_lib.ShardingRules.from_config(config.get("sharding_rules"))
  target = resolve_target(config, mesh)
  settings = _target_settings(config)
  fraction = float(settings.get("hbm_fraction") or DEFAULT_HBM_FRACTION)
  budget = int(target.hbm_bytes * fraction)
  checked = ml_collections.ConfigDict(config.to_dict())
  # The weights need not be here: the architecture is enough.
  checked.model.hf_path = checked.data.proxy_hf_path = ""
  # A config `validate` rejects is still measured (the memory figures are what one needs to
  # decide on a fix); the rejection is reported next to them.
  try:
    validate.validate_config(checked, mode="compile_check", num_devices=target.num_devices,
                             num_processes=int(settings.get("num_processes") or 1))
    validation = "ok"
  except validate.ConfigError as e:
    validation = f"rejected by rpt_jax.validate: {e}"
  model_config = model_config_from_run_config(config)
  validate.validate_against_model(config, model_config.max_position_embeddings)
  model_config.check_context_length(max(config.data.prompt_buckets) + config.rl.max_new_tokens)
  estimate = estimate_memory(config, model_config, target.mesh_shape, rules)
  report: dict[str, Any] = {
      "validation": validation,
      "target": dict(platform=target.platform, device_kind=target.device_kind,
                     num_devices=target.num_devices, mesh=target.mesh_shape,
                     hbm_gib=_gib(target.hbm_bytes), budget_gib=_gib(budget),
                     method=target.method, note=target.note),
      "model": dict(family=model_config.family, params=model_config.num_params(),
                    layers=model_config.num_layers, param_dtype=model_config.param_dtype,
                    compute_dtype=model_config.compute_dtype, remat=model_config.remat),
      "shapes": _run_shapes(config),
      "estimate_gib": {k: _gib(v) for k, v in estimate.items()},
      "programs": {},
  }
  if target.mesh is not None:
    report["target"]["hosts_per_batch_shard"] = shared_batch_shards(target.mesh, rules)
  # The train state outlives a step: while the sampler runs, the optimiser state (not an input
  # of the sampler programs) still occupies HBM.
  resident = {"sampler_prefill": estimate["optimizer"], "sampler_decode": estimate["optimizer"],
              "train_step": 0}
  if target.method == "eval_shape":
    counted = {
        "sampler_prefill": estimate["params"] + estimate["compute_params"],
        "sampler_decode": estimate["params"] + estimate["compute_params"] + estimate["kv_cache"],
        "train_step": estimate["params"] + 2 * estimate["grads"] + estimate["optimizer"],
    }
    for name in programs:
      entry = dict(peak_bytes=counted[name], resident_other_bytes=resident[name])
      entry.update(_verdict(name, counted[name], resident[name], budget, target.hbm_bytes))
      entry["message"] += " (arrays only: activations and temporaries not counted)"
      report["programs"][name] = entry
  else:
    for name in programs:
      start = time.perf_counter()
      entry: dict[str, Any] = {}
      try:  # One program at a time: compiling a 14B model's step takes GBs of host memory.
        with tracing_for_platform(target.mesh.devices.flat[0].platform):
          lowered = lower_programs(config, model_config, target.mesh, rules, (name,))[name]
        compiled = lowered.compile()
        del lowered
        figures = _memory_figures(compiled)
      except Exception as e:  # pylint: disable=broad-except
        figures = _oom_figures(str(e), estimate, name)
        if figures is None:
          raise
        entry["compiler_error"] = str(e).splitlines()[0][:400]
      entry["compile_s"] = round(time.perf_counter() - start, 1)
      entry.update({f"{k}_bytes": v for k, v in figures.items()})
      entry["resident_other_bytes"] = resident[name]
      entry.update(_verdict(name, figures["peak"], resident[name], budget, target.hbm_bytes))
      if "compiler_error" in entry:
        entry["fits"] = False
      report["programs"][name] = entry
  report["fits"] = all(p["fits"] for p in report["programs"].values())
  return report


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  _CONFIG = config_flags.DEFINE_config_file("config", None, "Run config (configs/*.py).")
  _PROGRAMS = flags.DEFINE_list("programs", list(PROGRAMS), "Programs to check.")

  def _main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _CONFIG.value is None:
      raise app.UsageError("--config is required, e.g. --config=configs/tpu_v4.py")
    report = check_run_config(_CONFIG.value, programs=_PROGRAMS.value)
    print(json.dumps(report, indent=2))

  logging.set_verbosity(logging.WARNING)
  app.run(_main)
