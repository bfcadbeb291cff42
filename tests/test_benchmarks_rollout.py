"""Smoke test of benchmarks/rollout_long_tail.py: tiny shapes, every peer, the last-line format."""
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_rollout_long_tail_smoke():
  env = {**os.environ, "PYTHONPATH": ROOT}
  out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "rollout_long_tail.py"),
                        "--smoke"], capture_output=True, text=True, env=env, timeout=600,
                       check=True).stdout
  lines = out.strip().splitlines()
  number = r"[0-9]+(\.[0-9]+)?"
  assert re.fullmatch(rf"long-tail: engine {number} tok/s, static {number} tok/s, {number}x; "
                      rf"utilization {number}%; fixed-length {number} tok/s", lines[-1]), lines[-1]
  assert any(line.startswith("HF CB") for line in lines)
  assert any("engine / HF continuous batching" in line for line in lines)
