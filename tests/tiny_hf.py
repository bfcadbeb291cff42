"""A tiny Hugging Face checkpoint folder made in a test, no network: a byte-level BPE tokenizer
trained with `tokenizers` (saved by transformers with its tokenizer_config.json, special tokens,
chat template and generation_config.json) beside a random Qwen2 model written with
`save_pretrained` (config.json + model.safetensors)."""

from __future__ import annotations

import os

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"
                 r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEXT = ("The quick brown fox jumps over the lazy dog. 12 + 30 = 42. "
        "Reinforcement pre-training rewards the next token; \\boxed{x} </think> é ü 中文\n")


def write_tokenizer(path: str, vocab_size: int = 400) -> None:
  """A byte-level BPE tokenizer folder (tokenizer.json, tokenizer_config.json, ...)."""
  import tokenizers  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  # Qwen2's: transformers loads a qwen2 checkpoint's tokenizer as Qwen2Tokenizer, which rebuilds
  # this pre-tokenizer from the vocabulary and merges.
  tok.normalizer = tokenizers.normalizers.NFC()
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Sequence([
      tokenizers.pre_tokenizers.Split(tokenizers.Regex(QWEN2_PATTERN), behavior="isolated"),
      tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tok.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=SPECIALS,
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator([TEXT] * 50, trainer=trainer)
  fast = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
      unk_token=None)
  fast.chat_template = CHAT_TEMPLATE
  fast.save_pretrained(path)


def write_generation_config(path: str) -> None:
  """generation_config.json: two stop ids and sampling settings (what a chat model ships)."""
  import transformers  # pylint: disable=g-import-not-at-top

  fast = transformers.AutoTokenizer.from_pretrained(path)
  transformers.GenerationConfig(
      eos_token_id=[fast.convert_tokens_to_ids("<|im_end|>"),
                    fast.convert_tokens_to_ids("<|endoftext|>")],
      pad_token_id=fast.pad_token_id, temperature=0.7, do_sample=True).save_pretrained(path)


def write_model(path: str, vocab_size: int, seed: int = 0) -> None:
  """A random 2-layer Qwen2 (config.json + model.safetensors) with `vocab_size` rows."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  torch.manual_seed(seed)
  config = transformers.Qwen2Config(
      vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=256,
      tie_word_embeddings=True, rope_theta=10000.0)
  model = transformers.Qwen2ForCausalLM(config)
  model.save_pretrained(path, safe_serialization=True)


def write_checkpoint(path: str) -> str:
  """Tokenizer + model in one folder (what `model.hf_path` points at); returns `path`."""
  import transformers  # pylint: disable=g-import-not-at-top

  os.makedirs(path, exist_ok=True)
  write_tokenizer(path)
  vocab = len(transformers.AutoTokenizer.from_pretrained(path))
  write_model(path, vocab_size=vocab)
  write_generation_config(path)  # after the model, whose save_pretrained writes its own
  return path
