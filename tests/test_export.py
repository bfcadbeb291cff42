"""HF export (rpt_jax.export): `transformers` loads the exported folder whole.

References: the source checkpoint's own `transformers` tokenizer and PyTorch model (HF tokenizer
case), and rpt_jax's SentencePiece tokenizer (its ids are what the policy was trained on).
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import tiny_hf
from rpt_jax import export
from rpt_jax import tokenizer as tokenizer_lib
from rpt_jax.model import hf_io
from rpt_jax.model.config import ModelConfig
from rpt_jax.model.transformer import init_model

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TEXTS = (tiny_hf.TEXT, "It's  12,345 apples\n\n  and <|im_end|> tail", "é ü 中文 \\boxed{7}")


def _hf_logits(path: str, tokens_BT: np.ndarray) -> np.ndarray:
  model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
  model.eval()
  with torch.no_grad():
    return model(torch.from_numpy(tokens_BT)).logits.numpy()


def test_export_of_an_hf_checkpoint_loads_whole(tmp_path):
  source = tiny_hf.write_checkpoint(str(tmp_path / "source"))
  tokenizer = tokenizer_lib.load_tokenizer(source)
  model, model_config = hf_io.load_hf(source)
  out = str(tmp_path / "export")
  names = export.export_hf(model, model_config, tokenizer, out)

  for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
               "chat_template.jinja", "generation_config.json"):
    assert name in names, name
  with open(os.path.join(source, "generation_config.json")) as f:
    want_generation = json.load(f)
  with open(os.path.join(out, "generation_config.json")) as f:
    assert json.load(f) == want_generation  # both stop ids and the sampling settings travel

  theirs = transformers.AutoTokenizer.from_pretrained(source)
  exported = transformers.AutoTokenizer.from_pretrained(out)
  for text in TEXTS:
    ids = theirs(text)["input_ids"]
    assert exported(text)["input_ids"] == ids == tokenizer.encode(text), text
  messages = [{"role": "user", "content": "What comes next?"}]
  assert (exported.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
          == theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))

  tokens = np.asarray([exported(TEXTS[0])["input_ids"][:24],
                       exported(TEXTS[2])["input_ids"][:8] * 3], np.int64)
  want = _hf_logits(source, tokens)
  np.testing.assert_allclose(_hf_logits(out, tokens), want, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(model(tokens)), want, atol=1e-4, rtol=1e-4)


def test_export_with_a_sentencepiece_tokenizer_loads_whole(tmp_path):
  sp = tokenizer_lib.train_sentencepiece([tiny_hf.TEXT * 3] * 20 + list(TEXTS), 420,
                                         str(tmp_path / "tok" / "spm.model"))
  config = ModelConfig(family="qwen2", vocab_size=sp.vocab_size, hidden_size=32,
                       intermediate_size=64, num_layers=2, num_heads=2, num_kv_heads=1,
                       head_dim=16, max_position_embeddings=128, tie_word_embeddings=True,
                       attention_bias=True, eos_token_ids=tuple(sp.stop_ids),
                       pad_token_id=sp.pad_id, bos_token_id=sp.bos_id)
  model = init_model(config, seed=3)
  out = str(tmp_path / "export")
  names = export.export_hf(model, config, sp, out)
  assert {"tokenizer.model", "tokenizer_config.json", "generation_config.json"} <= set(names)
  with open(os.path.join(out, "generation_config.json")) as f:
    generation = json.load(f)
  assert generation["eos_token_id"] == list(sp.stop_ids) and generation["pad_token_id"] == 0

  # The class tokenizer_config.json names. (transformers >= 5 ignores it for a qwen2 config.json
  # in AutoTokenizer: it builds Qwen2Tokenizer, a byte-level BPE, for every qwen2 checkpoint.)
  with open(os.path.join(out, "tokenizer_config.json")) as f:
    tokenizer_class = getattr(transformers, json.load(f)["tokenizer_class"])
  exported = tokenizer_class.from_pretrained(out)
  for text in TEXTS + ("x<|user|>\ny </think>",):
    assert exported(text)["input_ids"] == sp.encode(text), text
  prompt = exported.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                        add_generation_prompt=True)
  assert prompt == sp.apply_chat_template("Hi")

  ids = sp.encode(TEXTS[0] + TEXTS[2])
  tokens = np.asarray([ids[:16], ids[-16:]], np.int64)
  np.testing.assert_allclose(_hf_logits(out, tokens), np.asarray(model(tokens)),
                             atol=1e-4, rtol=1e-4)
