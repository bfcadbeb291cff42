"""The device mesh and the table that maps logical tensor axes to mesh axes.

Every parameter and activation in rpt_jax is annotated with logical axis names (`embed`, `mlp`,
`heads`, `kv_heads`, `head_dim`, `vocab`, `batch`, ...). `ShardingRules` turns such a tuple of
names into a `PartitionSpec` over the mesh axes `('data', 'fsdp', 'tensor')`, so changing how a
model is sharded is a change of the rules table (a config value), never of model code.

Parameters carry their logical axes as NNX variable metadata (`nnx.Param(x, logical_axes=...)`);
`state_shardings` reads that metadata and returns a matching pytree of `NamedSharding`s.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

LogicalAxes = tuple[str | None, ...]
MeshAxes = str | tuple[str, ...] | None

# The default logical -> mesh table. Parameters: the embedding dimension is split over fsdp
# (ZeRO-3 style; gathered per layer by XLA), heads/mlp/vocab over tensor (Megatron style).
# Activations: batch over data x fsdp.
DEFAULT_RULES: tuple[tuple[str, MeshAxes], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("vocab", "tensor"),
    ("length", None),
    ("cache_length", None),
    ("layers", None),
    ("norm", None),
)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Mesh axis sizes. Exactly one may be -1, meaning "all remaining devices"."""

  data: int = 1
  fsdp: int = -1
  tensor: int = 1

  def shape(self, num_devices: int) -> tuple[int, int, int]:
    """Resolves -1 and checks that the sizes multiply to `num_devices`."""
    sizes = [self.data, self.fsdp, self.tensor]
    for name, size in zip(MESH_AXES, sizes):
      if size == 0 or size < -1:
        raise ValueError(
            f"mesh.{name}={size} is not a valid axis size: use a positive integer or -1 "
            "(fill with the remaining devices).")
    fills = [i for i, s in enumerate(sizes) if s == -1]
    if len(fills) > 1:
      raise ValueError(
          f"mesh sizes {dict(zip(MESH_AXES, sizes))} have more than one -1; set all but one "
          "axis explicitly.")
    fixed = math.prod(s for s in sizes if s != -1)
    if fills:
      if num_devices % fixed:
        raise ValueError(
            f"mesh sizes {dict(zip(MESH_AXES, sizes))} do not divide the {num_devices} devices: "
            f"the fixed axes multiply to {fixed}. Choose sizes whose product divides {num_devices}.")
      sizes[fills[0]] = num_devices // fixed
    if math.prod(sizes) != num_devices:
      raise ValueError(
          f"mesh sizes {dict(zip(MESH_AXES, sizes))} multiply to {math.prod(sizes)}, but "
          f"{num_devices} devices are present. Make the product equal {num_devices} (or use -1 "
          "for one axis).")
    return tuple(sizes)  # type: ignore[return-value]


def make_mesh(config: MeshConfig | Mapping[str, int] | None = None,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds a `('data', 'fsdp', 'tensor')` mesh over `devices` (default: all devices)."""
  if config is None:
    config = MeshConfig()
  elif not isinstance(config, MeshConfig):
    config = MeshConfig(**dict(config))
  devices = list(jax.devices() if devices is None else devices)
  shape = config.shape(len(devices))
  # Auto axes: GSPMD propagates shardings from the annotations we give (newer JAX defaults
  # make_mesh to Explicit "sharding in types", which changes jit semantics).
  axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  if len(devices) == len(jax.devices()):
    # Lets JAX order devices for the physical topology (ICI rings on TPU).
    return jax.make_mesh(shape, MESH_AXES, axis_types, devices=devices)
  return Mesh(np.asarray(devices, dtype=object).reshape(shape), MESH_AXES,
              axis_types=axis_types)


@dataclasses.dataclass(frozen=True)
class ShardingRules:
  """Maps logical axis names to mesh axes; unknown names are replicated."""

  rules: tuple[tuple[str, MeshAxes], ...] = DEFAULT_RULES

  def __post_init__(self):
    names = [name for name, _ in self.rules]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
      raise ValueError(f"sharding rules name {dupes} more than once; keep one rule per axis.")
    for name, target in self.rules:
      for axis in as_tuple(target):
        if axis not in MESH_AXES:
          raise ValueError(
              f"sharding rule {name!r} -> {target!r} names mesh axis {axis!r}; the mesh axes "
              f"are {MESH_AXES}.")

  @classmethod
  def from_config(cls, rules: Any) -> "ShardingRules":
    """Accepts a ShardingRules, None (defaults), or a sequence/mapping of (name, axes)."""
    if rules is None:
      return cls()
    if isinstance(rules, ShardingRules):
      return rules
    items = rules.items() if isinstance(rules, Mapping) else rules
    return cls(tuple((str(k), tuple(v) if isinstance(v, list) else v) for k, v in items))

  def mesh_axes(self, logical_name: str | None) -> MeshAxes:
    if logical_name is None:
      return None
    return dict(self.rules).get(logical_name)

  def spec(self, logical_axes: LogicalAxes, shape: Sequence[int] | None = None,
           mesh: Mesh | None = None) -> PartitionSpec:
    """PartitionSpec for a tensor with the given logical axes.

    With `shape` and `mesh` given, a mesh axis that does not divide its dimension is dropped
    (that dimension is replicated over it), e.g. 8 KV heads on a 16-way tensor axis.
    A mesh axis used by two dimensions of one tensor is an error in the rules.
    """
    used: set[str] = set()
    out = []
    for i, name in enumerate(logical_axes):
      axes = list(as_tuple(self.mesh_axes(name)))
      if shape is not None and mesh is not None:
        kept, size = [], 1
        for axis in axes:
          if shape[i] % (size * mesh.shape[axis]) == 0:
            kept.append(axis)
            size *= mesh.shape[axis]
        axes = kept
      for axis in axes:
        if axis in used:
          raise ValueError(
              f"logical axes {logical_axes} map mesh axis {axis!r} twice; fix the sharding "
              "rules so each mesh axis shards at most one dimension of a tensor.")
        used.add(axis)
      out.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
    return PartitionSpec(*out)

  def sharding(self, mesh: Mesh, logical_axes: LogicalAxes,
               shape: Sequence[int] | None = None) -> NamedSharding:
    return NamedSharding(mesh, self.spec(logical_axes, shape, mesh))


def as_tuple(axes: MeshAxes) -> tuple[str, ...]:
  if axes is None:
    return ()
  return (axes,) if isinstance(axes, str) else tuple(axes)


def variable_logical_axes(variable: nnx.Variable) -> LogicalAxes:
  """The `logical_axes` metadata of an NNX variable; replicated (all None) when absent."""
  axes = variable.get_metadata().get("logical_axes")
  ndim = len(getattr(variable, "value", variable).shape)
  if axes is None:
    return (None,) * ndim
  if len(axes) != ndim:
    raise ValueError(f"variable of rank {ndim} carries logical axes {axes} of another rank.")
  return tuple(axes)


def state_shardings(state: Any, mesh: Mesh, rules: ShardingRules | None = None) -> Any:
  """A pytree of NamedShardings matching an NNX state (concrete or abstract).

  Works on the state of `nnx.eval_shape(...)`, so shardings are known before any weight exists.
  """
  rules = rules or ShardingRules()

  def one(variable):
    if isinstance(variable, nnx.Variable):
      value = variable.value
      return variable.replace(
          rules.sharding(mesh, variable_logical_axes(variable), value.shape))
    return NamedSharding(mesh, PartitionSpec())

  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_activation(x: jax.Array, logical_axes: LogicalAxes, mesh: Mesh | None,
                     rules: ShardingRules | None = None) -> jax.Array:
  """`with_sharding_constraint` by logical axes inside jit; identity when `mesh` is None."""
  if mesh is None:
    return x
  rules = rules or ShardingRules()
  return jax.lax.with_sharding_constraint(x, rules.sharding(mesh, logical_axes, x.shape))
