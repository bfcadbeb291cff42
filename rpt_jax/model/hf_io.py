"""Hugging Face checkpoint import/export for the policy `Transformer` (safetensors only).

`load_hf` builds the model abstractly (`nnx.eval_shape`), computes each parameter's target
sharding from its logical axes, then reads the checkpoint tensor by tensor and shard by shard
(`safe_open(...).get_slice`), placing every piece straight on its devices with
`jax.make_array_from_callback`. A process reads only the slices its devices hold, and a tensor's
file is mapped only while that tensor loads, so host memory stays near one copy of the weights.
`save_hf` writes config.json plus (sharded) safetensors with an index, in HF's [out, in] layout,
which `transformers.AutoModelForCausalLM.from_pretrained` loads.

Every weight file is checked as it is opened (a safetensors header that parses and covers the
file), and every tensor against the config (present, a floating dtype, the implied shape); a
failed check is an `rpt_jax.errors.InputError` naming the file (and tensor) and the fix.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import os
from typing import Any, Iterator

import jax
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy for safetensors)
import numpy as np
from flax import nnx
from jax.sharding import Mesh, SingleDeviceSharding
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from rpt_jax import mesh as mesh_lib
from rpt_jax.errors import InputError, MissingInputError
from rpt_jax.model.config import ModelConfig
from rpt_jax.model.transformer import Transformer

_INDEX = "model.safetensors.index.json"
# Tensors some checkpoints carry that we recompute or do not use.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")  # safetensors' names of what a weight may be


def _open(file: str):
  """`safe_open` of a weight file; a damaged or foreign file is an InputError naming it."""
  try:
    return safe_open(file, framework="numpy")
  except (SafetensorError, OSError) as e:
    raise InputError(f"weight file {file!r} is not a readable safetensors file ({e}): copy it "
                     "again from the original checkpoint (a download may have been cut "
                     "short).") from e


@dataclasses.dataclass(frozen=True)
class _Entry:
  """One parameter: its HF name, our variable, and how the two layouts relate.

  kind: 'copy' (same layout), 'T' (HF [out, in] -> ours [in, out]), 'heads_in' (HF [N*H, D] ->
  ours [D, N, H]), 'heads_bias' ([N*H] -> [N, H]), 'heads_out' (HF [D, N*H] -> ours [N, H, D]).
  """

  hf_name: str
  variable: nnx.Variable
  kind: str


def _entries(model: Transformer) -> Iterator[_Entry]:
  cfg = model.config
  yield _Entry("model.embed_tokens.weight", model.embed, "copy")
  for i, block in enumerate(model.layers):
    p, a = f"model.layers.{i}.", block.attn
    yield _Entry(p + "input_layernorm.weight", block.input_norm.scale, "copy")
    yield _Entry(p + "post_attention_layernorm.weight", block.post_attn_norm.scale, "copy")
    for name in ("q", "k", "v"):
      yield _Entry(p + f"self_attn.{name}_proj.weight", getattr(a, name), "heads_in")
      if cfg.attention_bias:
        yield _Entry(p + f"self_attn.{name}_proj.bias", getattr(a, f"{name}_bias"), "heads_bias")
    yield _Entry(p + "self_attn.o_proj.weight", a.o, "heads_out")
    if cfg.o_bias:
      yield _Entry(p + "self_attn.o_proj.bias", a.o_bias, "copy")
    if cfg.qk_norm:
      yield _Entry(p + "self_attn.q_norm.weight", a.q_norm.scale, "copy")
      yield _Entry(p + "self_attn.k_norm.weight", a.k_norm.scale, "copy")
    for name in ("gate", "up", "down"):
      yield _Entry(p + f"mlp.{name}_proj.weight", getattr(block.mlp, name), "T")
  yield _Entry("model.norm.weight", model.final_norm.scale, "copy")
  if not cfg.tie_word_embeddings:
    yield _Entry("lm_head.weight", model.lm_head, "T")


def _hf_shape(kind: str, shape: tuple[int, ...]) -> tuple[int, ...]:
  if kind == "T":
    return shape[::-1]
  if kind == "heads_in":
    return (shape[1] * shape[2], shape[0])
  if kind == "heads_bias":
    return (shape[0] * shape[1],)
  if kind == "heads_out":
    return (shape[2], shape[0] * shape[1])
  return shape


def _read_shard(hf_slice, kind: str, shape: tuple[int, ...], index: tuple[slice, ...]
                ) -> np.ndarray:
  """Reads the part of an HF tensor that lands in `index` of our layout, in our layout."""
  idx = [range(n)[s] for s, n in zip(index, shape)]  # Normalised, step-1 ranges.
  sl = [slice(r.start, r.stop) for r in idx]
  if kind == "copy":
    return hf_slice[tuple(sl)]
  if kind == "T":
    return hf_slice[sl[1], sl[0]].T
  if kind == "heads_bias":
    h = shape[1]
    rows = hf_slice[idx[0].start * h:idx[0].stop * h]
    return rows.reshape(len(idx[0]), h)[:, sl[1]]
  if kind == "heads_in":  # ours (D, N, H); read whole heads N, then pick H.
    h = shape[2]
    part = hf_slice[idx[1].start * h:idx[1].stop * h, sl[0]]
    return part.T.reshape(len(idx[0]), len(idx[1]), h)[:, :, sl[2]]
  if kind == "heads_out":  # ours (N, H, D).
    h = shape[1]
    part = hf_slice[sl[2], idx[0].start * h:idx[0].stop * h]
    return part.T.reshape(len(idx[0]), h, len(idx[2]))[:, sl[1], :]
  raise ValueError(f"unknown layout kind {kind!r}")


def _to_hf(kind: str, x: np.ndarray) -> np.ndarray:
  if kind == "T":
    return x.T
  if kind == "heads_in":
    return x.reshape(x.shape[0], -1).T
  if kind == "heads_bias":
    return x.reshape(-1)
  if kind == "heads_out":
    return x.reshape(-1, x.shape[2]).T
  return x


def _weight_map(path: str) -> dict[str, str]:
  """HF tensor name -> safetensors file, from the index or by scanning the files."""
  index_file = os.path.join(path, _INDEX)
  if os.path.isfile(index_file):
    with open(index_file) as f:
      try:
        weight_map = json.load(f)["weight_map"]
      except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise InputError(f"weight index {index_file!r} is not a safetensors index (no "
                         f"'weight_map': {e}): copy it again from the original checkpoint.") from e
    missing = sorted({f for f in weight_map.values() if not os.path.isfile(os.path.join(path, f))})
    if missing:
      raise MissingInputError(f"weight index {index_file!r} lists files that are not in "
                              f"{path!r} ({missing}): copy the complete checkpoint.")
    return {name: os.path.join(path, f) for name, f in weight_map.items()}
  files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
  if not files:
    other = [f for f in os.listdir(path) if f.endswith((".bin", ".pt", ".pth", ".ckpt"))]
    hint = (f" Found {other}: convert them to safetensors first (pickle files are never loaded)."
            if other else "")
    raise MissingInputError(f"model folder {path!r} (model.hf_path) holds no *.safetensors "
                            f"weights: copy the checkpoint's weights there.{hint}")
  weight_map = {}
  for file in files:
    with _open(file) as f:
      weight_map.update({name: file for name in f.keys()})
  return weight_map


def load_hf(path: str | os.PathLike, *, mesh: Mesh | None = None,
            rules: mesh_lib.ShardingRules | None = None, dtype: str | None = None,
            **config_overrides: Any) -> tuple[Transformer, ModelConfig]:
  """Loads an HF model directory (config.json + *.safetensors) into a sharded Transformer.

  mesh/rules: where parameters go (None: the first device, no activation constraints).
  dtype: parameter dtype ('float32' | 'bfloat16'); None keeps the config's (float32).
  config_overrides: other ModelConfig fields to set (compute_dtype, remat, ...).
  """
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise MissingInputError(f"model folder {path!r} (model.hf_path) does not exist: point it at "
                            "a Hugging Face checkpoint folder (config.json + *.safetensors).")
  if dtype is not None:
    config_overrides["param_dtype"] = dtype
  config = ModelConfig.from_hf(path, **config_overrides)
  weight_map = _weight_map(path)
  rules = rules or mesh_lib.ShardingRules()
  model = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0), mesh=mesh, rules=rules))
  entries = list(_entries(model))
  missing = [e.hf_name for e in entries if e.hf_name not in weight_map]
  if missing:
    raise InputError(f"weights in {path!r} lack tensor(s) {missing[:5]}"
                     f"{' ...' if len(missing) > 5 else ''} that a {config.family} model with "
                     "its config.json needs: use the config.json that came with the weights.")
  unused = sorted(set(weight_map) - {e.hf_name for e in entries} - {"lm_head.weight"})
  unused = [n for n in unused if not n.endswith(_IGNORED_SUFFIXES)]
  if unused:
    logging.warning("load_hf: %d checkpoint tensor(s) not used by the %s model, e.g. %s",
                    len(unused), config.family, unused[:3])
  # Largest first: the transient copy of a big tensor then lands while little else is resident.
  entries.sort(key=lambda e: -np.prod(e.variable.value.shape))
  for entry in entries:
    shape = tuple(entry.variable.value.shape)
    target = _np_dtype(config.param_dtype)
    # The same rule state_shardings applies: logical axes -> mesh axes that divide the shape.
    sharding = (rules.sharding(mesh, mesh_lib.variable_logical_axes(entry.variable), shape)
                if mesh is not None else SingleDeviceSharding(jax.devices()[0]))
    # Opened per tensor so its mapped pages are released before the next one.
    file = weight_map[entry.hf_name]
    with _open(file) as f:
      hf_slice = f.get_slice(entry.hf_name)
      hf_shape, want = tuple(hf_slice.get_shape()), _hf_shape(entry.kind, shape)
      if hf_shape != want:
        raise InputError(f"weight file {file!r}: tensor {entry.hf_name!r} has shape {hf_shape} "
                         f"but config.json implies {want}: use the config.json that came with "
                         "the weights.")
      if hf_slice.get_dtype() not in _FLOAT_DTYPES:
        raise InputError(f"weight file {file!r}: tensor {entry.hf_name!r} is "
                         f"{hf_slice.get_dtype()}, not a float ({'/'.join(_FLOAT_DTYPES)}): "
                         "quantised or foreign weights cannot be loaded; use the float "
                         "checkpoint.")

      def read(index, hf_slice=hf_slice, kind=entry.kind, shape=shape):
        index = (slice(None),) * len(shape) if index is None else index
        return np.ascontiguousarray(_read_shard(hf_slice, kind, shape, index), dtype=target)

      entry.variable.value = jax.make_array_from_callback(shape, sharding, read)
  return model, config


def _np_dtype(name: str) -> np.dtype:
  return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def _to_host(x: jax.Array) -> np.ndarray:
  if x.is_fully_addressable:
    return np.asarray(x)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def save_hf(model: Transformer, model_config: ModelConfig, path: str | os.PathLike, *,
            dtype: str | None = None, max_shard_bytes: int = 5 * 10**9) -> None:
  """Writes config.json + safetensors (split into files of <= max_shard_bytes, with an index).

  dtype: 'float32' | 'bfloat16' for the written tensors (default: the parameters' dtype).
  Tied embeddings write no lm_head. Every process must call it; process 0 writes.
  """
  path = os.fspath(path)
  dtype = dtype or model_config.param_dtype
  target = _np_dtype(dtype)
  entries = list(_entries(model))
  sizes = [int(np.prod(e.variable.value.shape)) * target.itemsize for e in entries]
  groups: list[list[int]] = [[]]
  used = 0
  for i, size in enumerate(sizes):
    if groups[-1] and used + size > max_shard_bytes:
      groups.append([])
      used = 0
    groups[-1].append(i)
    used += size
  write = jax.process_index() == 0
  if write:
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
      json.dump(model_config.to_hf_dict(dtype=dtype), f, indent=2)
  weight_map = {}
  for n, group in enumerate(groups):
    name = ("model.safetensors" if len(groups) == 1
            else f"model-{n + 1:05d}-of-{len(groups):05d}.safetensors")
    tensors = {}
    for i in group:  # One file's tensors on the host at a time.
      e = entries[i]
      tensors[e.hf_name] = np.ascontiguousarray(
          _to_hf(e.kind, _to_host(e.variable.value)), dtype=target)
      weight_map[e.hf_name] = name
    if write:
      save_file(tensors, os.path.join(path, name), metadata={"format": "pt"})
    del tensors
  if write and len(groups) > 1:
    with open(os.path.join(path, _INDEX), "w") as f:
      json.dump({"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}, f, indent=2)
