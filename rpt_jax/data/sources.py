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

Text that is not valid UTF-8 is decoded with errors='replace' (U+FFFD for each bad byte); the
number of affected documents is counted in `SourceStats.invalid_utf8_documents` and a warning
names each file that had any. Documents that are empty or whitespace-only are skipped (counted).
A source with no documents at all raises ValueError.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import warnings
from typing import Callable, Iterator

from rpt_jax.data.synthetic import SyntheticConfig, synthetic_documents

_EXTENSIONS = {"text": (".txt",), "jsonl": (".jsonl",), "parquet": (".parquet",)}


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
  synthetic: SyntheticConfig = dataclasses.field(default_factory=SyntheticConfig)

  def __post_init__(self):
    if self.kind not in SOURCES:
      raise ValueError(f"source kind {self.kind!r} is unknown; choose one of {sorted(SOURCES)}.")
    if self.kind in _EXTENSIONS and not self.path:
      raise ValueError(f"source kind {self.kind!r} needs `path` (a file or a folder).")
    if self.kind == "tfds" and not self.name:
      raise ValueError("source kind 'tfds' needs `name` (the TFDS dataset name).")
    if self.max_documents is not None and self.max_documents < 1:
      raise ValueError(f"max_documents={self.max_documents}: use None (all) or a count >= 1.")
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
    raise FileNotFoundError(
        f"corpus path {path!r} does not exist; set source.path to a {'/'.join(exts)} file or "
        "a folder of them.")
  if os.path.isfile(path):
    return [path]
  files = sorted(f for f in glob.glob(os.path.join(path, "**", "*"), recursive=True)
                 if os.path.isfile(f) and f.endswith(exts))
  if not files:
    raise ValueError(
        f"corpus folder {path!r} holds no {'/'.join(exts)} files (searched recursively); "
        f"point source.path at the data or change source.kind (now {config.kind!r}).")
  return files


def _warn_invalid(path: str, count: int, unit: str) -> None:
  if count:
    warnings.warn(
        f"{path}: {count} {unit} contained bytes that are not valid UTF-8; they were decoded "
        "with errors='replace' (each bad byte became U+FFFD).", stacklevel=3)


def _text_documents(config: SourceConfig, stats: SourceStats) -> Iterator[str]:
  for path in _files(config):
    with open(path, "rb") as f:
      data = f.read()
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


def _jsonl_documents(config: SourceConfig, stats: SourceStats) -> Iterator[str]:
  for path in _files(config):
    before = stats.invalid_utf8_documents
    with open(path, "rb") as f:
      for line_number, raw in enumerate(f, start=1):
        line = _decode(raw, stats)
        if not line.strip():
          continue
        try:
          obj = json.loads(line)
        except json.JSONDecodeError as e:
          raise ValueError(f"{path}:{line_number}: not valid JSON ({e.msg}).") from None
        if not isinstance(obj, dict) or config.field not in obj:
          keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
          raise ValueError(
              f"{path}:{line_number}: no field {config.field!r} (found {keys}); set "
              "source.field to the key that holds the document text.")
        value = obj[config.field]
        if not isinstance(value, str):
          raise ValueError(
              f"{path}:{line_number}: field {config.field!r} holds a "
              f"{type(value).__name__}, not a string.")
        yield value
    _warn_invalid(path, stats.invalid_utf8_documents - before, "line(s)")


def _parquet_documents(config: SourceConfig, stats: SourceStats) -> Iterator[str]:
  import pyarrow.parquet as pq  # Only needed for this kind.

  for path in _files(config):
    parquet = pq.ParquetFile(path)
    columns = parquet.schema_arrow.names
    if config.field not in columns:
      raise ValueError(
          f"{path}: no column {config.field!r} (columns: {columns}); set source.field to the "
          "column that holds the document text.")
    before = stats.invalid_utf8_documents
    for batch in parquet.iter_batches(columns=[config.field], batch_size=1024):
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
    raise FileNotFoundError(
        f"TFDS dataset {config.name!r} is not prepared under data_dir {data_dir!r} (no "
        f"{base}/.../dataset_info.json). rpt_jax never downloads: prepare it where there is "
        "network with file_format='array_record' (e.g. `tfds build "
        f"{base} --file_format=array_record --data_dir=...`) and copy the folder here.")
  try:
    source = tfds.data_source(config.name, split=config.split, data_dir=data_dir,
                              download=False, try_gcs=False)
  except Exception as e:  # TFDS raises many types; one clear message for all of them.
    raise ValueError(
        f"TFDS dataset {config.name!r} (split {config.split!r}) under {data_dir!r} cannot be "
        f"read for random access: {e}. It must be prepared with file_format='array_record'.") from e
  chunk = 256
  for start in range(0, len(source), chunk):
    indices = list(range(start, min(start + chunk, len(source))))
    for example in source.__getitems__(indices):
      if config.field not in example:
        raise ValueError(
            f"TFDS dataset {config.name!r} has no feature {config.field!r} (features: "
            f"{sorted(example)}); set source.field.")
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


def iter_documents(config: SourceConfig, stats: SourceStats | None = None) -> Iterator[str]:
  """Yields the non-empty documents of `config` in a deterministic order.

  Args:
    config: the source.
    stats: optional counters, updated as documents are read.

  Raises:
    FileNotFoundError: missing path, or a TFDS dataset not prepared under `data_dir`.
    ValueError: a folder without matching files, a JSONL line without `field` (file:line), a
      Parquet file without the column, or a source with no non-empty document.
  """
  stats = stats if stats is not None else SourceStats()
  for document in SOURCES[config.kind](config, stats):
    if not document.strip():
      stats.skipped_empty += 1
      continue
    stats.documents += 1
    yield document
    if config.max_documents is not None and stats.documents >= config.max_documents:
      return
  if stats.documents == 0:
    where = config.path or config.name or "synthetic"
    raise ValueError(
        f"corpus {where!r} (kind {config.kind!r}) has no non-empty documents "
        f"({stats.skipped_empty} empty skipped); check source.path/field.")
