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
import hashlib
import itertools
import json
import os
import shutil
import time
import warnings
from typing import Any, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from rpt_jax.data import filtering, records
from rpt_jax.data.sources import SourceConfig, SourceStats, iter_documents

MANIFEST = "manifest.json"
MARKER_WAIT_S = 60.0  # how long process 0 waits for other hosts' shard markers to appear
PROGRESS = "progress"
MANIFEST_FORMAT = "rpt_jax.position_records"
_TOKENIZER_PROBE = ("The quick brown fox jumps over 13 lazy dogs: 4827 + 3596 = 8423. "
                    "é ü 数学 😀\n")


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
    filtering.get_filter(self.filter)  # Raises for an unknown name.
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


def tokenizer_identity(tokenizer) -> dict[str, Any]:
  """Class, special ids, vocab size and a fingerprint of how a fixed probe text encodes."""
  probe = [int(i) for i in tokenizer.encode(_TOKENIZER_PROBE)]
  return {
      "class": type(tokenizer).__name__,
      "vocab_size": int(tokenizer.vocab_size),
      "bos_id": getattr(tokenizer, "bos_id", None),
      "eos_id": getattr(tokenizer, "eos_id", None),
      "pad_id": getattr(tokenizer, "pad_id", None),
      "probe_sha256": hashlib.sha256(json.dumps(probe).encode()).hexdigest(),
  }


def _uint32_bits(x: jax.Array) -> jax.Array:
  """The bit pattern of every element as uint32 (1, 2 and 4-byte dtypes)."""
  unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}.get(jnp.dtype(x.dtype).itemsize)
  if unsigned is None:
    raise ValueError(f"proxy parameter dtype {x.dtype} has no 1, 2 or 4-byte bit pattern.")
  return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _bit_checksums(x: jax.Array) -> jax.Array:
  """[2] uint32: the wrapping sums of x's bits and of its bits times an odd hash of the flat
  index. Integer sums are exact in any order, so every mesh and process count gives the same
  numbers; the index is built from per-axis iotas, so sharded parameters stay in place."""
  bits = _uint32_bits(x)
  index = jnp.zeros(x.shape, jnp.uint32)
  for axis in range(x.ndim):
    index = index * jnp.uint32(x.shape[axis]) + jax.lax.broadcasted_iota(
        jnp.uint32, x.shape, axis)
  weight = index * jnp.uint32(2654435761) + jnp.uint32(1)  # Knuth's multiplicative hash, odd
  return jnp.stack([jnp.sum(bits, dtype=jnp.uint32), jnp.sum(bits * weight, dtype=jnp.uint32)])


def proxy_identity(model: nnx.Module) -> dict[str, Any]:
  """Parameter count and a fingerprint of every parameter's path, shape, dtype and exact bits
  (`_bit_checksums`): the same for the same weights on any mesh, device or process count."""
  state = nnx.state(model, nnx.Param)
  leaves = jax.tree_util.tree_flatten_with_path(state)[0]
  sums = jax.jit(lambda xs: [_bit_checksums(x) for x in xs])([leaf for _, leaf in leaves])
  # Replicated [2] results: every process reads its own copy.
  sums = [np.asarray(s.addressable_data(0)) for s in sums]
  digest = hashlib.sha256()
  for (path, leaf), pair in zip(leaves, sums):
    digest.update(f"{jax.tree_util.keystr(path)}|{leaf.shape}|{leaf.dtype}|"
                  f"{int(pair[0])}|{int(pair[1])}\n".encode())
  return {"class": type(model).__name__,
          "num_params": int(sum(int(np.prod(leaf.shape)) for _, leaf in leaves)),
          "params_sha256": digest.hexdigest()}


def _write_json(path: str, obj: Any) -> None:
  """Atomic JSON write (temporary name, then rename); sorted keys for byte-stable output."""
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1, sort_keys=True)
    f.write("\n")
  os.replace(tmp, path)


def _read_json(path: str) -> Any:
  with open(path) as f:
    return json.load(f)


def _shards(documents: Iterator[str], size: int) -> Iterator[list[str]]:
  while chunk := list(itertools.islice(documents, size)):
    yield chunk


def _split_counts(thresholds: tuple[float, ...]) -> dict[str, Any]:
  return {"records": 0, "documents": 0, "buckets": {str(b): 0 for b in range(len(thresholds) + 1)}}


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
  counts = {s: _split_counts(config.bucket_thresholds) for s in records.SPLITS}
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


def _manifest(identity: dict[str, Any], markers: list[dict[str, Any]],
              stats: SourceStats) -> dict[str, Any]:
  thresholds = tuple(identity["config"]["bucket_thresholds"])
  counts = {s: _split_counts(thresholds) for s in records.SPLITS}
  for m in markers:
    for s in records.SPLITS:
      counts[s]["records"] += m["counts"][s]["records"]
      counts[s]["documents"] += m["counts"][s]["documents"]
      for b, n in m["counts"][s]["buckets"].items():
        counts[s]["buckets"][b] += n
  for s in records.SPLITS:
    buckets = counts[s]["buckets"]
    # Nested difficulty sets: "above threshold i" = bucket > i.
    counts[s]["above_threshold"] = {
        str(t): sum(n for b, n in buckets.items() if int(b) > i) for i, t in enumerate(thresholds)}
  return {
      "format": MANIFEST_FORMAT,
      "record_version": records.FORMAT_VERSION,
      "identity": identity,
      "files": {s: [m["files"][s] for m in markers if s in m["files"]] for s in records.SPLITS},
      "counts": counts,
      "max_completion_bytes": max(m["max_completion_bytes"] for m in markers),
      "documents": {
          "read": stats.documents,
          "skipped_empty": stats.skipped_empty,
          "invalid_utf8": stats.invalid_utf8_documents,
          "short": sum(m["short_documents"] for m in markers),
          "positions_scored": sum(m["positions_scored"] for m in markers),
          "positions_selected": sum(m["positions_selected"] for m in markers),
      },
      "num_shards": len(markers),
  }


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
      found = _read_json(existing)
      found = found.get("identity", found)
      if found != identity:
        raise ValueError(
            f"{out_dir!r} holds data prepared with another config, tokenizer or proxy "
            f"({existing}); use a new out_dir or delete it.")
      if existing == manifest_path:
        return _read_json(manifest_path)

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
    _write_json(identity_path, identity)
  sync.barrier("prepare:started")

  scorer = filtering.make_proxy_scorer(
      proxy_model, mesh=mesh, batch_size=config.score_batch_size, seq_len=config.score_seq_len,
      k=config.topk, logits_chunk=config.logits_chunk)
  feed = scorer.feed
  leader = sync.group_leader(feed)
  src = config.source
  total = src.synthetic.num_documents if src.kind == "synthetic" else None
  if src.max_documents is not None:
    total = min(total or src.max_documents, src.max_documents)
  num_shards = 0
  shards = _shards(itertools.chain([first], documents), config.docs_per_shard)
  with tqdm(total=total, unit="doc", desc="prepare", disable=not show_progress) as bar:
    # One round: the next num_groups shards, shard num_shards + g to feed group g.
    while batch := list(itertools.islice(shards, feed.num_groups)):
      mine = num_shards + feed.group
      docs = batch[feed.group] if feed.group < len(batch) else []
      marker_path = os.path.join(progress_dir, f"shard-{mine:05d}.json")
      # The group follows its leader's view of the marker (a file system may lag elsewhere).
      done = sync.flag_of(leader, os.path.exists(marker_path) or not docs)
      work = _ShardWork(mine, mine * config.docs_per_shard, [] if done else docs, config,
                        tokenizer)
      # Collective: every process dispatches the same number of scorer batches (padding when
      # its group has fewer windows, or nothing left to do this round).
      calls = sync.max(work.num_batches(scorer.rows_per_call))
      if calls or not done:
        marker = _process_shard(work, config, scorer, out_dir, num_batches=calls,
                                write=feed.leader and not done)
        if marker is not None:
          _write_json(marker_path, marker)
      num_shards += len(batch)
      bar.update(sum(len(d) for d in batch))

  sync.barrier("prepare:scored")
  marker_paths = [os.path.join(progress_dir, f"shard-{s:05d}.json") for s in range(num_shards)]
  error = None
  if sync.main:
    try:
      manifest = _finish(identity, marker_paths, stats, config, progress_dir, out_dir, created)
      _write_json(manifest_path, manifest)
    except (ValueError, FileNotFoundError) as e:  # Raised on every process, below.
      error = e
  if not sync.all_ok(error is None):
    if error is not None:
      raise error
    raise RuntimeError("data preparation failed on process 0; see its log.")
  return _read_json(manifest_path)


def _finish(identity, marker_paths, stats, config, progress_dir, out_dir, created):
  """The manifest from every shard's marker (process 0)."""
  deadline = time.monotonic() + MARKER_WAIT_S
  while True:  # Markers other hosts wrote may show up late on a network file system.
    missing = [p for p in marker_paths if not os.path.exists(p)]
    if not missing or time.monotonic() > deadline:
      break
    time.sleep(1.0)
  if missing:
    raise FileNotFoundError(f"shard markers {missing} are missing after every shard was scored; "
                            "is out_dir on a file system all processes share?")
  manifest = _manifest(identity, [_read_json(p) for p in marker_paths], stats)
  short = manifest["documents"]["short"]
  if short:
    warnings.warn(
        f"{short} of {stats.documents} documents have at most min_context_tokens="
        f"{config.min_context_tokens} tokens and gave no positions.", stacklevel=3)
  if sum(manifest["counts"][s]["records"] for s in records.SPLITS) == 0:
    shutil.rmtree(progress_dir)
    if created:
      shutil.rmtree(out_dir, ignore_errors=True)
    raise ValueError(
        f"no position was selected from {stats.documents} documents ({short} shorter than "
        f"min_context_tokens={config.min_context_tokens} + 1 tokens, filter {config.filter!r}, "
        f"entropy_threshold={config.entropy_threshold}); lower min_context_tokens or the "
        "threshold, or use longer documents. Nothing was written.")
  return manifest


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


def main(argv: list[str] | None = None) -> None:
  """Standalone use: `python -m rpt_jax.data.prepare --out DIR --tokenizer T --proxy HF_DIR`."""
  import argparse

  p = argparse.ArgumentParser(description="Score, filter and write RPT position records.")
  p.add_argument("--out", required=True, help="output folder (resumes if it exists)")
  p.add_argument("--tokenizer", required=True, help="SentencePiece .model or HF tokenizer dir")
  p.add_argument("--proxy", required=True, help="HF model dir (config.json + safetensors)")
  p.add_argument("--kind", default="synthetic", help="source kind: text|jsonl|parquet|tfds|"
                 "synthetic")
  p.add_argument("--path", help="corpus file or folder")
  p.add_argument("--field", default="text")
  p.add_argument("--tfds-name")
  p.add_argument("--tfds-data-dir")
  p.add_argument("--split", default="train")
  p.add_argument("--split-on-blank-lines", action="store_true")
  p.add_argument("--max-documents", type=int)
  defaults = PrepareConfig()
  for name in ("filter", "entropy_threshold", "min_context_tokens", "max_prompt_tokens",
               "completion_tokens", "max_positions_per_document", "score_seq_len",
               "score_overlap", "score_batch_size", "eval_fraction", "seed", "docs_per_shard"):
    value = getattr(defaults, name)
    kind = type(value) if value is not None else int
    p.add_argument("--" + name.replace("_", "-"), type=kind, default=value)
  args = p.parse_args(argv)

  from rpt_jax.model.hf_io import load_hf
  from rpt_jax.tokenizer import load_tokenizer

  source = SourceConfig(kind=args.kind, path=args.path, field=args.field, name=args.tfds_name,
                        data_dir=args.tfds_data_dir, split=args.split,
                        split_on_blank_lines=args.split_on_blank_lines,
                        max_documents=args.max_documents)
  fields = {f.name for f in dataclasses.fields(PrepareConfig)}
  config = PrepareConfig(source=source, tokenizer_id=args.tokenizer, proxy_id=args.proxy,
                         **{k: v for k, v in vars(args).items() if k in fields})
  model, _ = load_hf(args.proxy)
  manifest = prepare(config, load_tokenizer(args.tokenizer), model, args.out)
  print(json.dumps({"out": args.out, "counts": manifest.get("counts", manifest)}, indent=1))


if __name__ == "__main__":
  main()
