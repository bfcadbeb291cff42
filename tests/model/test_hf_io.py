"""HF checkpoint import/export: transformers reloads what we save with identical logits."""
import json
import os
import shutil

import jax
import numpy as np
import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from rpt_jax import errors
from rpt_jax import mesh as mesh_lib
from rpt_jax.model import hf_io


def _logits(model, tokens):
  with torch.no_grad():
    return model(torch.as_tensor(tokens)).logits.float().numpy()


TOKENS = np.random.RandomState(0).randint(3, 320, (2, 10))


@pytest.mark.parametrize("name", ["qwen2", "llama3", "qwen3", "mistral"])
def test_save_hf_reloads_in_transformers_with_same_logits(name, hf_models, tmp_path):
  hf_model, path = hf_models[name]
  model, cfg = hf_io.load_hf(path)
  hf_io.save_hf(model, cfg, tmp_path)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
  np.testing.assert_allclose(_logits(reloaded, TOKENS), _logits(hf_model, TOKENS), atol=1e-5)
  with safe_open(tmp_path / "model.safetensors", framework="numpy") as f:
    keys = set(f.keys())
  assert ("lm_head.weight" in keys) == (not cfg.tie_word_embeddings)
  assert keys == {n for n, _ in hf_model.named_parameters()}


def test_multi_file_checkpoint_with_index_round_trips(hf_models, tmp_path):
  hf_model, path = hf_models["qwen2_tied"]
  model, cfg = hf_io.load_hf(path)
  hf_io.save_hf(model, cfg, tmp_path, max_shard_bytes=60_000)
  files = sorted(p for p in os.listdir(tmp_path) if p.endswith(".safetensors"))
  index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
  assert len(files) > 3 and set(index["weight_map"].values()) == set(files)
  assert all(os.path.getsize(tmp_path / f) < 60_000 + 4096 or
             len(load_file(tmp_path / f)) == 1 for f in files)  # Only lone big tensors exceed.
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
  np.testing.assert_allclose(_logits(reloaded, TOKENS), _logits(hf_model, TOKENS), atol=1e-5)
  again, _ = hf_io.load_hf(tmp_path)
  np.testing.assert_array_equal(np.asarray(again(TOKENS)), np.asarray(model(TOKENS)))
  mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(data=1, fsdp=4, tensor=2))
  sharded, _ = hf_io.load_hf(tmp_path, mesh=mesh)  # Each device reads only its slice.
  o = sharded.layers[1].attn.o.value  # [N=8, H=8, D=64]: heads over tensor, embed over fsdp.
  assert o.sharding.spec == jax.sharding.PartitionSpec("tensor", None, "fsdp")
  np.testing.assert_array_equal(np.asarray(o), np.asarray(model.layers[1].attn.o.value))


def test_bf16_save_and_load(hf_models, tmp_path):
  hf_model, path = hf_models["qwen3"]
  model, cfg = hf_io.load_hf(path)
  hf_io.save_hf(model, cfg, tmp_path, dtype="bfloat16")
  assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
  want = hf_model.model.layers[1].self_attn.k_proj.weight.detach().to(torch.bfloat16)
  assert torch.equal(reloaded.model.layers[1].self_attn.k_proj.weight, want)
  fp32, _ = hf_io.load_hf(tmp_path)  # bf16 file read into fp32 parameters.
  k = np.asarray(fp32.layers[1].attn.k.value)  # [D, KVH, Dh]
  np.testing.assert_array_equal(k.reshape(64, -1).T, want.float().numpy())
  bf16, cfg16 = hf_io.load_hf(tmp_path, dtype="bfloat16")
  assert cfg16.param_dtype == "bfloat16" and bf16.embed.value.dtype.name == "bfloat16"


def _copy(src, dst):
  shutil.copytree(src, dst)
  return dst


def test_load_errors_name_the_problem(hf_models, tmp_path):
  src = hf_models["qwen2"][1]
  with pytest.raises(FileNotFoundError, match="does not exist"):
    hf_io.load_hf(tmp_path / "nope")
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="no config.json"):
    hf_io.load_hf(tmp_path / "empty")

  no_weights = _copy(src, tmp_path / "no_weights")
  os.remove(no_weights / "model.safetensors")
  (no_weights / "pytorch_model.bin").write_bytes(b"")
  with pytest.raises(FileNotFoundError, match=r"no \*.safetensors.*pytorch_model.bin.*convert"):
    hf_io.load_hf(no_weights)

  missing = _copy(src, tmp_path / "missing")
  tensors = load_file(missing / "model.safetensors")
  del tensors["model.layers.1.mlp.up_proj.weight"]
  save_file(tensors, missing / "model.safetensors")
  with pytest.raises(ValueError, match=r"lack tensor.*model\.layers\.1\.mlp\.up_proj\.weight"):
    hf_io.load_hf(missing)

  shape = _copy(src, tmp_path / "shape")
  config = json.loads((shape / "config.json").read_text())
  config["intermediate_size"] = 96
  (shape / "config.json").write_text(json.dumps(config))
  with pytest.raises(ValueError, match=r"has shape \(128, 64\) but config.json implies "
                                       r"\(96, 64\)"):
    hf_io.load_hf(shape)

  # A download cut short: the header no longer covers the file; the file is named.
  truncated = _copy(src, tmp_path / "truncated")
  data = (truncated / "model.safetensors").read_bytes()
  (truncated / "model.safetensors").write_bytes(data[:len(data) // 2])
  with pytest.raises(errors.InputError, match=r"weight file .*truncated/model.safetensors' is "
                                              r"not a readable safetensors file"):
    hf_io.load_hf(truncated)

  integer = _copy(src, tmp_path / "integer")
  tensors = load_file(integer / "model.safetensors")
  tensors["model.norm.weight"] = tensors["model.norm.weight"].astype(np.int32)
  save_file(tensors, integer / "model.safetensors")
  with pytest.raises(errors.InputError, match=r"tensor 'model.norm.weight' is I32, not a float"):
    hf_io.load_hf(integer)

  family = _copy(src, tmp_path / "family")
  config = json.loads((family / "config.json").read_text())
  config["model_type"] = "gemma"
  (family / "config.json").write_text(json.dumps(config))
  with pytest.raises(errors.InputError,
                     match=r"model_type 'gemma' in '.*family/config.json' is not supported"):
    hf_io.load_hf(family)

  index = _copy(src, tmp_path / "index")
  (index / "model.safetensors.index.json").write_text(json.dumps(
      {"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}))
  with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
    hf_io.load_hf(index)


def test_unused_checkpoint_tensors_are_reported(hf_models, tmp_path, caplog):
  extra = _copy(hf_models["qwen2"][1], tmp_path / "extra")
  tensors = load_file(extra / "model.safetensors")
  tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(8, np.float32)  # Ignored.
  tensors["model.vision_tower.weight"] = np.ones(3, np.float32)
  save_file(tensors, extra / "model.safetensors")
  hf_io.load_hf(extra)
  assert "model.vision_tower.weight" in caplog.text and "inv_freq" not in caplog.text
