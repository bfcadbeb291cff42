"""Tiny random Hugging Face models (one per family/variant), written once per session."""
import numpy as np
import pytest
import torch
import transformers

# name -> (HF class, config kwargs). Covers every family, GQA ratios 4/4, 4/2, 8/2, 4/1, tied and
# untied embeddings, biases on q/k/v (qwen2) and on all four projections (llama), qk-norm with an
# explicit head_dim != hidden/heads (qwen3), and llama3 rope scaling.
VARIANTS = {
    "qwen2": ("Qwen2", dict(num_attention_heads=4, num_key_value_heads=2,
                            tie_word_embeddings=False)),
    "qwen2_tied": ("Qwen2", dict(num_attention_heads=8, num_key_value_heads=2, head_dim=8,
                                 tie_word_embeddings=True, rope_theta=1000.0)),
    "llama3": ("Llama", dict(num_attention_heads=4, num_key_value_heads=4, attention_bias=True,
                             tie_word_embeddings=True, rope_theta=500000.0,
                             rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                               high_freq_factor=4.0,
                                               original_max_position_embeddings=64))),
    "qwen3": ("Qwen3", dict(num_attention_heads=8, num_key_value_heads=2, head_dim=16,
                            tie_word_embeddings=False)),
    "mistral": ("Mistral", dict(num_attention_heads=4, num_key_value_heads=1, sliding_window=64,
                                tie_word_embeddings=False)),
}


def build_hf_model(name: str, seed: int = 0, **overrides):
  """A random tiny HF causal LM whose logits are O(1) (norm scales and biases randomised too)."""
  arch, kwargs = VARIANTS[name]
  kwargs = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                max_position_embeddings=256, rms_norm_eps=1e-6, initializer_range=0.08,
                bos_token_id=1, eos_token_id=2, pad_token_id=0, **kwargs)
  kwargs.update(overrides)
  config = getattr(transformers, f"{arch}Config")(**kwargs)
  torch.manual_seed(seed)
  model = getattr(transformers, f"{arch}ForCausalLM")(config).eval()
  with torch.no_grad():
    for pname, p in model.named_parameters():
      if pname.endswith("bias"):
        p.normal_(0.0, 0.1)
      elif "norm" in pname:
        p.uniform_(0.5, 1.5)
      elif "embed" in pname or "lm_head" in pname:
        p.normal_(0.0, 0.5)
  return model


@pytest.fixture(scope="session")
def hf_models(tmp_path_factory):
  """name -> (torch model, directory written with save_pretrained)."""
  out = {}
  for name in VARIANTS:
    model = build_hf_model(name)
    path = tmp_path_factory.mktemp(name)
    model.save_pretrained(path)
    out[name] = (model, str(path))
  return out


@pytest.fixture(scope="session")
def make_hf():
  """The factory itself, for tests that need a variant with other settings."""
  return build_hf_model
