"""ModelConfig against Hugging Face configs: field mapping, round trip, counts, errors."""
import dataclasses

import pytest
import transformers

from rpt_jax.model.config import ModelConfig

VARIANTS = ["qwen2", "qwen2_tied", "llama3", "qwen3", "mistral"]  # tests/model/conftest.py


@pytest.mark.parametrize("name", VARIANTS)
def test_from_hf_reads_fields_and_counts_params_like_torch(name, hf_models):
  hf_model, path = hf_models[name]
  hf = hf_model.config
  cfg = ModelConfig.from_hf(path)
  assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads) == (
      hf.num_hidden_layers, hf.num_attention_heads, hf.num_key_value_heads)
  assert cfg.head_dim == getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
  assert cfg.tie_word_embeddings == hf.tie_word_embeddings
  assert cfg.eos_token_ids == (2,) and cfg.pad_token_id == 0
  assert cfg.num_params() == sum(p.numel() for p in hf_model.parameters())
  assert ModelConfig.from_hf(hf.to_dict()) == cfg  # transformers 5 `rope_parameters` spelling.


@pytest.mark.parametrize("name", VARIANTS)
def test_to_hf_dict_round_trips_and_builds_the_same_hf_model(name, hf_models):
  cfg = ModelConfig.from_hf(hf_models[name][1], param_dtype="bfloat16", remat="dots")
  hf_dict = cfg.to_hf_dict()
  assert ModelConfig.from_hf(hf_dict, param_dtype="bfloat16", remat="dots") == cfg
  assert hash(ModelConfig.from_hf(hf_dict, param_dtype="bfloat16", remat="dots")) == hash(cfg)
  hf_config = transformers.AutoConfig.for_model(**hf_dict)
  rebuilt = transformers.AutoModelForCausalLM.from_config(hf_config)
  assert type(rebuilt).__name__ == hf_dict["architectures"][0]
  assert sum(p.numel() for p in rebuilt.parameters()) == cfg.num_params()


def test_llama3_rope_scaling_is_kept():
  cfg = ModelConfig.from_hf(dict(
      model_type="llama", vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
      num_attention_heads=2, rope_theta=5e5, rope_scaling=dict(
          type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
          original_max_position_embeddings=8192)))
  assert cfg.rope_theta == 5e5 and cfg.rope_scaling["rope_type"] == "llama3"
  assert cfg.num_kv_heads == 2 and cfg.head_dim == 4


def test_flops_per_token_hand_worked():
  # D=4, F=8, N=2, KVH=1, Dh=2, 1 layer, V=10, seq 3. Multiply-adds per token: q 4*4, k 4*2,
  # v 4*2, o 4*4, MLP 3*4*8, lm_head 4*10 = 184; attention: scores 2*2*3 + values 2*2*3 = 24.
  cfg = ModelConfig("qwen2", vocab_size=10, hidden_size=4, intermediate_size=8, num_layers=1,
                    num_heads=2, num_kv_heads=1, head_dim=2, attention_bias=True)
  assert cfg.flops_per_token(3) == 2 * (184 + 24)


def _base(**kw):
  hf = dict(model_type="qwen2", vocab_size=8, hidden_size=8, intermediate_size=8,
            num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
            max_position_embeddings=64)
  hf.update(kw)
  return hf


@pytest.mark.parametrize("hf,match", [
    (_base(model_type="gpt2"), r"model_type 'gpt2' is not supported.*'qwen2', 'llama'"),
    (_base(hidden_act="gelu"), "hidden_act='gelu' is not supported"),
    (_base(num_attention_heads=3, num_key_value_heads=2), "num_heads=3 is not a multiple"),
    (_base(rope_scaling=dict(rope_type="yarn", factor=4.0)), "rope scaling type 'yarn'"),
    (_base(model_type="llama", mlp_bias=True), "mlp_bias"),
])
def test_bad_hf_configs_name_the_problem(hf, match):
  with pytest.raises(ValueError, match=match):
    ModelConfig.from_hf(hf)


def test_bad_run_options_and_missing_file(tmp_path):
  cfg = ModelConfig.from_hf(_base())
  with pytest.raises(ValueError, match="remat='some'"):
    dataclasses.replace(cfg, remat="some")
  with pytest.raises(ValueError, match="compute_dtype='float16'"):
    dataclasses.replace(cfg, compute_dtype="float16")
  assert dataclasses.replace(cfg, param_dtype="bf16").param_dtype == "bfloat16"
  with pytest.raises(FileNotFoundError, match="no config.json"):
    ModelConfig.from_hf(tmp_path)


def test_check_context_length():
  mistral = ModelConfig.from_hf(_base(model_type="mistral", sliding_window=32))
  mistral.check_context_length(32)
  with pytest.raises(ValueError, match="exceeds the model's sliding_window=32"):
    mistral.check_context_length(33)
  with pytest.raises(ValueError, match="exceeds max_position_embeddings=64"):
    mistral.check_context_length(65)
  # Qwen configs carry a window that only applies with use_sliding_window.
  assert ModelConfig.from_hf(_base(sliding_window=4)).sliding_window is None
  assert ModelConfig.from_hf(_base(sliding_window=4, use_sliding_window=True)).sliding_window == 4
