"""Corpora: iterate the documents (str) of a text, JSONL, Parquet, TFDS or synthetic source.

A `SourceConfig` names the source; `iter_documents(config)` yields its documents in a fixed,
deterministic order (files sorted by path), so a document's index in the stream is its id.
Sources are registered by kind in `SOURCES`.

Kinds:
  text       a .txt file or a folder of them (searched recursively): one document per file, or
             one per blank-line-separated paragraph with `split_on_blank_lines=True`.
  jsonl      a .jsonl file or folder of them: one JSON object per line, the document in `field`.
  parquet    a .parquet file or folder of them: the document in column `field` (pyarrow).
  tfds       a TFDS dataset `name` already prepared in array_record format under `data_dir`
             (read with `tfds.data_source`; TensorFlow is not needed; nothing is downloaded).
  synthetic  the built-in maths corpus (`rpt_jax.data.synthetic`).

Documents longer than `max_document_chars` (a whole book in one .txt file, a long JSONL value)
are cut into consecutive pieces of at most that many characters, at paragraph ends (blank lines)
where possible, else at line ends, else between words (`split_document`); each piece is a
document of its own. So a corpus of a few large files still gives many documents: a held-out
split by document, and positions kept per document, that scale with the corpus.

Text that is not valid UTF-8 is decoded with errors='replace' (U+FFFD for each bad byte); the
number of affected documents is counted in `SourceStats.invalid_utf8_documents` and a warning
names each file that had any. Documents that are empty or whitespace-only are skipped (counted).
Every error a corpus can cause (missing path, a folder without matching files, an unreadable or
corrupt file, a bad JSONL line, a missing field or column, no documents at all) is an
`rpt_jax.errors.InputError` / `MissingInputError` naming the file (and line) and the fix.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
import warnings
from typing import Callable, Iterator

from rpt_jax.data.records import document_split
from rpt_jax.data.synthetic import SyntheticConfig, synthetic_documents
from rpt_jax.errors import InputError, MissingInputError

_EXTENSIONS = {"text": (".txt",), "jsonl": (".jsonl",), "parquet": (".parquet",)}
# Where a long document may be cut, best first: after a paragraph (a blank-line run), after a
# line, after a run of spaces.
_BOUNDARIES = (re.compile(r"\n[ \t\r\f\v]*\n\s*"), re.compile(r"\n"), re.compile(r"\s+"))
DEFAULT_MAX_DOCUMENT_CHARS = 8_000  # ~2k tokens of English: half the paper's longest prompt


@dataclasses.dataclass(frozen=True)
class SourceConfig:
  """Where the documents come from.

  Attributes:
    kind: one of `SOURCES` ('text', 'jsonl', 'parquet', 'tfds', 'synthetic').
    path: file or folder (text, jsonl, parquet).
    field: JSON key / Parquet column / TFDS feature that holds the document text.
    name: TFDS dataset name, e.g. 'my_corpus' or 'my_corpus/config:1.0.0' (tfds).
    data_dir: folder holding the prepared TFDS data (tfds); None: TFDS's default folder.
    split: TFDS split, e.g. 'train' or 'train[:10%]' (tfds).
    split_on_blank_lines: text files hold many documents separated by blank lines (text).
    max_documents: stop after this many documents (None: all).
    max_document_chars: cut longer documents into pieces of at most this many characters
      (`split_document`); None: never cut.
    synthetic: size and seed of the built-in corpus (synthetic).
  """

  kind: str = "synthetic"
  path: str | None = None
  field: str = "text"
  name: str | None = None
  data_dir: str | None = None
  split: str = "train"
  split_on_blank_lines: bool = False
  max_documents: int | None = None
  max_document_chars: int | None = DEFAULT_MAX_DOCUMENT_CHARS
  synthetic: SyntheticConfig = dataclasses.field(default_factory=SyntheticConfig)

  def __post_init__(self):
    if self.kind not in SOURCES:
      raise InputError(f"data.source.kind {self.kind!r} is unknown: choose one of "
                       f"{sorted(SOURCES)}.")
    if self.kind in _EXTENSIONS and not self.path:
      raise InputError(f"data.source.path is empty: source kind {self.kind!r} needs a file or "
                       "a folder.")
    if self.kind == "tfds" and not self.name:
      raise InputError("data.source.name is empty: source kind 'tfds' needs the TFDS dataset "
                       "name.")
    if self.max_documents is not None and self.max_documents < 1:
      raise InputError(f"data.source.max_documents={self.max_documents}: use 0/None (all) or a "
                       "count >= 1.")
    if self.max_document_chars is not None and self.max_document_chars < 1:
      raise InputError(f"data.source.max_document_chars={self.max_document_chars}: use 0/None "
                       "(never cut) or a length >= 1.")
    if isinstance(self.synthetic, dict):  # From a JSON manifest or a config dict.
      object.__setattr__(self, "synthetic", SyntheticConfig(
          **{k: tuple(v) if isinstance(v, list) else v for k, v in self.synthetic.items()}))


@dataclasses.dataclass
class SourceStats:
  """Counters filled while iterating a source."""

  documents: int = 0
  skipped_empty: int = 0
  invalid_utf8_documents: int = 0


def _decode(data: bytes, stats: SourceStats) -> str:
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError:
    stats.invalid_utf8_documents += 1
    return data.decode("utf-8", errors="replace")


def _files(config: SourceConfig) -> list[str]:
  """Sorted files of the source's kind under `config.path`; clear errors when there are none."""
  path, exts = config.path, _EXTENSIONS[config.kind]
  if not os.path.exists(path):
    raise MissingInputError(
        f"corpus path {path!r} (data.source.path) does not exist: set it to a "
        f"{'/'.join(exts)} file or a folder of them.")
  if os.path.isfile(path):
    return [path]
  files = sorted(f for f in glob.glob(os.path.join(path, "**", "*"), recursive=True)
                 if os.path.isfile(f) and f.endswith(exts))
  if not files:
    raise InputError(
        f"corpus folder {path!r} (data.source.path) holds no {'/'.join(exts)} files (searched "
        f"recursively): point it at the data or change data.source.kind (now {config.kind!r}).")
  return files


def _read_bytes(path: str) -> bytes:
  with _open(path) as f:
    return f.read()


def _warn_invalid(path: str, count: int, unit: str) -> None:
  if count:
    warnings.warn(
        f"{path}: {count} {unit} contained bytes that are not valid UTF-8; they were decoded "
        "with errors='replace' (each bad byte became U+FFFD).", stacklevel=3)


def _text_documents(config: SourceConfig, stats: SourceStats) -> Iterator[str]:
  for path in _files(config):
    data = _read_bytes(path)
    before = stats.invalid_utf8_documents
    text = _decode(data, stats)
    _warn_invalid(path, stats.invalid_utf8_documents - before, "file(s)")
    if not config.split_on_blank_lines:
      yield text
      continue
    # Paragraphs: runs of lines separated by one or more whitespace-only lines.
    paragraph: list[str] = []
    for line in text.splitlines(keepends=True):
      if line.strip():
        paragraph.append(line)
      elif paragraph:
        yield "".join(paragraph)
        paragraph = []
    if paragraph:
      yield "".join(paragraph)


def _open(path: str):
  try:
    return open(path, "rb")
  except OSError as e:
    raise InputError(f"corpus file {path!r} cannot be read ({e.strerror or e}): fix its "
                     "permissions or remove it from data.source.path.") from e


def _jsonl_documents(config: SourceConfig, stats: SourceStats) -> Iterator[str]:
  for path in _files(config):
    before = stats.invalid_utf8_documents
    with _open(path) as f:
      for line_number, raw in enumerate(f, start=1):
        line = _decode(raw, stats)
        if not line.strip():
          continue
        try:
          obj = json.loads(line)
        except json.JSONDecodeError as e:
          raise InputError(f"corpus file {path}:{line_number} is not valid JSON ({e.msg}): fix "
                           "or delete that line (one JSON object per line).") from None
        if not isinstance(obj, dict) or config.field not in obj:
          keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
          raise InputError(
              f"{path}:{line_number}: no field {config.field!r} (found {keys}): set "
              "data.source.field to the key that holds the document text.")
        value = obj[config.field]
        if not isinstance(value, str):
          raise InputError(
              f"{path}:{line_number}: field {config.field!r} holds a "
              f"{type(value).__name__}, not a string: set data.source.field to a text field.")
        yield value
    _warn_invalid(path, stats.invalid_utf8_documents - before, "line(s)")


def _parquet_documents(config: SourceConfig, stats: SourceStats) -> Iterator[str]:
  import pyarrow as pa  # Only needed for this kind.
  import pyarrow.parquet as pq

  for path in _files(config):
    try:
      parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
      raise InputError(f"corpus file {path!r} is not a readable Parquet file ({e}): replace it "
                       "or remove it from data.source.path.") from e
    columns = parquet.schema_arrow.names
    if config.field not in columns:
      raise InputError(
          f"{path}: no column {config.field!r} (columns: {columns}): set data.source.field to "
          "the column that holds the document text.")
    before = stats.invalid_utf8_documents
    batches = parquet.iter_batches(columns=[config.field], batch_size=1024)
    while True:
      try:
        batch = next(batches, None)
      except (pa.ArrowException, OSError) as e:  # A damaged row group past the footer.
        raise InputError(f"corpus file {path!r} is a damaged Parquet file ({e}): replace it or "
                         "remove it from data.source.path.") from e
      if batch is None:
        break
      for value in batch.column(0).to_pylist():
        if value is None:
          continue
        yield _decode(value, stats) if isinstance(value, bytes) else str(value)
    _warn_invalid(path, stats.invalid_utf8_documents - before, "row(s)")


def _tfds_documents(config: SourceConfig, stats: SourceStats) -> Iterator[str]:
  import tensorflow_datasets as tfds  # Heavy import, only for this kind.

  data_dir = os.path.expanduser(config.data_dir or tfds.core.constants.DATA_DIR)
  base = config.name.split("/")[0].split(":")[0]
  prepared = glob.glob(os.path.join(data_dir, base, "**", "dataset_info.json"), recursive=True)
  if not prepared:
    raise MissingInputError(
        f"TFDS dataset {config.name!r} is not prepared under data_dir {data_dir!r} (no "
        f"{base}/.../dataset_info.json). rpt_jax never downloads: prepare it where there is "
        "network with file_format='array_record' (e.g. `tfds build "
        f"{base} --file_format=array_record --data_dir=...`) and copy the folder here.")
  try:
    source = tfds.data_source(config.name, split=config.split, data_dir=data_dir,
                              download=False, try_gcs=False)
  except Exception as e:  # TFDS raises many types; one clear message for all of them.
    raise InputError(
        f"TFDS dataset {config.name!r} (split {config.split!r}) under {data_dir!r} cannot be "
        f"read for random access ({e}): prepare it with file_format='array_record'.") from e
  chunk = 256
  for start in range(0, len(source), chunk):
    indices = list(range(start, min(start + chunk, len(source))))
    for example in source.__getitems__(indices):
      if config.field not in example:
        raise InputError(
            f"TFDS dataset {config.name!r} has no feature {config.field!r} (features: "
            f"{sorted(example)}): set data.source.field.")
      value = example[config.field]
      yield _decode(value, stats) if isinstance(value, bytes) else str(value)


def _synthetic_documents(config: SourceConfig, stats: SourceStats) -> Iterator[str]:
  del stats
  yield from synthetic_documents(config.synthetic)


SOURCES: dict[str, Callable[[SourceConfig, SourceStats], Iterator[str]]] = {
    "text": _text_documents,
    "jsonl": _jsonl_documents,
    "parquet": _parquet_documents,
    "tfds": _tfds_documents,
    "synthetic": _synthetic_documents,
}


def split_document(text: str, max_chars: int) -> Iterator[str]:
  """Consecutive pieces of `text` (joined, they give `text` back), each at most `max_chars`
  long, cut after a paragraph where possible, else after a line, else between words, else
  anywhere (a single word longer than `max_chars`)."""
  yield from _pack(text, max_chars, 0)


def _pack(text: str, max_chars: int, level: int) -> Iterator[str]:
  if len(text) <= max_chars:
    yield text
    return
  if level == len(_BOUNDARIES):
    yield from (text[i:i + max_chars] for i in range(0, len(text), max_chars))
    return
  current, start = "", 0
  ends = [m.end() for m in _BOUNDARIES[level].finditer(text)]
  if not ends or ends[-1] != len(text):
    ends.append(len(text))
  for end in ends:
    unit, start = text[start:end], end  # up to and including the next boundary
    if len(current) + len(unit) <= max_chars:
      current += unit
      continue
    if current:
      yield current
    current = ""
    if len(unit) <= max_chars:
      current = unit
    else:
      yield from _pack(unit, max_chars, level + 1)
  if current:
    yield current


def iter_documents(config: SourceConfig, stats: SourceStats | None = None) -> Iterator[str]:
  """Yields the non-empty documents of `config` in a deterministic order, each at most
  `config.max_document_chars` long (`split_document`).

  Args:
    config: the source.
    stats: optional counters, updated as documents are read.

  Raises:
    MissingInputError: missing path, or a TFDS dataset not prepared under `data_dir`.
    InputError: a folder without matching files, an unreadable or corrupt file, a JSONL line
      that is not JSON or lacks `field` (file:line), a Parquet file without the column, or a
      source with no non-empty document.
  """
  stats = stats if stats is not None else SourceStats()
  for document in SOURCES[config.kind](config, stats):
    pieces = (split_document(document, config.max_document_chars)
              if config.max_document_chars else (document,))
    for piece in pieces:
      if not piece.strip():
        stats.skipped_empty += 1
        continue
      stats.documents += 1
      yield piece
      if config.max_documents is not None and stats.documents >= config.max_documents:
        return
  if stats.documents == 0:
    where = config.path or config.name or "synthetic"
    raise InputError(
        f"corpus {where!r} (data.source, kind {config.kind!r}) has no non-empty documents "
        f"({stats.skipped_empty} empty skipped): check data.source.path and .field.")


def check_heldout(config: SourceConfig, eval_fraction: float, seed: int) -> None:
  """Raises InputError when `eval_fraction` puts none of the source's documents in the held-out
  split (`records.document_split`), before anything is scored. Reads documents only until the
  first held-out one (about 1 / eval_fraction of them)."""
  count = 0
  for count, _ in enumerate(iter_documents(config), start=1):
    if document_split(count - 1, eval_fraction, seed) == "eval":
      return
  where = config.path or config.name or "the synthetic corpus"
  raise InputError(
      f"data.eval_fraction={eval_fraction} holds out none of the {count} documents of {where}, "
      "so nothing could be evaluated: raise data.eval_fraction, or lower "
      "data.source.max_document_chars so that the corpus gives more documents.")
