"""Where `rpt_jax.compile_check` compiles a run's programs: a TPU slice described by libtpu
(no TPU attached), this machine's own devices, or, failing both, only a mesh shape.

`resolve_target(spec)` reads the spec's `compile_check` section (`spec.target`): platform 'tpu'
with topology / accelerator_type / chips_per_host_bounds / chip_config_name / num_devices, or
this machine (num_devices / device_kind to require); `hbm_bytes` overrides the per-device HBM of
the `HBM_BYTES` table. `mesh_over` builds the run's mesh over the target's devices as a run
would (`jax.make_mesh`), and `shared_batch_shards` says how many processes hold one batch shard.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
from typing import Any, Sequence

import jax
from jax.sharding import Mesh

from rpt_jax import host_rows
from rpt_jax import mesh as mesh_lib

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


def mesh_over(devices: Sequence[jax.Device], shape: tuple[int, ...], where: str) -> Mesh:
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
  batch_axes = mesh_lib.as_tuple(rules.mesh_axes("batch"))
  shards = math.prod(mesh.shape[a] for a in batch_axes)
  held = host_rows.rows_by_process(  # one row per batch shard
      jax.sharding.NamedSharding(mesh, rules.spec(("batch",))), shards)
  groups = [tuple(sorted(rows)) for rows in held.values()]
  return max(groups.count(rows) for rows in groups)


def hbm_for(device_kind: str, settings: dict[str, Any]) -> int:
  """Memory per device: `compile_check.hbm_bytes`, the HBM_BYTES table, or for CPU devices this
  host's RAM shared by its local devices."""
  if settings.get("hbm_bytes"):
    return int(settings["hbm_bytes"])
  if device_kind in HBM_BYTES:
    return HBM_BYTES[device_kind]
  for kind, size in sorted(HBM_BYTES.items(), key=lambda kv: -len(kv[0])):
    if device_kind.startswith(kind):
      return size
  if device_kind == "cpu":
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // jax.local_device_count()
  raise ValueError(f"HBM per device of {device_kind!r} is not in rpt_jax.targets.HBM_BYTES; "
                   "set compile_check.hbm_bytes in the config.")


def resolve_target(spec, mesh: Mesh | None = None) -> Target:
  """Where to compile: `compile_check.platform` 'tpu' (a described slice), else this machine.

  `mesh`: this machine's run mesh (from `rpt_jax.main`); used when the target is this machine.
  Falls back to method 'eval_shape' (byte counts by sharding, no compiler) when libtpu is missing
  or this machine's devices are not the target's.
  """
  s = spec.target
  platform = s.get("platform") or "local"
  mesh_config = spec.mesh
  if platform == "tpu":
    chips = int(s["num_devices"])
    shape = mesh_config.shape(chips)
    named = dict(zip(mesh_lib.MESH_AXES, shape))
    kind = s.get("device_kind", "")
    if not libtpu_available():
      return Target(platform, kind, chips, named, None, hbm_for(kind, s), "eval_shape",
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
    mesh = mesh_over(devices, shape, f"a {s['topology']} slice")
    return Target(platform, kind, chips, named, mesh, hbm_for(kind, s),
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
      mesh = mesh_over(here, shape, "this machine")
    return Target(here[0].platform, kind, want, named, mesh, hbm_for(kind, s), "aot",
                  f"compiled for this machine's {want} {kind} device(s).")
  kind = want_kind or kind
  return Target(s.get("platform") or here[0].platform, kind, want, named, None,
                hbm_for(kind, s), "eval_shape",
                f"this machine has {len(here)} {here[0].device_kind} device(s), not the target's "
                f"{want} {want_kind or 'devices'}: nothing was compiled; the figures count "
                "parameters, gradients, optimiser state and KV cache by their shardings, "
                "activations and XLA temporaries NOT included. Run the check on the target "
                "machine for compiled figures.")
