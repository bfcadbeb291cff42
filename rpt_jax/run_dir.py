"""Where a run's files live when `--workdir` is a Cloud Storage path (`gs://BUCKET/DIR`).

Orbax reads and writes `gs://` natively, so checkpoints use the workdir as given. Everything else
a run writes or reads (the tokenizer, the prepared ArrayRecord shards Grain reads, metrics.jsonl,
TensorBoard events, eval reports and plots, the HF export) goes through POSIX file I/O, so on a
pod slice the bucket is mounted with Cloud Storage FUSE (gcsfuse) on every worker and those files
go through the mount: the same objects, so the run is in one place and every host sees what
process 0 wrote. `tpu_scripts/run.sh` mounts the workdir's bucket before it starts the job.

`files_dir("gs://B/runs/r1")` is `<mount of B>/runs/r1`, where the mount is found in
`$RPT_GCS_MOUNT_ROOT/B` (set by tpu_scripts) or in /proc/mounts (any gcsfuse mount of B); a
local workdir is returned unchanged. The run's inputs given as gs:// paths (the HF checkpoint,
the tokenizer, the proxy, a corpus file) are read through mounts the same way
(`localize_inputs`): tpu_scripts/run.sh mounts the workdir's bucket and any `--mount BUCKET`.
"""

from __future__ import annotations

import os

from rpt_jax import errors

GCS_PREFIX = "gs://"
MOUNT_ROOT_ENV = "RPT_GCS_MOUNT_ROOT"
# Config fields naming files a run reads, mapped through the bucket mounts (`localize_inputs`).
INPUT_FIELDS = ("model.hf_path", "tokenizer.path", "data.proxy_hf_path", "data.source.path")


class NotMountedError(errors.InputError):
  """A gs:// path whose bucket has no gcsfuse mount on this machine."""


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


def files_dir(workdir: str, *, mounts_file: str = "/proc/mounts", what: str = "--workdir"
              ) -> str:
  """The POSIX path of `workdir` (a gs:// path through its bucket's mount; see the module
  docstring). `what` names the setting in the error."""
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
  raise NotMountedError(
      f"{what}={workdir!r}: bucket {bucket!r} is not mounted here. rpt_jax reads and writes "
      "run files (other than Orbax checkpoints) with POSIX file I/O, so the bucket must be "
      "mounted with gcsfuse on every worker: tpu_scripts/run.sh mounts the workdir's bucket "
      f"(and `--mount {bucket}`), or run `mkdir -p ~/gcs/{bucket} && gcsfuse --implicit-dirs "
      f"{bucket} ~/gcs/{bucket}` and set {MOUNT_ROOT_ENV}=~/gcs; or give a local path.")


def localize_inputs(config, *, mounts_file: str = "/proc/mounts"):
  """A copy of the run config with gs:// INPUT_FIELDS replaced by their mounted paths."""
  config = config.copy_and_resolve_references()
  for field in INPUT_FIELDS:
    *parents, name = field.split(".")
    node = config
    for parent in parents:
      node = node.get(parent)
      if node is None:
        break
    value = None if node is None else node.get(name)
    if isinstance(value, str) and value.startswith(GCS_PREFIX):
      node[name] = files_dir(value, mounts_file=mounts_file, what=field)
  return config
