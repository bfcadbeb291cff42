"""Where a run's files live when `--workdir` is a Cloud Storage path (`gs://BUCKET/DIR`).

Orbax reads and writes `gs://` natively, so checkpoints use the workdir as given. Everything else
a run writes or reads (the tokenizer, the prepared ArrayRecord shards Grain reads, metrics.jsonl,
TensorBoard events, eval reports and plots, the HF export) goes through POSIX file I/O, so on a
pod slice the bucket is mounted with Cloud Storage FUSE (gcsfuse) on every worker and those files
go through the mount: the same objects, so the run is in one place and every host sees what
process 0 wrote. `tpu_scripts/run.sh` mounts the workdir's bucket before it starts the job.

`files_dir("gs://B/runs/r1")` is `<mount of B>/runs/r1`, where the mount is found in
`$RPT_GCS_MOUNT_ROOT/B` (set by tpu_scripts) or in /proc/mounts (any gcsfuse mount of B); a
local workdir is returned unchanged.
"""

from __future__ import annotations

import os

GCS_PREFIX = "gs://"
MOUNT_ROOT_ENV = "RPT_GCS_MOUNT_ROOT"


def split_gcs(path: str) -> tuple[str, str]:
  """("BUCKET", "DIR/...") of a gs:// path."""
  if not path.startswith(GCS_PREFIX):
    raise ValueError(f"{path!r} is not a gs:// path.")
  bucket, _, rest = path[len(GCS_PREFIX):].partition("/")
  if not bucket:
    raise ValueError(f"{path!r} names no bucket; use gs://BUCKET/DIR.")
  return bucket, rest.strip("/")


def gcsfuse_mounts(mounts_file: str = "/proc/mounts") -> dict[str, str]:
  """{bucket: mount point} of the gcsfuse mounts listed in `mounts_file` (fstab format)."""
  found: dict[str, str] = {}
  try:
    with open(mounts_file, encoding="utf-8") as f:
      lines = f.read().splitlines()
  except OSError:
    return found
  for line in lines:
    fields = line.split()
    if len(fields) >= 3 and fields[2] == "fuse.gcsfuse":
      # /proc/mounts escapes spaces in mount points as \040.
      found.setdefault(fields[0], fields[1].replace("\\040", " "))
  return found


def files_dir(workdir: str, *, mounts_file: str = "/proc/mounts") -> str:
  """The POSIX folder holding `workdir`'s files (see the module docstring)."""
  if not workdir.startswith(GCS_PREFIX):
    return workdir
  bucket, rest = split_gcs(workdir)
  candidates = []
  root = os.environ.get(MOUNT_ROOT_ENV)
  if root:
    candidates.append(os.path.join(os.path.expanduser(root), bucket))
  mounted = gcsfuse_mounts(mounts_file).get(bucket)
  if mounted:
    candidates.append(mounted)
  for mount in candidates:
    if os.path.ismount(mount) or mount == mounted:
      return os.path.join(mount, rest) if rest else mount
  raise ValueError(
      f"--workdir={workdir!r}: bucket {bucket!r} is not mounted here. Checkpoints go to gs:// "
      "directly, but the run's other files (tokenizer, records, metrics, eval) need the bucket "
      f"mounted with gcsfuse on every worker: tpu_scripts/run.sh does it, or run `mkdir -p "
      f"~/gcs/{bucket} && gcsfuse --implicit-dirs {bucket} ~/gcs/{bucket}` and set "
      f"{MOUNT_ROOT_ENV}=~/gcs (or pass a local --workdir).")
