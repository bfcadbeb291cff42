# Over ~400 lines: both backends keep one byte-span contract, tested as one.
"""Tokenizers: one interface over SentencePiece `.model` files and HF `tokenizer.json` files.

This module owns text <-> ids, the exact UTF-8 byte span of every token, the special and stop ids,
the chat template that wraps a user message into a prompt, and training a small SentencePiece
model in-process for the offline CPU setup.

Byte spans. The prefix-matching reward needs the document's OWN token boundaries in bytes, so
`encode_with_byte_spans` derives each token's raw bytes from the vocabulary (never from char
offsets, which cannot split inside a character): GPT-2 byte-level pieces are mapped back through
the byte<->unicode table, SentencePiece-style pieces map '▁' to ' ' and `<0xNN>` byte-fallback
pieces to that one byte, added tokens are their literal text. The bytes are then checked to
concatenate to the input exactly, and the spans are their cumulative lengths; a character split
over several byte tokens gets spans that split inside it.

Dummy prefix. A tokenizer that prepends a space to the input (SentencePiece `add_dummy_prefix`,
HF Metaspace `prepend_scheme`, byte-level `add_prefix_space`) yields tokens spelling ' ' + text.
That space is not in the input, so it is taken off the FIRST token's span: '▁Hello' spans
(0, 5) and a lone '▁' token spans (0, 0) (an empty span; the spans still tile the input).
`train_sentencepiece` switches the dummy prefix off, so there token bytes == text bytes.

Normalisation. A tokenizer that rewrites its input (NFKC, NFC on NFD text, whitespace collapsing)
produces tokens that do not spell the input; `encode_with_byte_spans` then raises a ValueError
naming the normaliser. Callers that must accept such text first call `normalize_text` (e.g. the
NFC normaliser of Qwen2's tokenizer.json) and use the normalised text as the document.

Special ids. `pad_id` falls back to `eos_id` when the tokenizer defines no pad token (padding is
always masked, so sharing the id is harmless). `stop_ids` = eos, the eos ids listed in an HF
directory's generation_config.json, end-of-turn tokens (`<|im_end|>`, `<｜end▁of▁sentence｜>`,
`<|eot_id|>`, ...) present as added tokens, and `<|user|>` under the fallback template.

Chat template. An HF `chat_template` is rendered with a sandboxed jinja2 environment configured
like transformers' (trim_blocks, lstrip_blocks, loopcontrols, `raise_exception`, `tojson`,
`strftime_now`) with messages=[{'role': 'user', 'content': msg}], add_generation_prompt=True and
the special-token strings. The paper's policy thinks first, so when the rendered prompt does not
already end with `<think>` (R1-Distill-Qwen's does: '<｜Assistant｜><think>\\n'), '<think>\\n' is
appended. Without a template (every SentencePiece model) the fallback `FALLBACK_CHAT_TEMPLATE`
is used: "<|user|>\\n{message}\\n<|assistant|>\\n<think>\\n" (no BOS: SentencePiece cannot encode a
control token from text).
"""

from __future__ import annotations

import datetime
import functools
import io
import json
import os
import re
import unicodedata
from typing import Any, Iterable, Iterator, Sequence

import jinja2
import jinja2.ext
import jinja2.sandbox
import sentencepiece as spm
import tokenizers

from rpt_jax.errors import InputError, MissingInputError, one_line

USER_MARKER = "<|user|>"
ASSISTANT_MARKER = "<|assistant|>"
THINK_OPEN = "<think>\n"
FALLBACK_CHAT_TEMPLATE = USER_MARKER + "\n{message}\n" + ASSISTANT_MARKER + "\n" + THINK_OPEN
# Chat/format markers that train_sentencepiece keeps as single pieces (`\boxed{` stays plain text).
SP_USER_DEFINED_SYMBOLS = (USER_MARKER, ASSISTANT_MARKER, "<think>", "</think>")
SP_SPECIAL_IDS = {"pad_id": 0, "unk_id": 1, "bos_id": 2, "eos_id": 3}
# End-of-turn / end-of-text tokens of the supported families (Qwen2/2.5/3, R1-Distill, Llama 3,
# Mistral); each is a stop id only where the tokenizer has it as an added (special) token.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|endoftext|>", "<｜end▁of▁sentence｜>", "<|eot_id|>",
                      "<|eom_id|>", "<|end_of_text|>", "</s>")
_EOS_GUESSES = ("<|endoftext|>", "<｜end▁of▁sentence｜>", "<|end_of_text|>", "</s>", "<eos>")
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_UNICODE_FORMS = ("NFC", "NFD", "NFKC", "NFKD")
_SENTENCE_CHARS = 1000  # training sentences are cut to <= 4,000 UTF-8 bytes (SP's limit is 4,192)


def _gpt2_bytes_to_unicode() -> dict[int, str]:
  """GPT-2's reversible map from the 256 byte values to printable unicode characters."""
  printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
               *range(ord("®"), ord("ÿ") + 1)]
  table = {b: chr(b) for b in printable}
  shift = 0
  for b in range(256):
    if b not in table:
      table[b] = chr(256 + shift)
      shift += 1
  return table


_BYTE_LEVEL_TO_BYTE = {c: b for b, c in _gpt2_bytes_to_unicode().items()}


class Tokenizer:
  """The interface every tokenizer backend implements (see the module docstring for semantics).

  Attributes:
    name: where the tokenizer came from (used in error messages).
    vocab_size: size of the id space (max id + 1).
    bos_id: beginning-of-sequence id, or None.
    eos_id: end-of-sequence id.
    pad_id: padding id (eos_id when the tokenizer has no pad token).
    stop_ids: ids that end a generation.
    chat_template: the jinja chat template, or None (then FALLBACK_CHAT_TEMPLATE is used).
  """

  name: str
  vocab_size: int
  bos_id: int | None
  eos_id: int
  pad_id: int
  stop_ids: tuple[int, ...]
  chat_template: str | None
  special_tokens: dict[str, str]  # e.g. {'bos_token': '<s>'}: strings passed to the chat template

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, no BOS/EOS added."""
    raise NotImplementedError

  def decode(self, ids: Sequence[int]) -> str:
    """Text of `ids` (special tokens kept as their text; control tokens of SentencePiece vanish)."""
    raise NotImplementedError

  def token_bytes(self, token_id: int) -> bytes:
    """The raw UTF-8 bytes token `token_id` stands for in the text (possibly a partial char)."""
    raise NotImplementedError

  def normalize_text(self, text: str) -> str:
    """`text` as the tokenizer's normaliser rewrites it (identity for most LLM tokenizers)."""
    return text

  def _normalizer_description(self) -> str:
    return "none"

  def encode_with_byte_spans(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Ids of `text` and the (start, end) byte span of each in text.encode('utf-8').

    The spans tile the input: span[0][0] == 0, span[i][1] == span[i+1][0], span[-1][1] == len.

    Raises:
      ValueError: the tokens do not spell the input bytes (a normalising tokenizer, or a token
        without known bytes such as SentencePiece's <unk>).
    """
    ids = self.encode(text)
    pieces = [self.token_bytes(i) for i in ids]
    data = text.encode("utf-8")
    joined = b"".join(pieces)
    skip = 0
    if joined != data:
      if joined == b" " + data and pieces[0][:1] == b" ":
        skip = 1  # a dummy-prefix space the tokenizer added: not part of the input
      else:
        raise InputError(self._mismatch_message(data, joined))
    spans = []
    pos = 0
    for k, piece in enumerate(pieces):
      end = pos + len(piece) - (skip if k == 0 else 0)
      spans.append((pos, end))
      pos = end
    return ids, spans

  def _mismatch_message(self, data: bytes, joined: bytes) -> str:
    first = next((k for k, (a, b) in enumerate(zip(data, joined)) if a != b),
                 min(len(data), len(joined)))
    lo = max(0, first - 12)
    return (
        f"tokenizer {self.name}: its tokens do not reproduce the input bytes (first difference at "
        f"byte {first}: input {data[lo:first + 12]!r} vs tokens {joined[lo:first + 12]!r}); its "
        f"normaliser is {self._normalizer_description()}. The RPT reward needs each token's exact "
        "bytes in the document: normalise documents with Tokenizer.normalize_text before "
        "tokenising, or use a tokenizer without normalisation (train_sentencepiece uses identity).")

  def apply_chat_template(self, user_message: str) -> str:
    """The prompt text: the user turn, then the opened assistant turn ending in `<think>`."""
    if self.chat_template is None:
      return FALLBACK_CHAT_TEMPLATE.replace("{message}", user_message)
    rendered = _compile_chat_template(self.chat_template).render(
        messages=[{"role": "user", "content": user_message}], tools=None, documents=None,
        add_generation_prompt=True, **self.special_tokens)
    if rendered.rstrip().endswith("<think>"):
      return rendered
    return rendered + THINK_OPEN  # the paper's policy thinks before it answers

  def _end_of_turn_ids(self, known_ids: Iterable[int]) -> tuple[int, ...]:
    """eos first, then `known_ids`, deduplicated in order."""
    return tuple(dict.fromkeys([self.eos_id, *known_ids]))

  def __repr__(self) -> str:
    return (f"{type(self).__name__}({self.name!r}, vocab_size={self.vocab_size}, "
            f"bos_id={self.bos_id}, eos_id={self.eos_id}, pad_id={self.pad_id}, "
            f"stop_ids={self.stop_ids})")


@functools.lru_cache(maxsize=16)
def _compile_chat_template(template: str) -> jinja2.Template:
  """Compiles `template` in a sandbox configured like transformers' chat-template renderer."""

  def raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)

  def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
             separators: Any = None, sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)

  env = jinja2.sandbox.ImmutableSandboxedEnvironment(
      trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
  env.filters["tojson"] = tojson
  env.globals["raise_exception"] = raise_exception
  env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
  return env.from_string(template)


class SentencePieceTokenizer(Tokenizer):
  """A SentencePiece `.model`; uses the fallback chat template."""

  def __init__(self, model_proto: bytes, name: str):
    from sentencepiece import sentencepiece_model_pb2  # pylint: disable=g-import-not-at-top
    self.name = name
    self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    self.chat_template = None
    self.special_tokens = {}
    spec = sentencepiece_model_pb2.ModelProto()
    spec.ParseFromString(model_proto)
    norm = spec.normalizer_spec  # plain values only, so that the tokenizer pickles (Grain workers)
    self._rule = norm.name
    self._collapses_spaces = norm.remove_extra_whitespaces
    self._dummy_prefix = norm.add_dummy_prefix
    self.vocab_size = self._sp.get_piece_size()
    self.bos_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else None
    if self._sp.eos_id() < 0:
      raise InputError(f"SentencePiece model {name} has no eos id; retrain it with eos_id set "
                       "(train_sentencepiece does).")
    self.eos_id = self._sp.eos_id()
    self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else self.eos_id
    self.unk_id = self._sp.unk_id() if self._sp.unk_id() >= 0 else None
    user_id = self._sp.piece_to_id(USER_MARKER)
    # Under the fallback template a generated "<|user|>" opens the next turn: stop there too.
    self.stop_ids = self._end_of_turn_ids(
        [user_id] if self._sp.id_to_piece(user_id) == USER_MARKER else [])
    self._token_bytes: list[bytes | None] = [None] * self.vocab_size

  def encode(self, text: str) -> list[int]:
    return self._sp.encode(text)

  def decode(self, ids: Sequence[int]) -> str:
    return self._sp.decode([int(i) for i in ids])

  def id_to_piece(self, token_id: int) -> str:
    """The piece (SentencePiece's spelling, '▁' for a space) of `token_id`."""
    return self._sp.id_to_piece(token_id)

  def token_bytes(self, token_id: int) -> bytes:
    cached = self._token_bytes[token_id]
    if cached is not None:
      return cached
    piece = self._sp.id_to_piece(token_id)
    if self._sp.is_byte(token_id):
      out = bytes([int(_BYTE_PIECE.fullmatch(piece).group(1), 16)])
    elif self._sp.is_control(token_id):
      out = b""
    elif self._sp.is_unknown(token_id):
      raise InputError(
          f"tokenizer {self.name}: the text holds characters outside the vocabulary (token "
          f"{piece!r}, id {token_id}) and the model has no byte fallback, so their bytes are lost; "
          "retrain with byte_fallback=True (train_sentencepiece does).")
    else:
      out = piece.replace("▁", " ").encode("utf-8")
    self._token_bytes[token_id] = out
    return out

  def normalize_text(self, text: str) -> str:
    # SentencePiece spells spaces as '▁' (U+2581), so a literal '▁' in the text comes back as ' '.
    if self._rule == "identity" and not self._collapses_spaces:
      return text.replace("▁", " ")
    normalized = self._sp.normalize(text)
    if self._dummy_prefix and normalized.startswith("▁"):
      normalized = normalized[1:]
    return normalized.replace("▁", " ")

  def _normalizer_description(self) -> str:
    return (f"SentencePiece rule {self._rule!r} (remove_extra_whitespaces="
            f"{self._collapses_spaces}; a literal '▁' in the text decodes as a space)")


class HFTokenizer(Tokenizer):
  """An HF `tokenizer.json` (the `tokenizers` package) with its tokenizer_config.json."""

  def __init__(self, tokenizer_file: str, config: dict[str, Any],
               generation_config: dict[str, Any], chat_template: str | None):
    self.name = tokenizer_file
    try:
      self._tok = tokenizers.Tokenizer.from_file(tokenizer_file)
    except Exception as e:  # the Rust error names the JSON problem
      raise InputError(f"tokenizer file {tokenizer_file!r} is not a valid HF tokenizer.json "
                       f"({one_line(e)}): replace it with the model's own.") from e
    self._tok.no_truncation()  # a tokenizer.json may carry truncation/padding settings
    self._tok.no_padding()
    spec = json.loads(self._tok.to_str())
    types = _json_types(spec.get("pre_tokenizer")) | _json_types(spec.get("decoder"))
    if "ByteLevel" in types:
      self._scheme = "byte_level"
    elif "Metaspace" in types or "ByteFallback" in types or spec["model"].get("byte_fallback"):
      self._scheme = "metaspace"
    else:
      self._scheme = None
    norm_types = _json_types(spec.get("normalizer"))
    self._unicode_forms = [t for t in _UNICODE_FORMS if t in norm_types]
    self._norm_types = sorted(norm_types)
    self._added = {i: t.content for i, t in self._tok.get_added_tokens_decoder().items()}
    self.vocab_size = max(self._tok.get_vocab(with_added_tokens=True).values()) + 1
    self._token_bytes: list[bytes | None] = [None] * self.vocab_size

    self.special_tokens = {}
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
      content = _token_content(config.get(key))
      if content is not None:
        self.special_tokens[key] = content
    self.bos_id = self._required_id("bos_token")
    gen_eos = generation_config.get("eos_token_id")
    gen_eos = [gen_eos] if isinstance(gen_eos, int) else list(gen_eos or [])
    eos_id = self._required_id("eos_token")
    if eos_id is None:
      guesses = [self._tok.token_to_id(t) for t in _EOS_GUESSES]
      eos_id = next((i for i in [*gen_eos, *guesses] if i is not None), None)
    if eos_id is None:
      raise InputError(f"tokenizer {tokenizer_file}: no eos token: set 'eos_token' in "
                       "tokenizer_config.json next to it.")
    self.eos_id = eos_id
    pad_id = self._required_id("pad_token")
    self.pad_id = eos_id if pad_id is None else pad_id
    self.chat_template = chat_template
    markers = [*END_OF_TURN_TOKENS, *([USER_MARKER] if chat_template is None else [])]
    turn_ids = [i for i in map(self._tok.token_to_id, markers) if i in self._added]
    self.stop_ids = self._end_of_turn_ids(
        [*(i for i in gen_eos if 0 <= i < self.vocab_size), *turn_ids])

  def _required_id(self, key: str) -> int | None:
    content = self.special_tokens.get(key)
    if content is None:
      return None
    token_id = self._tok.token_to_id(content)
    if token_id is None:
      raise InputError(f"tokenizer {self.name}: {key} {content!r} from tokenizer_config.json is "
                       "not in the vocabulary; fix the config or the tokenizer.json.")
    return token_id

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Sequence[int]) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

  def token_bytes(self, token_id: int) -> bytes:
    cached = self._token_bytes[token_id]
    if cached is not None:
      return cached
    token = self._tok.id_to_token(token_id)
    if token_id in self._added:
      out = self._added[token_id].encode("utf-8")
    elif self._scheme == "byte_level":
      try:
        out = bytes(_BYTE_LEVEL_TO_BYTE[c] for c in token)
      except KeyError as e:
        raise InputError(f"tokenizer {self.name}: token {token!r} (id {token_id}) is not a "
                         "byte-level token, so its bytes are unknown.") from e
    elif self._scheme == "metaspace":
      match = _BYTE_PIECE.fullmatch(token)
      out = bytes([int(match.group(1), 16)]) if match else token.replace("▁", " ").encode()
    else:
      raise InputError(
          f"tokenizer {self.name}: token bytes are only known for byte-level BPE (GPT-2/Qwen/"
          "Llama 3) and SentencePiece-style (Metaspace/byte-fallback) tokenizers; this one is "
          f"neither (model {self._tok.model.__class__.__name__}).")
    self._token_bytes[token_id] = out
    return out

  def normalize_text(self, text: str) -> str:
    for form in self._unicode_forms:
      text = unicodedata.normalize(form, text)
    # Metaspace spells spaces as '▁' (U+2581), so a literal '▁' in the text comes back as ' '.
    return text.replace("▁", " ") if self._scheme == "metaspace" else text

  def _normalizer_description(self) -> str:
    described = "+".join(self._norm_types) if self._norm_types else "none"
    if self._scheme == "metaspace":
      described += "; a literal '▁' in the text decodes as a space"
    return described


def _json_types(node: Any) -> set[str]:
  """All 'type' values in a tokenizer.json component (Sequence components nest)."""
  if isinstance(node, dict):
    found = {node["type"]} if isinstance(node.get("type"), str) else set()
    for value in node.values():
      found |= _json_types(value)
    return found
  if isinstance(node, list):
    return set().union(*(_json_types(v) for v in node)) if node else set()
  return set()


def _token_content(value: Any) -> str | None:
  """A special token from tokenizer_config.json: a string or a serialised AddedToken dict."""
  if isinstance(value, dict):
    return value.get("content")
  return value if isinstance(value, str) else None


def _read_json(path: str) -> dict[str, Any]:
  if not os.path.isfile(path):
    return {}
  with open(path, encoding="utf-8") as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise InputError(f"tokenizer file {path!r} is not valid JSON ({e.msg}, line {e.lineno}): "
                       "replace it with the model's own.") from e


def _load_hf(tokenizer_file: str) -> HFTokenizer:
  folder = os.path.dirname(os.path.abspath(tokenizer_file))
  config = _read_json(os.path.join(folder, "tokenizer_config.json"))
  for key, value in _read_json(os.path.join(folder, "special_tokens_map.json")).items():
    config.setdefault(key, value)
  template_file = os.path.join(folder, "chat_template.jinja")
  template = config.get("chat_template")
  if os.path.isfile(template_file):  # newer transformers save the template beside the config
    with open(template_file, encoding="utf-8") as f:
      template = f.read()
  elif isinstance(template, list):  # named templates: [{'name': 'default', 'template': ...}]
    named = {t["name"]: t["template"] for t in template}
    template = named.get("default", next(iter(named.values()), None))
  generation_config = _read_json(os.path.join(folder, "generation_config.json"))
  return HFTokenizer(tokenizer_file, config, generation_config, template)


def load_tokenizer(path: str) -> Tokenizer:
  """Loads a SentencePiece `.model` file, or an HF directory holding tokenizer.json (or the file).

  Raises:
    FileNotFoundError: `path` does not exist.
    ValueError: `path` is neither kind, or is corrupt.
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise MissingInputError(f"tokenizer path {path!r} (tokenizer.path, else model.hf_path) does "
                            "not exist: give a SentencePiece .model file or an HF tokenizer "
                            "folder holding tokenizer.json.")
  if os.path.isdir(path):
    if os.path.isfile(os.path.join(path, "tokenizer.json")):
      return _load_hf(os.path.join(path, "tokenizer.json"))
    raise InputError(f"tokenizer folder {path!r} (tokenizer.path, else model.hf_path) holds no "
                     "tokenizer.json: give an HF tokenizer folder or a SentencePiece .model "
                     "file.")
  if path.endswith(".model"):
    with open(path, "rb") as f:
      proto = f.read()
    try:
      return SentencePieceTokenizer(proto, path)
    except RuntimeError as e:
      raise InputError(f"tokenizer file {path!r} (tokenizer.path) is not a valid SentencePiece "
                       f"model ({one_line(e)}): give the .model file it was trained "
                       "as.") from e
  if path.endswith(".json"):
    return _load_hf(path)
  raise InputError(f"tokenizer path {path!r} (tokenizer.path) is not a SentencePiece .model "
                   "file, a tokenizer.json file or a folder holding tokenizer.json: point it at "
                   "one of those.")


def _training_sentences(texts: Iterable[str]) -> Iterator[str]:
  """Lines of `texts`, cut to at most _SENTENCE_CHARS chars (SentencePiece skips longer ones)."""
  for text in texts:
    for line in text.split("\n"):
      for start in range(0, len(line), _SENTENCE_CHARS):
        yield line[start:start + _SENTENCE_CHARS]


def train_sentencepiece(texts: Iterable[str], vocab_size: int, path: str, *,
                        model_type: str = "bpe",
                        character_coverage: float = 0.9995) -> SentencePieceTokenizer:
  """Trains a SentencePiece model on `texts` in-process, writes it to `path`, and loads it.

  Token bytes equal text bytes exactly: identity normalisation, no dummy prefix, whitespace kept,
  byte fallback for unseen characters (newlines, which never occur inside a training line, are
  the byte piece <0x0A>). Digits are split one per token; SP_USER_DEFINED_SYMBOLS are single
  pieces; ids: pad 0, unk 1, bos 2, eos 3. Deterministic for the same input.

  Args:
    texts: training documents (any number of lines each).
    vocab_size: number of pieces; at least 256 byte pieces + specials + markers + 1.
    path: where the model is written; must end in '.model'.
    model_type: 'bpe' or 'unigram'.
    character_coverage: share of characters covered by single-char pieces (the rest use bytes).
  """
  path = os.fspath(path)
  if not path.endswith(".model"):
    raise InputError(f"SentencePiece model path {path!r} must end in '.model' so that "
                     "load_tokenizer recognises it.")
  minimum = 256 + len(SP_SPECIAL_IDS) + len(SP_USER_DEFINED_SYMBOLS) + 1
  if vocab_size < minimum:
    raise InputError(f"vocab_size={vocab_size} is too small for a byte-fallback SentencePiece "
                     f"model: use at least {minimum} (256 byte pieces, specials and markers).")
  sentences = [s for s in _training_sentences(texts) if s]
  if not sentences:
    raise InputError("train_sentencepiece got no text to train on.")
  model = io.BytesIO()
  spm.set_random_generator_seed(0)  # unigram seeding and sampling use SentencePiece's global RNG
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=model, vocab_size=vocab_size,
        model_type=model_type, byte_fallback=True, character_coverage=character_coverage,
        normalization_rule_name="identity", add_dummy_prefix=False,
        remove_extra_whitespaces=False, split_digits=True, allow_whitespace_only_pieces=True,
        user_defined_symbols=list(SP_USER_DEFINED_SYMBOLS), hard_vocab_limit=False,
        input_sentence_size=0, shuffle_input_sentence=False, num_threads=1, minloglevel=2,
        **SP_SPECIAL_IDS)
  except RuntimeError as e:
    raise InputError(f"SentencePiece training failed (vocab_size={vocab_size}, "
                     f"{len(sentences)} sentences): {e}") from e
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "wb") as f:
    f.write(model.getvalue())
  return SentencePieceTokenizer(model.getvalue(), path)


def check_vocab_fits(tokenizer: Tokenizer, model_vocab_size: int) -> None:
  """Raises ValueError when the tokenizer's ids do not all index the model's embedding rows."""
  if tokenizer.vocab_size > model_vocab_size:
    raise InputError(
        f"tokenizer {tokenizer.name} has {tokenizer.vocab_size} ids (max id "
        f"{tokenizer.vocab_size - 1}) but the model's embedding has only {model_vocab_size} rows; "
        "use the tokenizer the model was trained with, or a model config with vocab_size >= "
        f"{tokenizer.vocab_size}.")
