"""Every benchmark runs end to end at toy sizes (seconds), so none can silently break again: the
figures are not checked here (they need a quiet machine), the benchmark's own output is."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SMOKE = {
    "forward.py": (["--smoke", "--batch", "2", "--length", "16", "--iters", "1", "--no-torch",
                    "--no-memory"], "MFLOP/token"),
    "train_step.py": (["--preset", "smoke", "--iters", "1", "--no-loss-memory"], "matmul peak"),
    "loss_memory.py": (["--batch", "2", "--length", "32", "--dim", "32", "--chunk", "16",
                        "--vocab", "512", "--skip-sharded"], "512"),
    "sampler.py": (["--config", "smoke", "--skip-hf", "--contexts", "2", "--samples", "2",
                    "--prompt-len", "8", "--new-tokens", "4", "--no-cache-rows", "2",
                    "--roofline-pairs", "1"], "engine decode step"),
    "prepare.py": (["--docs", "6", "--repeats", "1", "--hidden", "32", "--layers", "1",
                    "--vocab", "384", "--seq-len", "64", "--overlap", "16", "--batch", "8",
                    "--max-prompt-tokens", "32", "--lines", "4", "6"], "positions"),
    # Four loops: static, engine, over-sampled, over-sampled with partial rollouts.
    "rpt_step.py": (["--preset", "smoke", "--long-tail", "--steps", "1", "--contexts", "2",
                     "--generations", "2", "--new-tokens", "64", "--slots", "4",
                     "--train-micro", "2", "--oversample", "2", "--partial"],
                    "over-sampled +2, partial: rollout"),
}


@pytest.mark.parametrize("script", sorted(SMOKE))
def test_benchmark_runs_at_toy_sizes(script):
  args, expected = SMOKE[script]
  env = dict(os.environ, JAX_PLATFORMS="cpu", TOKENIZERS_PARALLELISM="false",
             PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  env.pop("XLA_FLAGS", None)  # One device, as a person runs them.
  proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", script), *args],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
                        check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert expected in proc.stdout, proc.stdout[-2000:]
  assert "Traceback" not in proc.stderr
