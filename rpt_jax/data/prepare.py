"""Offline data preparation: corpus -> tokens -> proxy scores -> filter -> ArrayRecord shards.

`prepare(config, tokenizer, proxy_model, out_dir)` runs the whole stage and returns the manifest.
Documents are processed in "document shards" of `docs_per_shard` consecutive documents; each
shard is tokenised, scored by the proxy on device, filtered, split train/eval by document, and
written as `{split}-{shard:05d}.arrayrecord` (only when it has records).

Output folder:
    manifest.json               written last: its presence means the preparation is complete
    train-00000.arrayrecord     position records (rpt_jax.data.records), per split and shard
    eval-00000.arrayrecord
    progress/identity.json      what made this folder (config, tokenizer and proxy identity)
    progress/shard-00000.json   completion marker of shard 0: its files and counts

Determinism: outputs are a pure function of (config, corpus, tokenizer, proxy weights, device
numerics); no timestamps or absolute paths are written, so two runs give byte-identical files.
Resume: every file is written under a temporary name and renamed; a shard's marker is written
after its files. Re-running with the same arguments skips shards that have a marker, redoes
any other shard, and finishes the manifest. A folder made with a different identity is refused;
the proxy's part of the identity is an exact checksum of its weight bits, so the same weights
resume on any mesh or process count.

Several processes (a mesh over several hosts): every process runs `prepare`; shards go to the
scorer's feed groups in turn and all processes score together, each feeding its own windows
(see `prepare`). Records are the same as one process writes, to fp32 reduction order.
"""

from __future__ import annotations

import dataclasses
import glob
import itertools
import json
import os
from typing import Any, Iterator, Mapping

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from rpt_jax.data import filtering, records
from rpt_jax.data.fingerprints import proxy_identity, tokenizer_identity
from rpt_jax.data.manifest import MANIFEST, finish_manifest, read_json, split_counts, write_json
from rpt_jax.data.sources import SourceConfig, SourceStats, iter_documents

PROGRESS = "progress"


@dataclasses.dataclass(frozen=True)
class PrepareConfig:
  """Everything that decides the prepared data (part of the output folder's identity).

  Attributes:
    source: the corpus.
    filter: position filter name in `filtering.FILTERS` ('entropy', 'proxy_miss', 'random',
      'all').
    entropy_threshold: keep positions with top-k entropy >= this (nats; 'entropy', 'random').
    topk: logits kept for the entropy (the paper: 16).
    bucket_thresholds: increasing entropy thresholds of the difficulty buckets.
    min_context_tokens: positions with fewer tokens before them are skipped.
    max_prompt_tokens: context tokens stored per record (the last ones before the position).
    completion_tokens: ground-truth tokens stored per record (bytes + boundaries).
    max_positions_per_document: cap on kept positions per document, drawn uniformly (None: no
      cap).
    score_seq_len: proxy window length L (tokens); also the most context a position is scored
      with.
    score_overlap: tokens shared by consecutive windows of a long document (each position past
      the first window is scored with at least this much context).
    score_batch_size: windows per proxy call (a multiple of the mesh's data x fsdp size).
    logits_chunk: positions per logits chunk inside the scorer (None: all at once).
    eval_fraction: fraction of documents (seeded hash of the document id) that go to 'eval'.
    seed: seeds the split, the 'random' filter and the per-document cap.
    docs_per_shard: documents per output shard (and per resume step).
    tokenizer_id, proxy_id: free-form names recorded in the manifest (e.g. their paths).
  """

  source: SourceConfig = dataclasses.field(default_factory=SourceConfig)
  filter: str = "entropy"
  entropy_threshold: float = 0.5
  topk: int = 16
  bucket_thresholds: tuple[float, ...] = filtering.DEFAULT_BUCKET_THRESHOLDS
  min_context_tokens: int = 16
  max_prompt_tokens: int = 1024
  completion_tokens: int = 8
  max_positions_per_document: int | None = None
  score_seq_len: int = 512
  score_overlap: int = 128
  score_batch_size: int = 8
  logits_chunk: int | None = 128
  eval_fraction: float = 0.1
  seed: int = 0
  docs_per_shard: int = 256
  tokenizer_id: str = ""
  proxy_id: str = ""

  def __post_init__(self):
    if isinstance(self.source, Mapping):
      object.__setattr__(self, "source", SourceConfig(**self.source))
    object.__setattr__(self, "bucket_thresholds", tuple(float(t) for t in self.bucket_thresholds))
    try:
      filtering.get_filter(self.filter)
    except ValueError as e:
      raise ValueError(f"filter: {e}") from None
    thresholds = self.bucket_thresholds
    if any(b <= a for a, b in zip(thresholds, thresholds[1:])):
      raise ValueError(f"bucket_thresholds={thresholds} must be strictly increasing.")
    for name in ("topk", "min_context_tokens", "max_prompt_tokens", "completion_tokens",
                 "score_batch_size", "docs_per_shard"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name}={getattr(self, name)} must be >= 1.")
    if self.score_seq_len < 2:
      raise ValueError(f"score_seq_len={self.score_seq_len} must be >= 2.")
    if not 0 <= self.score_overlap < self.score_seq_len:
      raise ValueError(f"score_overlap={self.score_overlap} must be in [0, score_seq_len="
                       f"{self.score_seq_len}).")
    if not 0.0 <= self.eval_fraction <= 1.0:
      raise ValueError(f"eval_fraction={self.eval_fraction} must be in [0, 1].")
    if self.max_positions_per_document is not None and self.max_positions_per_document < 1:
      raise ValueError(f"max_positions_per_document={self.max_positions_per_document}: use None "
                       "(no cap) or a count >= 1.")
    if self.logits_chunk is not None and self.logits_chunk < 1:
      raise ValueError(f"logits_chunk={self.logits_chunk}: use None or a count >= 1.")

  def to_dict(self) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(self)))


def _shards(documents: Iterator[str], size: int) -> Iterator[list[str]]:
  while chunk := list(itertools.islice(documents, size)):
    yield chunk


@dataclasses.dataclass(frozen=True)
class RoundPlan:
  """Which document shard each feed group prepares in each round, known before anything runs.

  Round r gives shard r * num_groups + g to feed group g (None past the last shard). Every
  process walks the same rounds in lockstep (each round is one collective step: the scorer
  calls of all groups run together), so the plan is also the schedule of cross-process calls.
  """

  num_shards: int
  num_groups: int

  @classmethod
  def for_documents(cls, num_documents: int, docs_per_shard: int,
                    num_groups: int) -> "RoundPlan":
    return cls(-(-num_documents // docs_per_shard), num_groups)

  @property
  def rounds(self) -> list[tuple[int | None, ...]]:
    g = self.num_groups
    return [tuple(s if s < self.num_shards else None for s in range(r * g, (r + 1) * g))
            for r in range(-(-self.num_shards // g))]


class _ShardWork:
  """One document shard, tokenised: what `_process_shard` scores and writes."""

  def __init__(self, shard: int, first_doc_id: int, documents: list[str],
               config: PrepareConfig, tokenizer):
    self.shard, self.first_doc_id, self.documents = shard, first_doc_id, documents
    self.encoded = [tokenizer.encode_with_byte_spans(d) for d in documents]
    self.ids = [np.asarray(e[0], np.int32) for e in self.encoded]
    # A document needs a token at t >= max(1, min_context_tokens) to give any position.
    self.usable = [i for i, x in enumerate(self.ids) if len(x) > max(1, config.min_context_tokens)]
    self.overlap, self.seq_len, self.pad_id = (config.score_overlap, config.score_seq_len,
                                               tokenizer.pad_id)

  def num_batches(self, rows: int) -> int:
    return filtering.count_batches([self.ids[i] for i in self.usable], rows=rows,
                                   seq_len=self.seq_len, overlap=self.overlap)


def _process_shard(work: _ShardWork, config: PrepareConfig, scorer: filtering.ProxyScorer,
                   out_dir: str, *, num_batches: int | None = None,
                   write: bool = True) -> dict[str, Any] | None:
  """Scores, filters and (when `write`) writes one document shard; returns its marker."""
  ids, encoded, documents = work.ids, work.encoded, work.documents
  usable = work.usable
  counts = {s: split_counts(config.bucket_thresholds) for s in records.SPLITS}
  marker = {"shard": work.shard, "documents": len(documents),
            "short_documents": len(documents) - len(usable), "positions_scored": 0,
            "positions_selected": 0, "max_completion_bytes": 0}
  # Records stream to disk while the next windows are scored (writers open temp files lazily).
  writers = {s: records.ShardWriter(os.path.join(out_dir, f"{s}-{work.shard:05d}.arrayrecord"))
             for s in records.SPLITS} if write else {}
  try:
    scored = filtering.score_documents(scorer, [ids[i] for i in usable],
                                       overlap=config.score_overlap, pad_id=work.pad_id,
                                       num_batches=num_batches)
    for j, entropy_T, argmax_T in scored:
      if not write:
        continue  # A non-leader of a feed group: its scorer calls are all it owes.
      i = usable[j]
      doc_id = work.first_doc_id + i
      correct_T = argmax_T == ids[i]
      positions = filtering.select_positions(
          entropy_T, correct_T, filter_name=config.filter, threshold=config.entropy_threshold,
          min_context_tokens=config.min_context_tokens,
          rng=filtering.document_rng(config.seed, doc_id),
          max_positions=config.max_positions_per_document)
      split = records.document_split(doc_id, config.eval_fraction, config.seed)
      recs = records.make_records(
          doc_id, ids[i], encoded[i][1], documents[i].encode("utf-8"), positions, entropy_T,
          correct_T, filtering.difficulty_buckets(entropy_T, config.bucket_thresholds), split,
          max_prompt_tokens=config.max_prompt_tokens,
          completion_tokens=config.completion_tokens)
      marker["positions_scored"] += int(np.sum(np.isfinite(entropy_T)))
      marker["positions_selected"] += len(positions)
      counts[split]["documents"] += 1
      for r in recs:
        writers[split].write(r)
        counts[split]["buckets"][str(r.bucket)] += 1
        marker["max_completion_bytes"] = max(marker["max_completion_bytes"], len(r.completion))
  except BaseException:
    for writer in writers.values():
      writer.abort()
    raise
  if not write:
    return None
  files = {}
  for split, writer in writers.items():
    counts[split]["records"] = writer.commit()
    if counts[split]["records"]:
      files[split] = os.path.basename(writer.path)
  marker.update(files=files, counts=counts)
  return marker


def prepare(config: PrepareConfig, tokenizer, proxy_model: nnx.Module, out_dir: str, *,
            mesh: Mesh | None = None, show_progress: bool = True) -> dict[str, Any]:
  """Runs the data stage end to end and returns the manifest (also in out_dir/manifest.json).

  Args:
    config: the preparation config.
    tokenizer: an `rpt_jax.tokenizer.Tokenizer` (encode_with_byte_spans, pad_id, vocab_size).
    proxy_model: the NNX proxy `Transformer` that scores positions.
    out_dir: output folder (created). Re-running on a finished folder returns its manifest.
    mesh: shard the scorer's batch over ('data', 'fsdp') of this mesh. A mesh over several
      processes (every process calls `prepare` with the same arguments; out_dir on a shared
      file system): the processes take document shards in turn, one shard per feed group
      (`rpt_jax.host_rows`) per round, and score them together in one SPMD program, each group
      feeding its own windows; a group's leader writes its shards' records and markers and
      process 0 the identity and the manifest.
    show_progress: tqdm progress bar over documents.

  Returns:
    The manifest dict.

  Raises:
    ValueError / FileNotFoundError: bad source, a tokenizer with more ids than the proxy's
      vocabulary, score_seq_len beyond the proxy's context (all before anything is written), an
      out_dir made with another identity, or no position selected at all (the folder is then
      removed).
  """
  from tqdm.auto import tqdm  # Only for the progress bar.

  model_config = getattr(proxy_model, "config", None)
  if model_config is not None:
    from rpt_jax.tokenizer import check_vocab_fits
    check_vocab_fits(tokenizer, model_config.vocab_size)
    model_config.check_context_length(config.score_seq_len)
  identity = {"config": config.to_dict(), "tokenizer": tokenizer_identity(tokenizer),
              "proxy": proxy_identity(proxy_model)}
  sync = _Sync(mesh)
  manifest_path = os.path.join(out_dir, MANIFEST)
  progress_dir = os.path.join(out_dir, PROGRESS)
  identity_path = os.path.join(progress_dir, "identity.json")
  for existing in (manifest_path, identity_path):
    if os.path.exists(existing):
      found = read_json(existing)
      found = found.get("identity", found)
      if found != identity:
        raise ValueError(
            f"{out_dir!r} holds data prepared with another config, tokenizer or proxy "
            f"({existing}); use a new out_dir or delete it.")
      if existing == manifest_path:
        return read_json(manifest_path)

  stats = SourceStats()
  documents = iter_documents(config.source, stats)
  first = next(documents)  # Raises for a missing/empty corpus before anything is created.
  created = not os.path.exists(out_dir)
  sync.barrier("prepare:checked")  # Every process has read the folder before process 0 writes.
  if sync.main:
    os.makedirs(progress_dir, exist_ok=True)
    for stale in glob.glob(os.path.join(out_dir, "*.tmp")) + glob.glob(
        os.path.join(progress_dir, "*.tmp")):
      os.remove(stale)  # Left by an interrupted run; never mistaken for output.
    write_json(identity_path, identity)
  sync.barrier("prepare:started")

  scorer = filtering.make_proxy_scorer(
      proxy_model, mesh=mesh, batch_size=config.score_batch_size, seq_len=config.score_seq_len,
      k=config.topk, logits_chunk=config.logits_chunk)
  feed = scorer.feed
  leader = sync.group_leader(feed)
  # The corpus is read twice: once to count it (the plan), once to score it.
  num_documents = sum(1 for _ in iter_documents(config.source))
  plan = RoundPlan.for_documents(num_documents, config.docs_per_shard, feed.num_groups)
  shards = _shards(itertools.chain([first], documents), config.docs_per_shard)
  with tqdm(total=num_documents, unit="doc", desc="prepare", disable=not show_progress) as bar:
    for shards_of_group in plan.rounds:
      batch = list(itertools.islice(shards, sum(s is not None for s in shards_of_group)))
      mine = shards_of_group[feed.group]  # None: no shard left for this group (it only pads).
      marker_path = (None if mine is None else
                     os.path.join(progress_dir, f"shard-{mine:05d}.json"))
      # The group follows its leader's view of the marker (a file system may lag elsewhere).
      done = sync.flag_of(leader, marker_path is None or os.path.exists(marker_path))
      work = _ShardWork(mine or 0, (mine or 0) * config.docs_per_shard,
                        [] if done else batch[feed.group], config, tokenizer)
      # Collective: every process dispatches the same number of scorer batches (padding when
      # its group has fewer windows, or nothing left to do this round).
      calls = sync.max(work.num_batches(scorer.rows_per_call))
      if calls or not done:
        marker = _process_shard(work, config, scorer, out_dir, num_batches=calls,
                                write=feed.leader and not done)
        if marker is not None:
          write_json(marker_path, marker)
      bar.update(sum(len(d) for d in batch))
  if next(shards, None) is not None:
    raise ValueError(f"the corpus {config.source.path or config.source.kind!r} changed while "
                     "it was read (more documents the second time); prepare from a stable copy.")
  num_shards = plan.num_shards

  sync.barrier("prepare:scored")
  marker_paths = [os.path.join(progress_dir, f"shard-{s:05d}.json") for s in range(num_shards)]
  error = None
  if sync.main:
    try:
      manifest = finish_manifest(identity, marker_paths, stats, config, progress_dir, out_dir, created)
      write_json(manifest_path, manifest)
    except (ValueError, FileNotFoundError) as e:  # Raised on every process, below.
      error = e
  if not sync.all_ok(error is None):
    if error is not None:
      raise error
    raise RuntimeError("data preparation failed on process 0; see its log.")
  return read_json(manifest_path)


class _Sync:
  """The few cross-process steps of `prepare` (no-ops for a single process)."""

  def __init__(self, mesh: Mesh | None):
    procs = {d.process_index for d in mesh.devices.flat} if mesh is not None else set()
    self.multi = len(procs) > 1
    self.main = jax.process_index() == 0 or not self.multi

  def barrier(self, name: str) -> None:
    if self.multi:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(f"rpt_jax:{name}")

  def _gather(self, value: int) -> np.ndarray:
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(np.int32(value))).reshape(-1)

  def max(self, value: int) -> int:
    return int(np.max(self._gather(value))) if self.multi else int(value)

  def all_ok(self, ok: bool) -> bool:
    return bool(np.min(self._gather(int(ok)))) if self.multi else ok

  def group_leader(self, feed) -> int:
    """The process index of the leader of this process's feed group (one gather, once)."""
    if not self.multi:
      return 0
    leaders = self._gather(jax.process_index() if feed.leader else -1)
    groups = self._gather(feed.group)
    return int(max(p for p, g in zip(leaders, groups) if g == feed.group))

  def flag_of(self, process: int, flag: bool) -> bool:
    """`flag` as `process` sees it (every process calls this with its own flag)."""
    return bool(self._gather(int(flag))[process]) if self.multi else flag
