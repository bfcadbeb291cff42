"""gs:// workdirs: checkpoints stay on gs://, every other file goes through the gcsfuse mount."""
import os

import pytest

from rpt_jax import run_dir

MOUNTS = """\
/dev/root / ext4 rw,relatime 0 0
other-bucket /mnt/other fuse.gcsfuse rw,nosuid,nodev,relatime,user_id=1000 0 0
my-bucket {mount} fuse.gcsfuse rw,nosuid,nodev,relatime,user_id=1000 0 0
tmpfs /tmp tmpfs rw 0 0
"""


@pytest.fixture
def mounts(tmp_path, monkeypatch):
  monkeypatch.delenv(run_dir.MOUNT_ROOT_ENV, raising=False)
  mount = tmp_path / "my bucket"  # a space: /proc/mounts writes it as \040
  mount.mkdir()
  path = tmp_path / "mounts"
  path.write_text(MOUNTS.format(mount=str(mount).replace(" ", "\\040")))
  return str(path), str(mount)


def test_local_workdir_is_unchanged(mounts):
  assert run_dir.files_dir("/tmp/run1", mounts_file=mounts[0]) == "/tmp/run1"
  assert run_dir.files_dir("relative/run", mounts_file=mounts[0]) == "relative/run"


def test_gcs_workdir_maps_to_the_buckets_gcsfuse_mount(mounts):
  mounts_file, mount = mounts
  assert run_dir.gcsfuse_mounts(mounts_file) == {"other-bucket": "/mnt/other",
                                                 "my-bucket": mount}
  assert run_dir.files_dir("gs://my-bucket/rpt/run1/", mounts_file=mounts_file) == (
      os.path.join(mount, "rpt/run1"))
  assert run_dir.files_dir("gs://my-bucket", mounts_file=mounts_file) == mount


def test_mount_root_from_the_environment(tmp_path, monkeypatch):
  # tpu_scripts/run.sh mounts under $RPT_GCS_MOUNT_ROOT/BUCKET; a mount point there is used
  # even where /proc/mounts cannot be read.
  monkeypatch.setenv(run_dir.MOUNT_ROOT_ENV, str(tmp_path / "gcs"))
  monkeypatch.setattr(os.path, "ismount", lambda p: p == str(tmp_path / "gcs" / "b"))
  assert run_dir.files_dir("gs://b/x", mounts_file=str(tmp_path / "none")) == str(
      tmp_path / "gcs" / "b" / "x")


def test_unmounted_bucket_is_refused_with_the_fix(mounts):
  with pytest.raises(ValueError, match=r"bucket 'not-here' is not mounted here.*gcsfuse "
                     r"--implicit-dirs not-here"):
    run_dir.files_dir("gs://not-here/run", mounts_file=mounts[0])
  with pytest.raises(ValueError, match="names no bucket"):
    run_dir.files_dir("gs:///run", mounts_file=mounts[0])


def test_a_run_on_a_gcs_workdir_writes_files_through_the_mount(mounts, monkeypatch):
  from configs import local
  from rpt_jax import pipeline
  from rpt_jax.spec import RunSpec

  mounts_file, mount = mounts
  monkeypatch.setattr(run_dir, "gcsfuse_mounts", lambda *a, **k: {"my-bucket": mount})
  run = pipeline.Run(RunSpec.from_config(local.get_config()), "gs://my-bucket/rpt/run1",
                     progress=False)
  assert run.workdir == "gs://my-bucket/rpt/run1"  # Orbax: checkpoints straight to GCS
  assert run.files == os.path.join(mount, "rpt/run1")
  assert run.records_dir == os.path.join(mount, "rpt/run1", "records")


def test_gcs_inputs_are_read_through_their_mounts(mounts):
  from configs import local

  mounts_file, mount = mounts
  c = local.get_config()
  c.model.hf_path = "gs://my-bucket/models/qwen"
  c.data.proxy_hf_path = "/local/proxy"
  out = run_dir.localize_inputs(c, mounts_file=mounts_file)
  assert out.model.hf_path == os.path.join(mount, "models/qwen")
  assert out.data.proxy_hf_path == "/local/proxy"
  assert c.model.hf_path == "gs://my-bucket/models/qwen"  # the caller's config is untouched
  c.tokenizer.path = "gs://elsewhere/tok.model"
  with pytest.raises(run_dir.NotMountedError, match=r"tokenizer.path='gs://elsewhere/tok.model'"
                     r": bucket 'elsewhere' is not mounted"):
    run_dir.localize_inputs(c, mounts_file=mounts_file)


def test_main_refuses_an_unmounted_gcs_workdir_in_one_line(tmp_path):
  import subprocess
  import sys
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop(run_dir.MOUNT_ROOT_ENV, None)
  result = subprocess.run(
      [sys.executable, "-m", "rpt_jax.main", "--config=configs/local.py",
       "--workdir=gs://rpt-no-such-bucket/run"], cwd=repo, env=env, capture_output=True,
      text=True, timeout=300)
  assert result.returncode == 2  # a user's mistake (rpt_jax.errors.EXIT_USER_ERROR)
  assert ("rpt_jax: --workdir='gs://rpt-no-such-bucket/run': bucket "
          "'rpt-no-such-bucket' is not mounted here") in result.stderr
  assert "Traceback" not in result.stderr
