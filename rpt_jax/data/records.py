"""Position records: one selected (document, position) with its context and ground truth.

A `PositionRecord` holds what the RL stages need and nothing to re-derive: the context token
ids (the last `max_prompt_tokens` tokens before the position), the ground-truth continuation as
UTF-8 bytes, and the valid token boundaries within it, taken from the document's OWN
tokenisation (`Tokenizer.encode_with_byte_spans`), never from re-tokenising the snippet.

Serialisation (no pickle): a fixed little-endian header, then three raw arrays.

    offset  type        field
    0       4s          magic b"RPTP"
    4       uint16      format version (1)
    6       int64       doc_id
    14      int32       position
    18      float32     entropy (nats; NaN when not scored)
    22      uint8       proxy_correct (0/1)
    23      uint8       bucket
    24      uint8       split (0 = train, 1 = eval)
    25      uint32      n_context
    29      uint32      n_completion (bytes)
    33      uint32      n_boundaries
    37      int32[n_context] context_ids, then bytes[n_completion], then int32[n_boundaries]

Shards are ArrayRecord files written under a temporary name and renamed into place, so a
file with the final name is always complete.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import struct
from typing import Iterable, Sequence

import numpy as np

MAGIC = b"RPTP"
FORMAT_VERSION = 1
SPLITS = ("train", "eval")
_HEADER = struct.Struct("<4sHqifBBBIII")
# One record per ArrayRecord chunk (Grain reads records at random, one at a time); zstd level 1
# writes ~1.6x faster than the default level 3 at about the same size.
WRITER_OPTIONS = "group_size:1,zstd:1"


@dataclasses.dataclass(eq=False)
class PositionRecord:
  """One training/eval position.

  Attributes:
    doc_id: index of the document in the source stream.
    position: index t of the predicted token in the document's tokenisation (t >= 1).
    context_ids: int32 [<= max_prompt_tokens] the tokens right before t (ids[t-n:t]).
    completion: UTF-8 bytes of tokens t .. t+k-1 (k = completion_tokens, fewer at the end).
    boundaries: int32 [<= k] the cumulative byte lengths of those tokens, strictly increasing,
      all > 0; the last equals len(completion).
    entropy: the proxy's top-k entropy at t (nats).
    proxy_correct: whether the proxy's argmax at t was the true token.
    bucket: difficulty bucket (number of bucket thresholds the entropy exceeds).
    split: 'train' or 'eval'.
  """

  doc_id: int
  position: int
  context_ids: np.ndarray
  completion: bytes
  boundaries: np.ndarray
  entropy: float
  proxy_correct: bool
  bucket: int
  split: str

  def to_bytes(self) -> bytes:
    context = np.ascontiguousarray(self.context_ids, dtype="<i4")
    boundaries = np.ascontiguousarray(self.boundaries, dtype="<i4")
    header = _HEADER.pack(MAGIC, FORMAT_VERSION, self.doc_id, self.position,
                          float(self.entropy), int(bool(self.proxy_correct)), int(self.bucket),
                          SPLITS.index(self.split), context.size, len(self.completion),
                          boundaries.size)
    return b"".join((header, context.tobytes(), self.completion, boundaries.tobytes()))

  @classmethod
  def from_bytes(cls, data: bytes) -> "PositionRecord":
    (magic, version, doc_id, position, entropy, correct, bucket, split, n_ctx, n_completion,
     n_boundaries) = _HEADER.unpack_from(data)
    if magic != MAGIC or version != FORMAT_VERSION:
      raise ValueError(
          f"not an rpt_jax position record (magic {magic!r}, version {version}); expected "
          f"{MAGIC!r} v{FORMAT_VERSION}. Re-run data preparation with this version.")
    offset = _HEADER.size
    context = np.frombuffer(data, "<i4", n_ctx, offset).astype(np.int32)
    offset += 4 * n_ctx
    completion = bytes(data[offset:offset + n_completion])
    offset += n_completion
    boundaries = np.frombuffer(data, "<i4", n_boundaries, offset).astype(np.int32)
    if offset + 4 * n_boundaries != len(data):
      raise ValueError(f"position record has {len(data)} bytes, header says "
                       f"{offset + 4 * n_boundaries}: the record is corrupt.")
    return cls(doc_id, position, context, completion, boundaries, entropy, bool(correct),
               bucket, SPLITS[split])


def document_split(doc_id: int, eval_fraction: float, seed: int) -> str:
  """'eval' for a seeded-hash fraction `eval_fraction` of documents, else 'train'.

  Depends only on (doc_id, seed): streaming, and stable when the corpus grows.
  """
  digest = hashlib.blake2b(f"rpt-split/{seed}/{doc_id}".encode(), digest_size=8).digest()
  return "eval" if int.from_bytes(digest, "little") / 2.0**64 < eval_fraction else "train"


def make_records(doc_id: int, ids: Sequence[int] | np.ndarray,
                 spans: Sequence[tuple[int, int]] | np.ndarray, text_bytes: bytes,
                 positions: Iterable[int], entropy_T: np.ndarray, correct_T: np.ndarray,
                 bucket_T: np.ndarray, split: str, *, max_prompt_tokens: int,
                 completion_tokens: int) -> list[PositionRecord]:
  """Records of one document's selected positions.

  Args:
    doc_id: the document's id.
    ids: [T] the document's token ids.
    spans: [T, 2] (start, end) byte offsets of each token in `text_bytes` (tiling it).
    text_bytes: the document's UTF-8 bytes.
    positions: selected positions t (1 <= t < T).
    entropy_T, correct_T, bucket_T: per-position scores [T].
    split: 'train' or 'eval'.
    max_prompt_tokens: context tokens kept (the last ones before t).
    completion_tokens: tokens of ground truth stored from t on.

  Returns:
    One record per position whose token covers at least one byte (a zero-width token, e.g. a
    SentencePiece word marker with no text, has nothing to predict and is skipped).
  """
  ids = np.asarray(ids, np.int32)
  spans = np.asarray(spans, np.int64).reshape(-1, 2)
  starts, ends = spans[:, 0], spans[:, 1]
  positions = np.asarray(list(positions), np.int64)
  positions = positions[ends[positions] > starts[positions]]  # zero-width: nothing to predict
  n = len(ids)
  cols = positions[:, None] + np.arange(completion_tokens)
  valid = cols < n
  cumulative = np.where(valid, ends[np.minimum(cols, n - 1)] - starts[positions][:, None], 0)
  previous = np.concatenate([np.zeros_like(cumulative[:, :1]), cumulative[:, :-1]], axis=1)
  # Zero-width tokens repeat a boundary; a boundary of 0 would reward an empty answer.
  keep = valid & (cumulative > previous)
  cumulative = cumulative.astype(np.int32)
  first_bytes = starts[positions].tolist()
  last_bytes = ends[np.minimum(positions + completion_tokens, n) - 1].tolist()
  entropy, correct = entropy_T[positions].tolist(), correct_T[positions].tolist()
  bucket = bucket_T[positions].tolist()
  out = []
  for i, t in enumerate(positions.tolist()):
    out.append(PositionRecord(
        doc_id=doc_id, position=t, context_ids=ids[max(0, t - max_prompt_tokens):t],
        completion=text_bytes[first_bytes[i]:last_bytes[i]], boundaries=cumulative[i][keep[i]],
        entropy=entropy[i], proxy_correct=bool(correct[i]), bucket=int(bucket[i]), split=split))
  return out


class ShardWriter:
  """Streams records into ArrayRecord file `path` under a temporary name.

  `commit()` renames it into place (or, with no record written, leaves no file); `abort()`
  deletes it. A file with the final name is therefore always complete.
  """

  def __init__(self, path: str):
    self.path, self.count, self._writer = path, 0, None

  def write(self, record: PositionRecord) -> None:
    if self._writer is None:
      from array_record.python.array_record_module import ArrayRecordWriter
      self._writer = ArrayRecordWriter(self.path + ".tmp", WRITER_OPTIONS)
    self._writer.write(record.to_bytes())
    self.count += 1

  def commit(self) -> int:
    if self._writer is not None:
      self._writer.close()
      self._writer = None
      os.replace(self.path + ".tmp", self.path)
    return self.count

  def abort(self) -> None:
    if self._writer is not None:
      self._writer.close()
      self._writer = None
      os.remove(self.path + ".tmp")


def write_shard(path: str, records: Iterable[PositionRecord]) -> int:
  """Writes `records` to ArrayRecord file `path` atomically; returns the count."""
  writer = ShardWriter(path)
  try:
    for record in records:
      writer.write(record)
  except BaseException:
    writer.abort()
    raise
  return writer.commit()


def read_shard(path: str) -> list[PositionRecord]:
  """All records of one ArrayRecord shard, in file order."""
  from array_record.python.array_record_module import ArrayRecordReader

  reader = ArrayRecordReader(path)
  try:
    return [PositionRecord.from_bytes(r) for r in reader.read_all()]
  finally:
    reader.close()
