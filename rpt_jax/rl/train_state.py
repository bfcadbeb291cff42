"""The RPT train state: what it holds, where each piece lives on the mesh, and its bytes.

Owns `TrainState` (params, optimiser state, step), `split_params`, `train_state_shardings` (params
by their logical axes, the optimiser state like the parameters it mirrors, via
`rpt_jax.rl.optim.map_opt_state`), `abstract_train_state`, `create_train_state`, and
`bytes_per_device`: the same layout counted in bytes for a mesh that need not exist (the
ahead-of-time memory estimate of `rpt_jax.compile_check`).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from rpt_jax import mesh as mesh_lib
from rpt_jax.model.transformer import Transformer
from rpt_jax.rl import optim


@flax.struct.dataclass
class TrainState:
  """params: nnx.State of the model's nnx.Params; opt_state: the optax state; step: int32 [],
  the number of train steps ATTEMPTED (skipped non-finite steps included; the optimiser's own
  count, which drives the learning-rate schedule, only counts applied updates).
  teacher: an EMA copy of the params (RLP's no-thought baseline), or None.
  reference: the frozen KL reference params (rl.beta > 0), or None.
  Both are laid out like `params` and saved with the state, so a resume is exact."""

  params: nnx.State
  opt_state: Any
  step: jax.Array
  teacher: Any = None
  reference: Any = None

def split_params(model: Transformer) -> tuple[nnx.GraphDef, nnx.State]:
  """(graphdef, params) of a model whose only state is nnx.Params; raises otherwise."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  if jax.tree.leaves(rest):
    raise ValueError("the model holds non-Param state (e.g. batch statistics or RNG counters); "
                     "the RPT train step only updates nnx.Param variables.")
  return graphdef, params


def train_state_shardings(params: nnx.State, optimizer: optax.GradientTransformation,
                          mesh: Mesh, rules: mesh_lib.ShardingRules | None = None, *,
                          teacher: bool = False, reference: bool = False) -> TrainState:
  """A TrainState of NamedShardings: params (and the teacher/reference copies, when present) by
  their logical axes, the optimiser state like the parameters it mirrors, the step replicated.
  `params` may be abstract (nnx.eval_shape)."""
  param_sh = mesh_lib.state_shardings(params, mesh, rules)
  replicated = NamedSharding(mesh, P())
  return TrainState(params=param_sh,
                    opt_state=optim.map_opt_state(optimizer, params, lambda _, sh: sh, param_sh,
                                                  lambda _: replicated),
                    step=replicated, teacher=param_sh if teacher else None,
                    reference=param_sh if reference else None)


def shardings_like(state: TrainState, optimizer: optax.GradientTransformation, mesh: Mesh,
                   rules: mesh_lib.ShardingRules | None = None) -> TrainState:
  """`train_state_shardings` for the fields `state` holds."""
  return train_state_shardings(state.params, optimizer, mesh, rules,
                               teacher=state.teacher is not None,
                               reference=state.reference is not None)


def abstract_train_state(params: nnx.State, optimizer: optax.GradientTransformation,
                         mesh: Mesh | None = None,
                         rules: mesh_lib.ShardingRules | None = None) -> TrainState:
  """ShapeDtypeStructs (with shardings when `mesh` is given) of the TrainState, e.g. for
  `Checkpointer.restore`."""
  abstract = TrainState(params=jax.eval_shape(lambda p: p, params),
                        opt_state=jax.eval_shape(optimizer.init, params),
                        step=jax.ShapeDtypeStruct((), jnp.int32))
  if mesh is None:
    return abstract
  shardings = train_state_shardings(params, optimizer, mesh, rules)
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)


def create_train_state(model: Transformer, optimizer: optax.GradientTransformation,
                       mesh: Mesh | None = None,
                       rules: mesh_lib.ShardingRules | None = None, *, teacher: bool = False,
                       reference: Any = None) -> TrainState:
  """Params of `model` (placed by their logical axes with a mesh), a fresh optimiser state with
  matching shardings (initialised under jit with those out_shardings), step 0.
  teacher: also hold an EMA teacher, starting as a copy of the params.
  reference: also hold a frozen KL reference: True copies the params, an nnx.State (e.g. the
  weights of `rl.reference`) is placed like them.

  The state holds its OWN copies of the weights (the train step donates them; `model` keeps
  working). Use `split_params(model)[0]` as the graphdef for `make_train_step`.
  """
  _, params = split_params(model)
  copy = lambda tree: jax.tree.map(jnp.copy, tree)  # noqa: E731
  ref_source = params if reference is True else reference
  if mesh is None:
    place = jax.jit(copy)
    params = place(params)
    return TrainState(params=params, opt_state=optimizer.init(params),
                      step=jnp.zeros((), jnp.int32), teacher=place(params) if teacher else None,
                      reference=None if ref_source is None else place(ref_source))
  shardings = train_state_shardings(params, optimizer, mesh, rules)
  place = jax.jit(copy, out_shardings=shardings.params)
  params = place(params)
  opt_state = jax.jit(optimizer.init, out_shardings=shardings.opt_state)(params)
  step = jax.device_put(jnp.zeros((), jnp.int32), shardings.step)
  return TrainState(params=params, opt_state=opt_state, step=step,
                    teacher=place(params) if teacher else None,
                    reference=None if ref_source is None else place(ref_source))


class _MeshShape:
  """Stands in for a Mesh where only axis sizes matter (`ShardingRules.spec`)."""

  def __init__(self, shape: Mapping[str, int]):
    self.shape = dict(shape)


def shard_bytes(shape: Sequence[int], dtype: Any, spec: P, mesh_shape: Mapping[str, int]) -> int:
  """Bytes of one device's shard (ceil-divided dims, as XLA pads uneven shards)."""
  dims = list(shape)
  for i, entry in enumerate(spec):
    ways = math.prod(mesh_shape[a] for a in mesh_lib.as_tuple(entry))
    dims[i] = -(-dims[i] // ways)
  return math.prod(dims) * jnp.dtype(dtype).itemsize


def bytes_per_device(params: nnx.State, optimizer: optax.GradientTransformation,
                     mesh_shape: Mapping[str, int], rules: mesh_lib.ShardingRules,
                     compute_dtype: Any) -> dict[str, int]:
  """Per-device bytes of the train state laid out as `train_state_shardings` lays it out, on a
  mesh of `mesh_shape` axis sizes (no devices needed). `params` may be abstract.

  params: the master weights; grads: one gradient of the same layout; optimizer: the optimiser
  state (parameter-like leaves sharded like their parameter, the rest replicated);
  compute_params: the compute-dtype copy of the weights the sampler casts once per call.
  """
  fake = _MeshShape(mesh_shape)
  specs = jax.tree.map(
      lambda v: v.replace(rules.spec(mesh_lib.variable_logical_axes(v), v.value.shape, fake)),
      params, is_leaf=lambda x: isinstance(x, nnx.Variable))
  value = lambda x: x.value if isinstance(x, nnx.Variable) else x  # noqa: E731
  full = lambda x: math.prod(value(x).shape) * jnp.dtype(value(x).dtype).itemsize  # noqa: E731

  def total(tree) -> int:
    return sum(jax.tree.leaves(tree))

  def like_params(dtype=None):
    return lambda leaf, spec: shard_bytes(value(leaf).shape, dtype or value(leaf).dtype,
                                          value(spec), mesh_shape)

  params_bytes = total(jax.tree.map(lambda p, s: like_params()(p, s), params, specs,
                                    is_leaf=lambda x: isinstance(x, nnx.Variable)))
  compute = total(jax.tree.map(lambda p, s: like_params(compute_dtype)(p, s), params, specs,
                               is_leaf=lambda x: isinstance(x, nnx.Variable)))
  opt = total(optim.map_opt_state(optimizer, params, like_params(), specs, full))
  return {"params": params_bytes, "grads": params_bytes, "optimizer": opt,
          "compute_params": compute}
