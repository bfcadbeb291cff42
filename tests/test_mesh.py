"""Mesh construction and logical-axis rules on 8 simulated CPU devices."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from rpt_jax import mesh as mesh_lib


def test_mesh_fill_axis_resolves_remaining_devices():
  assert mesh_lib.MeshConfig(data=2, fsdp=-1, tensor=2).shape(8) == (2, 2, 2)
  mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(data=1, fsdp=-1, tensor=4))
  assert dict(mesh.shape) == {"data": 1, "fsdp": 2, "tensor": 4}


@pytest.mark.parametrize("cfg,match", [
    (dict(data=3, fsdp=-1, tensor=1), "do not divide"),
    (dict(data=2, fsdp=2, tensor=1), "multiply to 4"),
    (dict(data=-1, fsdp=-1, tensor=1), "more than one -1"),
    (dict(data=0, fsdp=-1, tensor=1), "mesh.data=0"),
])
def test_mesh_bad_sizes_name_the_problem(cfg, match):
  with pytest.raises(ValueError, match=match):
    mesh_lib.MeshConfig(**cfg).shape(8)


def test_rules_map_logical_axes_and_drop_non_dividing_axes():
  mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(data=2, fsdp=2, tensor=2))
  rules = mesh_lib.ShardingRules()
  assert rules.spec(("embed", "mlp")) == P("fsdp", "tensor")
  assert rules.spec(("batch", "length", None)) == P(("data", "fsdp"), None, None)
  # One KV head cannot be split two ways: replicated instead.
  assert rules.spec(("embed", "kv_heads", "head_dim"), (8, 1, 4), mesh) == P("fsdp", None, None)
  with pytest.raises(ValueError, match="twice"):
    mesh_lib.ShardingRules((("embed", "tensor"), ("mlp", "tensor"))).spec(("embed", "mlp"))
  with pytest.raises(ValueError, match="mesh axis 'model'"):
    mesh_lib.ShardingRules((("embed", "model"),))


def test_state_shardings_follow_param_metadata_and_place_values():
  class Tiny(nnx.Module):
    def __init__(self, rngs):
      self.w = nnx.Param(jax.random.normal(rngs.params(), (8, 16)), logical_axes=("embed", "mlp"))
      self.b = nnx.Param(jnp.zeros((16,)))

  mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(data=2, fsdp=2, tensor=2))
  abstract = nnx.state(nnx.eval_shape(lambda: Tiny(nnx.Rngs(0))))
  shardings = mesh_lib.state_shardings(abstract, mesh)
  assert shardings["w"].value.spec == P("fsdp", "tensor")
  assert shardings["b"].value.spec == P(None)
  model = Tiny(nnx.Rngs(0))
  placed = jax.device_put(nnx.state(model), shardings)
  np.testing.assert_array_equal(np.asarray(placed["w"].value), np.asarray(model.w.value))
  assert placed["w"].value.sharding.spec == P("fsdp", "tensor")


def test_mesh_axes_are_auto_so_gspmd_propagates_shardings():
  mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(data=2, fsdp=2, tensor=2))
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
  sub = mesh_lib.make_mesh(mesh_lib.MeshConfig(data=1, fsdp=4, tensor=1), jax.devices()[:4])
  assert all(t == jax.sharding.AxisType.Auto for t in sub.axis_types)
