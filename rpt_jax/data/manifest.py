"""A records folder's manifest: written last by `rpt_jax.data.prepare`, from the per-shard
markers; its presence means the preparation is complete."""

from __future__ import annotations

import json
import os
import shutil
import time
import warnings
from typing import Any

from rpt_jax.data import records
from rpt_jax.errors import InputError, MissingInputError
from rpt_jax.data.sources import SourceStats

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "rpt_jax.position_records"
MARKER_WAIT_S = 60.0  # how long process 0 waits for other hosts' shard markers to appear


def write_json(path: str, obj: Any) -> None:
  """Atomic JSON write (temporary name, then rename); sorted keys for byte-stable output."""
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1, sort_keys=True)
    f.write("\n")
  os.replace(tmp, path)


def read_json(path: str) -> Any:
  with open(path) as f:
    return json.load(f)


def split_counts(thresholds: tuple[float, ...]) -> dict[str, Any]:
  return {"records": 0, "documents": 0, "buckets": {str(b): 0 for b in range(len(thresholds) + 1)}}


def build_manifest(identity: dict[str, Any], markers: list[dict[str, Any]],
              stats: SourceStats) -> dict[str, Any]:
  thresholds = tuple(identity["config"]["bucket_thresholds"])
  counts = {s: split_counts(thresholds) for s in records.SPLITS}
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


def finish_manifest(identity, marker_paths, stats, config, progress_dir, out_dir, created):
  """The manifest from every shard's marker (process 0)."""
  deadline = time.monotonic() + MARKER_WAIT_S
  while True:  # Markers other hosts wrote may show up late on a network file system.
    missing = [p for p in marker_paths if not os.path.exists(p)]
    if not missing or time.monotonic() > deadline:
      break
    time.sleep(1.0)
  if missing:
    raise MissingInputError(f"shard markers {missing} are missing after every shard was scored; "
                            "is out_dir on a file system all processes share?")
  manifest = build_manifest(identity, [read_json(p) for p in marker_paths], stats)
  short = manifest["documents"]["short"]
  if short:
    warnings.warn(
        f"{short} of {stats.documents} documents have at most min_context_tokens="
        f"{config.min_context_tokens} tokens and gave no positions.", stacklevel=3)
  if sum(manifest["counts"][s]["records"] for s in records.SPLITS) == 0:
    shutil.rmtree(progress_dir)
    if created:
      shutil.rmtree(out_dir, ignore_errors=True)
    raise InputError(
        f"no position was selected from {stats.documents} documents ({short} shorter than "
        f"min_context_tokens={config.min_context_tokens} + 1 tokens, filter {config.filter!r}, "
        f"entropy_threshold={config.entropy_threshold}); lower min_context_tokens or the "
        "threshold, or use longer documents. Nothing was written.")
  return manifest
