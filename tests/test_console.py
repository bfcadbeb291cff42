"""What the terminal shows (rpt_jax.console): progress bars, rpt_jax's own warnings and the
result; library INFO goes to <workdir>/logs/run.log; no libtpu noise on a machine without TPU."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings

import micro_run
from rpt_jax import console


def _terminal_lines(text: str) -> list[str]:
  """Lines as a person sees them: a progress bar redrawn with '\\r' is one line."""
  return [line.split("\r")[-1] for line in text.split("\n") if line.split("\r")[-1].strip()]


def test_a_whole_run_prints_bars_and_the_table_and_logs_the_rest(tmp_path_factory):
  workdir = micro_run.prepared_workdir(tmp_path_factory, "console")
  config = micro_run.write_config(str(tmp_path_factory.mktemp("config") / "micro.py"))
  proc = micro_run.run_main(config, workdir, "--mode=all")
  shown = _terminal_lines(proc.stdout) + _terminal_lines(proc.stderr)
  assert len(shown) <= 60, "\n".join(shown)
  assert any(l.startswith("rpt: 100%") for l in shown)  # the RPT progress bar
  assert "Next-token reasoning accuracy on held-out positions (%)" in proc.stdout
  # Library INFO (absl, Orbax) is in the log file only.
  assert not any(l[:1] in "IW" and l[1:5].isdigit() for l in shown), shown
  with open(os.path.join(workdir, "logs", "run.log")) as f:
    log = f.read()
  assert "orbax" in log.lower() and " I " in log


def test_no_accelerator_probe_output_without_a_tpu(tmp_path):
  """With JAX_PLATFORMS unset (as a user runs it), a CPU machine prints only rpt_jax's line."""
  env = micro_run.subprocess_env()
  del env["JAX_PLATFORMS"]
  proc = subprocess.run([sys.executable, "-m", "rpt_jax.main", "--config=configs/local.py",
                         f"--workdir={tmp_path / 'w'}", "--config.rl.num_generations=1"],
                        cwd=micro_run.REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines() == [
      "rpt_jax: rl.num_generations=1: GRPO compares rollouts within a group; use at least 2 "
      "(the paper uses 8)."], proc.stderr


def test_terminal_shows_rpt_jax_warnings_only(tmp_path, capsys):
  root = logging.getLogger()
  saved = (list(root.handlers), root.level)
  try:
    path = console.setup(str(tmp_path))
    logging.getLogger("orbax.checkpoint").warning("library warning")
    logging.getLogger("orbax.checkpoint").info("library info")
    logging.getLogger("rpt_jax.x").info("our info")
    record = logging.LogRecord("rpt_jax.train", logging.WARNING, console.__file__, 1,
                               "our warning", None, None)
    root.handle(record)
    with warnings.catch_warnings():
      warnings.simplefilter("always")
      warnings.warn_explicit("a corpus warning", UserWarning, console.__file__, 7)
    for handler in root.handlers:
      handler.flush()
    terminal = capsys.readouterr().err.splitlines()
    assert terminal == ["rpt_jax: warning: our warning", "rpt_jax: warning: a corpus warning"]
    with open(path) as f:
      log = f.read()
    for text in ("library warning", "library info", "our info", "our warning", "a corpus warning"):
      assert text in log, text
  finally:
    logging.captureWarnings(False)
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
