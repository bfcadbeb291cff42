"""The policy as a Hugging Face folder that `transformers` loads whole (weights and tokenizer).

`export_hf(model, model_config, tokenizer, path)` writes:

    config.json, model*.safetensors (+ index)   `rpt_jax.model.hf_io.save_hf`
    an HF tokenizer's files                     every tokenizer file of the folder it came from
                                                (TOKENIZER_FILES: tokenizer.json,
                                                tokenizer_config.json, special tokens, chat
                                                template, vocab/merges); a tokenizer_config.json
                                                is written when the folder had none
    a SentencePiece model                       tokenizer.model + a tokenizer_config.json
                                                (LlamaTokenizer, no BOS/EOS added, no dummy
                                                prefix: the ids rpt_jax's tokenizer gives) + a
                                                chat template equal to FALLBACK_CHAT_TEMPLATE
    generation_config.json                      the tokenizer folder's, else one with the
                                                tokenizer's bos/eos/pad and stop ids

so that `AutoTokenizer.from_pretrained(path)` gives the ids rpt_jax trained on and
`AutoModelForCausalLM.from_pretrained(path)` the same logits. (One exception: transformers >= 5
builds its own Qwen2Tokenizer for every qwen2 config.json, ignoring tokenizer_config.json, so a
scratch qwen2 policy with a SentencePiece tokenizer is read with
`transformers.LlamaTokenizer.from_pretrained(path)`, the class tokenizer_config.json names.)
"""

from __future__ import annotations

import json
import os
import shutil

import jax

from rpt_jax import tokenizer as tokenizer_lib
from rpt_jax.model import hf_io
from rpt_jax.model.config import ModelConfig
from rpt_jax.model.transformer import Transformer

# The files of an HF tokenizer folder (transformers 4 and 5 spellings).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja", "chat_template.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "generation_config.json")
# FALLBACK_CHAT_TEMPLATE as a jinja chat template (what rpt_jax prompts a SentencePiece policy
# with): each user turn, then the opened assistant turn.
FALLBACK_JINJA = (
    "{% for message in messages %}{% if message['role'] == 'user' %}"
    + tokenizer_lib.USER_MARKER + "\n{{ message['content'] }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}" + tokenizer_lib.ASSISTANT_MARKER + "\n"
    + tokenizer_lib.THINK_OPEN + "{% endif %}")


def export_hf(model: Transformer, model_config: ModelConfig,
              tokenizer: tokenizer_lib.Tokenizer, path: str, *,
              dtype: str | None = None) -> list[str]:
  """Writes the weights, the tokenizer and generation_config.json to `path`.

  Every process must call it (the weights are gathered); process 0 writes. Returns the names
  of the files in `path` (on process 0; [] elsewhere).
  """
  hf_io.save_hf(model, model_config, path, dtype=dtype)
  if jax.process_index() != 0:
    return []
  if isinstance(tokenizer, tokenizer_lib.SentencePieceTokenizer):
    _write_sentencepiece(tokenizer, path)
  else:
    _copy_hf_tokenizer(tokenizer, path)
  if not os.path.exists(os.path.join(path, "generation_config.json")):
    _write_json(os.path.join(path, "generation_config.json"), generation_config(tokenizer))
  return sorted(os.listdir(path))


def _copy_hf_tokenizer(tokenizer: tokenizer_lib.Tokenizer, path: str) -> None:
  """Every tokenizer file of the folder `tokenizer` was loaded from."""
  folder = os.path.dirname(os.path.abspath(tokenizer.name))
  if os.path.abspath(folder) == os.path.abspath(path):
    return  # Exported over its own source folder: the files are there.
  for name in TOKENIZER_FILES:
    source = os.path.join(folder, name)
    if os.path.isfile(source):
      shutil.copy2(source, os.path.join(path, name))
  if os.path.basename(tokenizer.name) != "tokenizer.json":  # Given as a file of another name.
    shutil.copy2(tokenizer.name, os.path.join(path, "tokenizer.json"))
  if not os.path.exists(os.path.join(path, "tokenizer_config.json")):
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **tokenizer.special_tokens}
    if tokenizer.chat_template is not None:
      config["chat_template"] = tokenizer.chat_template
    _write_json(os.path.join(path, "tokenizer_config.json"), config)


def _write_sentencepiece(tokenizer: tokenizer_lib.SentencePieceTokenizer, path: str) -> None:
  shutil.copy2(tokenizer.name, os.path.join(path, "tokenizer.model"))
  piece = tokenizer.id_to_piece
  config = {
      "tokenizer_class": "LlamaTokenizer",
      # rpt_jax encodes without BOS/EOS and without a dummy-prefix space (train_sentencepiece).
      "add_bos_token": False, "add_eos_token": False, "add_prefix_space": False,
      "legacy": False, "clean_up_tokenization_spaces": False,
      "eos_token": piece(tokenizer.eos_id), "pad_token": piece(tokenizer.pad_id),
      "chat_template": FALLBACK_JINJA,
  }
  if tokenizer.bos_id is not None:
    config["bos_token"] = piece(tokenizer.bos_id)
  if tokenizer.unk_id is not None:
    config["unk_token"] = piece(tokenizer.unk_id)
  _write_json(os.path.join(path, "tokenizer_config.json"), config)


def generation_config(tokenizer: tokenizer_lib.Tokenizer) -> dict:
  """generation_config.json from the tokenizer: generation stops at any of its stop ids."""
  stop = list(tokenizer.stop_ids)
  config = {"eos_token_id": stop[0] if len(stop) == 1 else stop,
            "pad_token_id": tokenizer.pad_id}
  if tokenizer.bos_id is not None:
    config["bos_token_id"] = tokenizer.bos_id
  return config


def _write_json(path: str, value: dict) -> None:
  with open(path, "w", encoding="utf-8") as f:
    json.dump(value, f, indent=2, ensure_ascii=False)
