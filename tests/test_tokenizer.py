"""Tests for rpt_jax/tokenizer.py against independent references.

References: the libraries' own decoders (decoding a prefix of ids must give the input up to that
token's end), SentencePiece's own byte offsets, the `tokenizers` char offsets, transformers'
GPT-2 byte table and AutoTokenizer.apply_chat_template, and hand-written expected strings/spans.
"""

import json
import os
import random
import unicodedata

import pytest
import sentencepiece as spm
import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, trainers

from rpt_jax import tokenizer as tk

WORDS = ("the of and to in is that for it as with was on be by at this are from or an which one "
         "number sum prime square root triangle angle equal value find let then so we have").split()
CJK = "的一是不了在人有我他这个们中来上大为和国地到以说时要就出会可也你对生能而子那得于着下自之年过发后作"
EMOJI = ("😀", "🎉", "🚀", "❤️", "👍🏽", "👨‍👩‍👧‍👦", "🇫🇷")
COMBINING = ("e\u0301", "a\u0308", "n\u0303", "o\u0302\u0323")
# Absent from the corpus: Ω, 𝔘, Greek, Thai, Hangul, Hebrew, 数学题求值测试, 👩🏾‍🚀, 🇯🇵, 👋🏿, ﬁ, ½, ２, Z͑.
PROBES = (
    "Hello  world, 12345 + 678 = 13023.\n\tIndented line  ",
    "数学题：求 x 的值。这是一个测试！",
    "Family 👨‍👩‍👧‍👦 and 👩🏾‍🚀 with flag 🇯🇵 and skin 👋🏿 ❤️",
    "Cafe\u0301 nai\u0308ve Z\u0351\u0334a\u0352lgo o\u0302\u0323 Ω",
    "Fraktur 𝔘𝔫𝔦 Ωμέγα ไทย 한국어 עברית",
    " leading space and trailing\n\n",
    "<think>reason</think> so \\boxed{ 42}",
    "ℌ ﬁ ½ ２ full-width",
    "",
    "a",
)
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
              r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
BOS, EOS, USER, ASSISTANT = ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>",
                             "<｜Assistant｜>")
# A minimal R1-Distill-Qwen template (the real one also handles tool calls).
R1_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}"
    "{% set add_generation_prompt = false %}{% endif %}"
    "{% set ns = namespace(system_prompt='') %}"
    "{%- for message in messages %}{%- if message['role'] == 'system' %}"
    "{% set ns.system_prompt = message['content'] %}{%- endif %}{%- endfor %}"
    "{{ bos_token }}{{ ns.system_prompt }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] }}{%- endif %}"
    "{%- if message['role'] == 'assistant' %}{% set content = message['content'] %}"
    "{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif %}"
    "{{ '<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>' }}{%- endif %}"
    "{%- endfor -%}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜><think>\\n' }}{% endif %}")
# The first R1-Distill release: the generation prompt stops at '<｜Assistant｜>'.
R1_OLD_TEMPLATE = R1_TEMPLATE.replace("<｜Assistant｜><think>\\n' }}{% endif %}",
                                      "<｜Assistant｜>' }}{% endif %}")
# Qwen-like, written over several lines: only renders right with trim_blocks + lstrip_blocks.
QWEN_TEMPLATE = """{% if messages|length == 0 %}
  {{ raise_exception('no messages') }}
{% endif %}
<|im_start|>system
You are a helpful assistant.<|im_end|>
{% for message in messages %}
  {% if message['role'] == 'user' %}
<|im_start|>user
{{ message['content'] }}<|im_end|>
  {% endif %}
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% endif %}"""
MESSAGE = "Complete {context} with \\boxed{ x}.\n### Context\n1 + 1 ="


def make_corpus(num_docs: int = 400, seed: int = 0) -> list[str]:
  """Generated multilingual documents: English + arithmetic, CJK, emoji, combining marks."""
  rng = random.Random(seed)
  docs = []
  for _ in range(num_docs):
    lines = []
    for _ in range(rng.randint(2, 6)):
      kind = rng.random()
      if kind < 0.4:
        lines.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12)))
                     + f" {rng.randint(0, 99999)} + {rng.randint(0, 999)} = ?")
      elif kind < 0.7:
        lines.append("".join(rng.choice(CJK) for _ in range(rng.randint(5, 30))))
      elif kind < 0.85:
        lines.append(" ".join(rng.choice(WORDS) + rng.choice(EMOJI) for _ in range(5)))
      else:
        lines.append(" ".join(rng.choice(WORDS) + rng.choice(COMBINING) for _ in range(5)))
    docs.append("\n".join(lines))
  return docs


@pytest.fixture(scope="module")
def corpus():
  docs = make_corpus()
  joined = "".join(docs)
  for absent in "Ω𝔘数学题求测试🇯🇵ﬁ½２":
    assert absent not in joined  # so these exercise byte fallback
  return docs


@pytest.fixture(scope="module")
def sp_tok(corpus, tmp_path_factory):
  path = str(tmp_path_factory.mktemp("sp") / "tok.model")
  return tk.train_sentencepiece(corpus, vocab_size=700, path=path)


def build_byte_level(corpus, normalizer=None) -> tokenizers.Tokenizer:
  """A Qwen-style byte-level BPE (split regex + ByteLevel) with Qwen and R1 added tokens."""
  tok = tokenizers.Tokenizer(models.BPE())
  if normalizer is not None:
    tok.normalizer = normalizer
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=600, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>", BOS, EOS],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  tok.train_from_iterator(corpus, trainer)
  tok.add_tokens([AddedToken(t, special=False, normalized=False)
                  for t in (USER, ASSISTANT, "<think>", "</think>")])
  return tok


def save_hf(tok: tokenizers.Tokenizer, folder, config: dict, generation_config=None) -> str:
  os.makedirs(folder, exist_ok=True)
  tok.save(os.path.join(folder, "tokenizer.json"))
  with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
    json.dump(config, f, ensure_ascii=False)
  if generation_config is not None:
    with open(os.path.join(folder, "generation_config.json"), "w", encoding="utf-8") as f:
      json.dump(generation_config, f)
  return str(folder)


@pytest.fixture(scope="module")
def hf_raw(corpus):
  return build_byte_level(corpus)


@pytest.fixture(scope="module")
def hf_dirs(hf_raw, tmp_path_factory):
  root = tmp_path_factory.mktemp("hf")
  return {
      "qwen": save_hf(hf_raw, root / "qwen", {
          "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None,
          "chat_template": QWEN_TEMPLATE}, {"eos_token_id": [2, 0]}),
      "r1": save_hf(hf_raw, root / "r1", {
          "bos_token": {"__type": "AddedToken", "content": BOS}, "eos_token": EOS,
          "chat_template": R1_TEMPLATE}),
      "r1_old": save_hf(hf_raw, root / "r1_old", {
          "bos_token": BOS, "eos_token": EOS, "chat_template": R1_OLD_TEMPLATE}),
      "plain": save_hf(hf_raw, root / "plain", {"eos_token": "<|endoftext|>"}),
  }


@pytest.fixture(scope="module", params=["sp", "hf"])
def backend(request, sp_tok, hf_dirs):
  """(our tokenizer, the library's decode function) for each backend."""
  if request.param == "sp":
    ref = spm.SentencePieceProcessor(model_file=sp_tok.name)
    return sp_tok, ref.decode
  tok = tk.load_tokenizer(hf_dirs["r1"])
  ref = tokenizers.Tokenizer.from_file(os.path.join(hf_dirs["r1"], "tokenizer.json"))
  return tok, lambda ids: ref.decode(ids, skip_special_tokens=False)


def char_boundaries(text: str) -> set[int]:
  """Byte offsets in text.encode() that fall between two characters."""
  out, pos = {0}, 0
  for ch in text:
    pos += len(ch.encode("utf-8"))
    out.add(pos)
  return out


def check_spans(tok, text: str, ref_decode, allow_empty: bool = False) -> int:
  """Asserts the spans tile `text`, match token bytes and the library's decode; counts splits."""
  data = text.encode("utf-8")
  ids, spans = tok.encode_with_byte_spans(text)
  assert ids == tok.encode(text)
  assert len(spans) == len(ids)
  assert b"".join(data[s:e] for s, e in spans) == data
  assert all(s < e or allow_empty and s == e for s, e in spans)
  assert [s for s, _ in spans] == [0] + [e for _, e in spans][:-1] if spans else data == b""
  assert (spans[-1][1] if spans else 0) == len(data)
  bounds = char_boundaries(text)
  split_inside_char = 0
  for k, (s, e) in enumerate(spans):
    assert data[s:e] == tok.token_bytes(ids[k]) or allow_empty and k == 0
    if e in bounds:  # the library decodes the prefix to exactly the input up to this token
      assert ref_decode(ids[:k + 1]) == data[:e].decode("utf-8")
    split_inside_char += e not in bounds
  return split_inside_char


def test_spans_tile_input_and_agree_with_library_decode(backend):
  tok, ref_decode = backend
  split_inside_char = sum(check_spans(tok, text, ref_decode)
                          for text in PROBES + (tok.apply_chat_template(MESSAGE),))
  assert split_inside_char > 20  # byte-fallback tokens really split characters


def test_decode_inverts_encode(backend):
  tok, _ = backend
  for text in PROBES:
    assert tok.decode(tok.encode(text)) == text


def test_sentencepiece_spans_match_its_own_offsets(sp_tok):
  ref = spm.SentencePieceProcessor(model_file=sp_tok.name)
  for text in PROBES:
    _, spans = sp_tok.encode_with_byte_spans(text)
    pieces = ref.encode(text, out_type="proto").pieces
    for (s, e), piece in zip(spans, pieces, strict=True):
      if piece.surface:  # SP gives a split char's whole span to its last byte piece
        assert e == piece.end
        if not ref.is_byte(piece.id):
          assert s == piece.begin


def test_hf_spans_within_char_offsets_and_gpt2_bytes(hf_dirs, hf_raw):
  convert = pytest.importorskip("transformers.convert_slow_tokenizer")  # its GPT-2 byte table
  byte_of = {c: b for b, c in convert.bytes_to_unicode().items()}
  added = {t.content for t in hf_raw.get_added_tokens_decoder().values()}
  tok = tk.load_tokenizer(hf_dirs["r1"])
  for text in PROBES:
    byte_at = [len(text[:i].encode("utf-8")) for i in range(len(text) + 1)]
    encoding = hf_raw.encode(text, add_special_tokens=False)
    _, spans = tok.encode_with_byte_spans(text)
    for (s, e), (cs, ce), token in zip(spans, encoding.offsets, encoding.tokens, strict=True):
      assert byte_at[cs] <= s < e <= byte_at[ce]
      expected = token.encode() if token in added else bytes(byte_of[c] for c in token)
      assert text.encode()[s:e] == expected


def test_hand_worked_spans(sp_tok, hf_dirs):
  hf = tk.load_tokenizer(hf_dirs["r1"])
  for tok in (sp_tok, hf):
    ids, spans = tok.encode_with_byte_spans("Ω")  # absent from training: two byte tokens
    assert spans == [(0, 1), (1, 2)]
    assert [tok.token_bytes(i) for i in ids] == [b"\xce", b"\xa9"]
    _, spans = tok.encode_with_byte_spans("𝔘")
    assert spans == [(0, 1), (1, 2), (2, 3), (3, 4)]
    ids, spans = tok.encode_with_byte_spans("<think>")
    assert len(ids) == 1 and spans == [(0, 7)]
  ids, spans = sp_tok.encode_with_byte_spans("12345")  # split_digits
  assert spans == [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)]
  ids, spans = hf.encode_with_byte_spans(BOS + "a")  # an added token with non-ASCII text
  assert ids[0] == hf.bos_id and spans[0] == (0, len(BOS.encode()))


def test_sentencepiece_special_ids_and_markers(sp_tok):
  ref = spm.SentencePieceProcessor(model_file=sp_tok.name)
  assert sp_tok.vocab_size == ref.get_piece_size() == 700
  assert (sp_tok.pad_id, sp_tok.bos_id, sp_tok.eos_id) == (0, 2, 3)
  assert ref.id_to_piece(1) == "<unk>"
  for marker in tk.SP_USER_DEFINED_SYMBOLS:
    assert sp_tok.encode(marker) == [ref.piece_to_id(marker)]
  assert sp_tok.stop_ids == (3, ref.piece_to_id("<|user|>"))
  assert len(sp_tok.encode("\\boxed{")) > 1  # kept plain


def test_train_sentencepiece_deterministic_and_errors(corpus, tmp_path):
  a = tk.train_sentencepiece(corpus[:100], 400, str(tmp_path / "a.model"))
  b = tk.train_sentencepiece(corpus[:100], 400, str(tmp_path / "b.model"))
  assert (tmp_path / "a.model").read_bytes() == (tmp_path / "b.model").read_bytes()
  assert a.encode(PROBES[0]) == b.encode(PROBES[0])
  with pytest.raises(ValueError, match="vocab_size=100 is too small.*at least 265"):
    tk.train_sentencepiece(corpus, 100, str(tmp_path / "c.model"))
  with pytest.raises(ValueError, match="must end in '.model'"):
    tk.train_sentencepiece(corpus, 400, str(tmp_path / "c.spm"))
  with pytest.raises(ValueError, match="no text"):
    tk.train_sentencepiece(["", "\n"], 400, str(tmp_path / "c.model"))


def test_hf_special_and_stop_ids(hf_dirs, hf_raw):
  qwen = tk.load_tokenizer(hf_dirs["qwen"])
  assert qwen.eos_id == hf_raw.token_to_id("<|im_end|>") == 2
  assert qwen.pad_id == hf_raw.token_to_id("<|endoftext|>") == 0
  assert qwen.bos_id is None
  # eos, generation_config's eos list, then end-of-turn added tokens (this vocab also has R1's).
  assert qwen.stop_ids == (2, 0, hf_raw.token_to_id(EOS))
  assert qwen.vocab_size == hf_raw.get_vocab_size(with_added_tokens=True)
  r1 = tk.load_tokenizer(hf_dirs["r1"])
  assert (r1.bos_id, r1.eos_id) == (hf_raw.token_to_id(BOS), hf_raw.token_to_id(EOS))
  assert r1.pad_id == r1.eos_id  # no pad token: falls back to eos
  assert set(r1.stop_ids) == {hf_raw.token_to_id(t) for t in ("<|im_end|>", "<|endoftext|>", EOS)}
  assert r1.stop_ids[0] == r1.eos_id


def test_chat_templates_hand_written(hf_dirs, sp_tok):
  r1_expected = BOS + USER + MESSAGE + ASSISTANT + "<think>\n"
  assert tk.load_tokenizer(hf_dirs["r1"]).apply_chat_template(MESSAGE) == r1_expected
  assert tk.load_tokenizer(hf_dirs["r1_old"]).apply_chat_template(MESSAGE) == r1_expected
  qwen_expected = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                   + MESSAGE + "<|im_end|>\n<|im_start|>assistant\n<think>\n")
  assert tk.load_tokenizer(hf_dirs["qwen"]).apply_chat_template(MESSAGE) == qwen_expected
  fallback = "<|user|>\n" + MESSAGE + "\n<|assistant|>\n<think>\n"
  assert sp_tok.apply_chat_template(MESSAGE) == fallback
  plain = tk.load_tokenizer(hf_dirs["plain"])
  assert plain.apply_chat_template(MESSAGE) == fallback
  ids = sp_tok.encode(fallback)
  assert ids[0] == sp_tok.encode("<|user|>")[0] and ids[-2:] == sp_tok.encode("<think>\n")


def test_chat_template_raise_exception(hf_dirs, tmp_path, hf_raw):
  import jinja2  # pylint: disable=g-import-not-at-top
  template = "{{ raise_exception('only system prompts here') }}"
  folder = save_hf(hf_raw, tmp_path / "bad", {"eos_token": EOS, "chat_template": template})
  with pytest.raises(jinja2.exceptions.TemplateError, match="only system prompts here"):
    tk.load_tokenizer(folder).apply_chat_template("x")


@pytest.mark.parametrize("name", ["qwen", "r1", "r1_old"])
def test_chat_template_matches_transformers(hf_dirs, name):
  transformers = pytest.importorskip("transformers")
  try:
    reference = transformers.AutoTokenizer.from_pretrained(hf_dirs[name], local_files_only=True)
  except Exception as e:  # pylint: disable=broad-except
    pytest.skip(f"AutoTokenizer cannot load the test directory offline: {e}")
  theirs = reference.apply_chat_template([{"role": "user", "content": MESSAGE}], tokenize=False,
                                         add_generation_prompt=True)
  ours = tk.load_tokenizer(hf_dirs[name]).apply_chat_template(MESSAGE)
  # transformers does not open the thinking block; we append '<think>\n' when it is missing.
  assert ours == (theirs if theirs.endswith("<think>\n") else theirs + "<think>\n")
  if name == "r1":  # this template opens the thinking block itself: identical strings
    assert ours == theirs


@pytest.fixture(scope="module")
def dummy_prefix_sp(corpus, tmp_path_factory) -> str:
  """A Llama-2-style SentencePiece model: identity normalisation, dummy prefix, byte fallback."""
  path = str(tmp_path_factory.mktemp("dummy") / "dummy.model")
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(corpus), model_prefix=path[:-len(".model")], vocab_size=500,
      byte_fallback=True, normalization_rule_name="identity", add_dummy_prefix=True,
      remove_extra_whitespaces=False, minloglevel=2, hard_vocab_limit=False, num_threads=1)
  return path


def test_sentencepiece_dummy_prefix(dummy_prefix_sp):
  tok = tk.load_tokenizer(dummy_prefix_sp)
  ref = spm.SentencePieceProcessor(model_file=dummy_prefix_sp)
  pieces = ref.encode_as_pieces("Ω the")
  assert pieces[:3] == ["▁", "<0xCE>", "<0xA9>"]  # a lone dummy-prefix piece first
  _, spans = tok.encode_with_byte_spans("Ω the")
  assert spans[:3] == [(0, 0), (0, 1), (1, 2)]
  assert ref.encode_as_pieces("the")[0].startswith("▁")
  _, spans = tok.encode_with_byte_spans("the")
  assert spans[0][0] == 0 and spans[-1][1] == 3
  for text in PROBES:
    check_spans(tok, text, ref.decode, allow_empty=True)
    ids, spans = tok.encode_with_byte_spans(text)
    assert tok.decode(ids) == text
    for (s, e), piece in zip(spans, ref.encode(text, out_type="proto").pieces, strict=True):
      if piece.surface:
        assert e == piece.end


def test_hf_metaspace_byte_fallback_tokenizer(dummy_prefix_sp, tmp_path):
  """A Llama-2/Mistral-style tokenizer.json, built from the SP model by transformers' converter."""
  convert = pytest.importorskip("transformers.convert_slow_tokenizer")
  from sentencepiece import sentencepiece_model_pb2  # pylint: disable=g-import-not-at-top
  proto = sentencepiece_model_pb2.ModelProto()
  with open(dummy_prefix_sp, "rb") as f:
    proto.ParseFromString(f.read())
  vocab = {piece.piece: i for i, piece in enumerate(proto.pieces)}
  raw = convert.SpmConverter.build_tokenizer_from_spm_proto(proto, vocab)
  config = {"bos_token": "<s>", "eos_token": "</s>"}
  tok = tk.load_tokenizer(save_hf(raw, tmp_path / "llama", config))
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 2)
  ids, spans = tok.encode_with_byte_spans("Ω the")
  assert raw.id_to_token(ids[0]) == "▁" and spans[:3] == [(0, 0), (0, 1), (1, 2)]
  ref_decode = lambda ids: raw.decode(ids, skip_special_tokens=False)
  assert sum(check_spans(tok, text, ref_decode, allow_empty=True) for text in PROBES) > 20
  for text in PROBES:
    assert tok.decode(tok.encode(text)) == text
  with pytest.raises(ValueError, match="do not reproduce the input bytes.*'▁'"):
    tok.encode_with_byte_spans("a▁b")
  assert tok.normalize_text("a▁b") == "a b"
  check_spans(tok, "a b", ref_decode, allow_empty=True)


def test_normalising_tokenizers_raise_and_normalize_text_fixes(corpus, tmp_path, hf_raw):
  path = str(tmp_path / "nfkc.model")
  spm.SentencePieceTrainer.train(  # SentencePiece defaults: nmt_nfkc, whitespace collapsing
      sentence_iterator=iter(corpus), model_prefix=path[:-len(".model")], vocab_size=500,
      byte_fallback=True, minloglevel=2, hard_vocab_limit=False, num_threads=1)
  sp = tk.load_tokenizer(path)
  with pytest.raises(ValueError, match="do not reproduce the input bytes.*nmt_nfkc"):
    sp.encode_with_byte_spans("ﬁ and ２")
  with pytest.raises(ValueError, match="do not reproduce the input bytes"):
    sp.encode_with_byte_spans("a  b")
  assert sp.normalize_text("  ﬁ  and ２ ") == "fi and 2"
  for text in PROBES:
    norm = sp.normalize_text(text)
    _, spans = sp.encode_with_byte_spans(norm)
    assert b"".join(norm.encode()[s:e] for s, e in spans) == norm.encode()

  nfc = build_byte_level(corpus[:50], normalizer=normalizers.NFC())
  hf = tk.load_tokenizer(save_hf(nfc, tmp_path / "nfc", {"eos_token": EOS}))
  decomposed = unicodedata.normalize("NFD", "Café naïve")
  with pytest.raises(ValueError, match="do not reproduce the input bytes.*NFC"):
    hf.encode_with_byte_spans(decomposed)
  assert hf.normalize_text(decomposed) == unicodedata.normalize("NFC", decomposed)
  _, spans = hf.encode_with_byte_spans(hf.normalize_text(decomposed))
  assert spans[-1][1] == len("Café naïve".encode())


def test_load_tokenizer_dispatch_and_errors(sp_tok, hf_dirs, tmp_path):
  assert isinstance(tk.load_tokenizer(sp_tok.name), tk.SentencePieceTokenizer)
  assert isinstance(tk.load_tokenizer(hf_dirs["r1"]), tk.HFTokenizer)
  from_file = tk.load_tokenizer(os.path.join(hf_dirs["r1"], "tokenizer.json"))
  assert from_file.apply_chat_template("x") == BOS + USER + "x" + ASSISTANT + "<think>\n"
  missing = str(tmp_path / "nope.model")
  with pytest.raises(FileNotFoundError, match="nope.model.*does not exist"):
    tk.load_tokenizer(missing)
  with pytest.raises(ValueError, match="holds no tokenizer.json"):
    tk.load_tokenizer(str(tmp_path))
  (tmp_path / "vocab.txt").write_text("a\nb\n")
  with pytest.raises(ValueError, match="vocab.txt.*not a SentencePiece .model file"):
    tk.load_tokenizer(str(tmp_path / "vocab.txt"))
  (tmp_path / "bad.model").write_bytes(b"not a model")
  with pytest.raises(ValueError, match="bad.model.*not a valid SentencePiece model"):
    tk.load_tokenizer(str(tmp_path / "bad.model"))
  (tmp_path / "tokenizer.json").write_text("{}")
  with pytest.raises(ValueError, match="not a valid HF tokenizer.json"):
    tk.load_tokenizer(str(tmp_path / "tokenizer.json"))


def test_check_vocab_fits(sp_tok):
  tk.check_vocab_fits(sp_tok, 700)
  tk.check_vocab_fits(sp_tok, 1024)
  with pytest.raises(ValueError, match="has 700 ids.*only 699 rows"):
    tk.check_vocab_fits(sp_tok, 699)


def test_literal_metaspace_char_raises_and_normalize_text_fixes(sp_tok):
  text = "a▁b"  # SentencePiece cannot tell U+2581 from its own space marker
  with pytest.raises(ValueError, match="do not reproduce the input bytes.*'▁'"):
    sp_tok.encode_with_byte_spans(text)
  assert sp_tok.normalize_text(text) == "a b"
  check_spans(sp_tok, "a b", spm.SentencePieceProcessor(model_file=sp_tok.name).decode)


def test_tokenizers_pickle_for_worker_processes(sp_tok, hf_dirs):
  import pickle  # pylint: disable=g-import-not-at-top
  for tok in (sp_tok, tk.load_tokenizer(hf_dirs["r1"])):
    clone = pickle.loads(pickle.dumps(tok))
    for text in PROBES:
      assert clone.encode_with_byte_spans(text) == tok.encode_with_byte_spans(text)
    assert clone.apply_chat_template(MESSAGE) == tok.apply_chat_template(MESSAGE)
    assert clone.stop_ids == tok.stop_ids
