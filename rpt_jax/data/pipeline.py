"""Grain loader: prepared position records -> static-shape prompt batches (numpy, per process).

Per record (in Grain workers): parse the record, decode its context ids to text and build the
prompt ids with `rpt_jax.rl.prompts.build_prompt_ids` (template + the policy's chat template).
A prompt longer than the largest bucket is left-truncated: context tokens are dropped from its
START (the instruction and chat markers are kept) until it fits; `PromptBatch.truncated` marks
such rows and the iterator counts them.

Per batch: rows are right-padded with the tokenizer's pad id to the smallest `prompt_buckets`
length that fits the batch's longest prompt, so the device sees only a few static shapes.
Completions and boundaries are padded to static widths from the manifest.

Order (`GlobalBatchSampler`): ONE seeded global shuffle of all records (a new one per epoch,
Grain's `IndexSampler`), cut into global batches of `batch_size * shard_count` records; each
process reads its own rows of every global batch (by default the contiguous block
`shard_index`; `rows=` for any other layout of the batch over processes). Global batch k is
therefore the same records in the same row order for every process count: a run's data does not
depend on how many hosts read it. The iterator's `get_state`/`set_state` (JSON bytes from Grain)
resume exactly at the next batch; `seek(n)` jumps to global batch n (a restore under another
process count, whose Grain state cannot be re-split).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
from typing import Any, Callable, Sequence

import grain.python as grain
import jax
import numpy as np

from rpt_jax.data.manifest import MANIFEST, MANIFEST_FORMAT
from rpt_jax.errors import InputError, MissingInputError
from rpt_jax.data.records import SPLITS, PositionRecord
from rpt_jax.rl import prompts


@dataclasses.dataclass
class PromptBatch:
  """A batch of B prompts (numpy). Lb is a bucket length; Cb, K are static per dataset.

  Attributes:
    prompt_tokens: int32 [B, Lb] prompt ids, right-padded with the tokenizer's pad id.
    prompt_lengths: int32 [B] real tokens per row.
    completion_bytes: uint8 [B, Cb] ground-truth continuation bytes, zero-padded.
    completion_lengths: int32 [B] bytes per row.
    boundaries: int32 [B, K] cumulative token byte lengths, padded with 0.
    num_boundaries: int32 [B] boundaries per row.
    doc_id: int64 [B]; position: int32 [B]; bucket: int32 [B]; entropy: float32 [B];
    proxy_correct: bool [B]; truncated: bool [B] (prompt left-truncated to fit).
  """

  prompt_tokens: np.ndarray
  prompt_lengths: np.ndarray
  completion_bytes: np.ndarray
  completion_lengths: np.ndarray
  boundaries: np.ndarray
  num_boundaries: np.ndarray
  doc_id: np.ndarray
  position: np.ndarray
  bucket: np.ndarray
  entropy: np.ndarray
  proxy_correct: np.ndarray
  truncated: np.ndarray

  def __len__(self) -> int:
    return self.prompt_tokens.shape[0]

  def completions(self) -> list[bytes]:
    """The ground-truth completion bytes of each row (for the reward)."""
    return [row[:n].tobytes() for row, n in zip(self.completion_bytes, self.completion_lengths)]

  def boundary_lists(self) -> list[list[int]]:
    """The valid token boundaries of each row (for the reward)."""
    return [row[:n].tolist() for row, n in zip(self.boundaries, self.num_boundaries)]


def read_manifest(data_dir: str) -> dict[str, Any]:
  """The manifest of a finished preparation; a clear error when there is none."""
  path = os.path.join(data_dir, MANIFEST)
  if not os.path.exists(path):
    raise MissingInputError(
        f"{path} not found: {data_dir!r} is not a finished data preparation. Run "
        "rpt_jax.data.prepare.prepare(...) (it resumes an interrupted run) first.")
  with open(path) as f:
    try:
      manifest = json.load(f)
    except json.JSONDecodeError:
      manifest = None
  if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
    raise InputError(f"{path} is not an rpt_jax position-record manifest: point "
                     "data.records_dir at a folder rpt_jax prepared, or delete that folder.")
  return manifest


class _BuildPrompt(grain.MapTransform):
  """Record bytes -> dict with the prompt ids (left-truncated to `max_tokens`) and fields."""

  def __init__(self, tokenizer, template: str, max_tokens: int):
    prompts.get_template(template)  # Unknown names fail here, not inside a worker.
    self._tokenizer, self._template, self._max_tokens = tokenizer, template, max_tokens

  def map(self, data: bytes) -> dict[str, Any]:
    record = PositionRecord.from_bytes(data)
    ids, truncated = prompts.fitted_prompt_ids(record.context_ids, self._tokenizer,
                                               self._template, self._max_tokens)
    return {"prompt": np.asarray(ids, np.int32), "record": record, "truncated": truncated}


def _collate(rows: Sequence[dict[str, Any]], *, buckets: tuple[int, ...], pad_id: int,
             completion_width: int, boundary_width: int) -> dict[str, np.ndarray]:
  """Pads a list of per-record dicts into one batch dict (see `PromptBatch`)."""
  b = len(rows)
  longest = max(len(r["prompt"]) for r in rows)
  width = next(n for n in buckets if n >= longest)
  out = {
      "prompt_tokens": np.full((b, width), pad_id, np.int32),
      "prompt_lengths": np.zeros(b, np.int32),
      "completion_bytes": np.zeros((b, completion_width), np.uint8),
      "completion_lengths": np.zeros(b, np.int32),
      "boundaries": np.zeros((b, boundary_width), np.int32),
      "num_boundaries": np.zeros(b, np.int32),
      "doc_id": np.zeros(b, np.int64),
      "position": np.zeros(b, np.int32),
      "bucket": np.zeros(b, np.int32),
      "entropy": np.zeros(b, np.float32),
      "proxy_correct": np.zeros(b, bool),
      "truncated": np.zeros(b, bool),
  }
  for i, row in enumerate(rows):
    prompt, rec = row["prompt"], row["record"]
    out["prompt_tokens"][i, :len(prompt)] = prompt
    out["prompt_lengths"][i] = len(prompt)
    out["completion_bytes"][i, :len(rec.completion)] = np.frombuffer(rec.completion, np.uint8)
    out["completion_lengths"][i] = len(rec.completion)
    out["boundaries"][i, :len(rec.boundaries)] = rec.boundaries
    out["num_boundaries"][i] = len(rec.boundaries)
    out["doc_id"][i], out["position"][i] = rec.doc_id, rec.position
    out["bucket"][i], out["entropy"][i] = rec.bucket, rec.entropy
    out["proxy_correct"][i], out["truncated"][i] = rec.proxy_correct, row["truncated"]
  return out


class GlobalBatchSampler:
  """Grain sampler of this process's rows of seeded global batches (see the module docstring).

  Grain asks for local indices j = 0, 1, ...; with `worker_count` W > 0 it hands index j to worker
  j % W, each worker batches its own indices, and the batches come out round-robin over workers.
  The map below inverts that, so local batch n (as the iterator yields it) always holds rows
  `rows` of global batch n, for any W.
  """

  def __init__(self, num_records: int, *, global_batch: int, rows: Sequence[int], shuffle: bool,
               seed: int, num_epochs: int | None, worker_count: int = 0, first_batch: int = 0):
    self._base = grain.IndexSampler(num_records=num_records, shard_options=grain.NoSharding(),
                                    shuffle=shuffle, num_epochs=num_epochs, seed=seed)
    self.global_batch, self.rows = int(global_batch), tuple(int(r) for r in rows)
    self._workers = max(int(worker_count), 1)
    self._args = (num_records, shuffle, seed, num_epochs)
    self.first_batch = int(first_batch)  # Local batch n is global batch first_batch + n.
    b = len(self.rows)
    full = None if num_epochs is None else max(
        num_epochs * num_records // self.global_batch - self.first_batch, 0)
    # Only whole global batches: with num_epochs, the last partial one is dropped everywhere.
    self._len = sys.maxsize if full is None else full * b

  def __len__(self) -> int:
    return self._len

  def __repr__(self) -> str:  # Grain checks a restored state against this.
    return (f"GlobalBatchSampler(records={self._args[0]}, global_batch={self.global_batch}, "
            f"rows={list(self.rows)}, shuffle={self._args[1]}, seed={self._args[2]}, "
            f"num_epochs={self._args[3]}, workers={self._workers}, first_batch={self.first_batch})")

  def __getitem__(self, index: int):
    if not 0 <= index < self._len:
      raise IndexError(f"index {index} out of range [0, {self._len}).")
    w, q = index % self._workers, index // self._workers
    b = len(self.rows)
    batch = self.first_batch + (q // b) * self._workers + w
    return self._base[batch * self.global_batch + self.rows[q % b]]


class PromptIterator:
  """Iterator over `PromptBatch`es with Grain's checkpointable state.

  `loader_at(n)` builds the Grain loader whose first batch is global batch n (`PromptLoader.at`).
  """

  def __init__(self, loader_at: Callable[[int], grain.DataLoader]):
    self._loader_at = loader_at
    self.grain_iterator = iter(loader_at(0))  # For Orbax: grain.PyGrainCheckpointSave(it).
    self.truncated_prompts = 0

  def __iter__(self) -> "PromptIterator":
    return self

  def __next__(self) -> PromptBatch:
    batch = PromptBatch(**next(self.grain_iterator))
    self.truncated_prompts += int(batch.truncated.sum())
    return batch

  def get_state(self) -> bytes:
    """Opaque (JSON) bytes; `set_state` on a fresh iterator continues with the next batch."""
    return self.grain_iterator.get_state()

  def set_state(self, state: bytes) -> None:
    """Raises ValueError for a state Grain refuses (another loader layout or data folder)."""
    self.grain_iterator.set_state(state)

  def seek(self, num_batches: int) -> None:
    """Continues with batch `num_batches` (0-based) of the sequence, as if that many batches had
    been read. Batch n is global batch n on every process count, so this restores the data
    position of a checkpoint written under another process count. A new Grain loader starts at
    that batch (its sampler is offset); no Grain state is edited."""
    if num_batches < 0:
      raise ValueError(f"seek({num_batches}): the batch number must be >= 0.")
    self.grain_iterator = iter(self._loader_at(int(num_batches)))


class PromptLoader:
  """Grain pipeline over one split of a prepared folder (see the module docstring).

  Args:
    data_dir: folder written by `rpt_jax.data.prepare.prepare`.
    split: 'train' or 'eval'.
    tokenizer: the policy's tokenizer (decode, encode, apply_chat_template, pad_id). With
      worker_count > 0 it must be picklable.
    batch_size: rows per batch on THIS process (global batch / process count).
    template: prompt template name (`rpt_jax.rl.prompts.TEMPLATES`).
    prompt_buckets: increasing static prompt lengths; the last is the longest prompt.
    seed: shuffle seed.
    shuffle: shuffle records (a new order every epoch).
    num_epochs: passes over the data; None repeats forever.
    shard_index, shard_count: this process's slice; default jax.process_index()/count().
      A global batch is batch_size * shard_count records; this process reads its contiguous
      block shard_index of each.
    rows: which rows of each global batch this process reads, in order (overrides the block
      of shard_index); e.g. the rows this process's devices hold under the batch sharding
      (`rpt_jax.train.process_batch_rows`). len(rows) == batch_size.
    worker_count: Grain worker processes (0: in this process). Grain batches inside each
      worker, so which records share a batch depends on worker_count: keep it fixed across a
      restart that restores iterator state.
    drop_remainder: drop the last incomplete batch (keeps the batch shape static).
  """

  def __init__(self, data_dir: str, split: str, tokenizer, *, batch_size: int,
               template: str = "v0", prompt_buckets: Sequence[int] = (128, 256, 512),
               seed: int = 0, shuffle: bool = True, num_epochs: int | None = None,
               shard_index: int | None = None, shard_count: int | None = None,
               rows: Sequence[int] | None = None, worker_count: int = 0,
               drop_remainder: bool = True):
    if split not in SPLITS:
      raise ValueError(f"split {split!r} is unknown; choose one of {SPLITS}.")
    buckets = tuple(int(n) for n in prompt_buckets)
    if not buckets or any(b <= a for a, b in zip(buckets, buckets[1:])) or buckets[0] < 1:
      raise ValueError(f"prompt_buckets={prompt_buckets} must be increasing positive lengths.")
    if batch_size < 1:
      raise ValueError(f"batch_size={batch_size} must be >= 1.")
    self.manifest = read_manifest(data_dir)
    files = [os.path.join(data_dir, f) for f in self.manifest["files"][split]]
    if not files:
      raise ValueError(f"{data_dir!r} has no {split!r} records (see its manifest counts); "
                       "change eval_fraction or the filter when preparing.")
    shard_index = jax.process_index() if shard_index is None else shard_index
    shard_count = jax.process_count() if shard_count is None else shard_count
    self.source = grain.ArrayRecordDataSource(files)
    self.num_records = len(self.source)
    if self.num_records < shard_count * batch_size and drop_remainder:
      raise ValueError(
          f"{split!r} has {self.num_records} records, fewer than one batch of {batch_size} per "
          f"process for {shard_count} processes; lower the batch size or prepare more data.")
    global_batch = batch_size * shard_count
    rows = (range(shard_index * batch_size, (shard_index + 1) * batch_size) if rows is None
            else [int(r) for r in rows])
    if len(rows) != batch_size or len(set(rows)) != batch_size or not all(
        0 <= r < global_batch for r in rows):
      raise ValueError(f"rows={list(rows)} must be {batch_size} distinct rows of the global "
                       f"batch of {global_batch} (batch_size x shard_count).")
    self._sampler_args = dict(global_batch=global_batch, rows=rows, shuffle=shuffle, seed=seed,
                              num_epochs=num_epochs, worker_count=worker_count)
    self.batch_size, self.worker_count = batch_size, worker_count
    completion_tokens = self.manifest["identity"]["config"]["completion_tokens"]
    collate = functools.partial(
        _collate, buckets=buckets, pad_id=int(tokenizer.pad_id),
        completion_width=int(self.manifest["max_completion_bytes"]),
        boundary_width=int(completion_tokens))
    self.operations = [
        _BuildPrompt(tokenizer, template, buckets[-1]),
        grain.Batch(batch_size, drop_remainder=drop_remainder, batch_fn=collate),
    ]
    if worker_count > 0:
      from absl import flags  # Grain's worker processes read absl flags.
      if not flags.FLAGS.is_parsed():  # Outside an absl app (tests, notebooks): use defaults.
        flags.FLAGS.mark_as_parsed()

  def at(self, first_batch: int) -> grain.DataLoader:
    """The Grain loader whose first batch is global batch `first_batch`."""
    sampler = GlobalBatchSampler(self.num_records, first_batch=first_batch,
                                 **self._sampler_args)
    return grain.DataLoader(data_source=self.source, sampler=sampler,
                            operations=self.operations, worker_count=self.worker_count,
                            shard_options=grain.NoSharding())

  def __iter__(self) -> PromptIterator:
    return PromptIterator(self.at)


def make_prompt_loader(data_dir: str, split: str, tokenizer, **kwargs) -> PromptLoader:
  """`PromptLoader(data_dir, split, tokenizer, **kwargs)` (see its arguments)."""
  return PromptLoader(data_dir, split, tokenizer, **kwargs)
