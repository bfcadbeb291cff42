"""End-to-end tests of the RPT loop through `python -m rpt_jax.main --mode=train`: an exact
resume after SIGTERM, and a resume onto a different device count.

Every run is a child process on a micro config (tests/micro_run.py) so that signals, restarts and
device counts are real. The reference for a resumed run is an uninterrupted run of the same
config from a copy of the same prepared workdir.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess

import numpy as np
import pytest

import micro_run
from rpt_jax import errors

STEPS = micro_run.MICRO["train.steps"]
STOP_AFTER = 2  # SIGTERM once step 2 is logged
# Logged per step and compared exactly between runs (the time/* values are wall clock).
COMPARED = ("train/loss", "train/pg_loss", "train/entropy", "train/grad_norm",
            "train/approx_kl", "train/num_tokens", "train/learning_rate", "reward/mean_reward",
            "reward/accuracy", "reward/format_rate", "reward/mean_response_length")


@pytest.fixture(scope="module")
def config_path(tmp_path_factory):
  return micro_run.write_config(str(tmp_path_factory.mktemp("config") / "micro.py"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, config_path):
  """An uninterrupted run: its workdir and train rows by step."""
  workdir = micro_run.prepared_workdir(tmp_path_factory, "reference")
  micro_run.run_main(config_path, workdir, "--mode=train")
  return workdir, {r["step"]: r for r in micro_run.train_rows(workdir)}


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory, config_path):
  """A run stopped by SIGTERM after step STOP_AFTER is logged.

  Returns (workdir, rc, stderr, logged steps).
  """
  workdir = micro_run.prepared_workdir(tmp_path_factory, "interrupted")
  proc = subprocess.Popen(micro_run.main_command(config_path, workdir, "--mode=train"),
                          cwd=micro_run.REPO, env=micro_run.subprocess_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    micro_run.wait_for_train_step(workdir, STOP_AFTER, proc)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
  finally:
    if proc.poll() is None:
      proc.kill()
  steps = [r["step"] for r in micro_run.train_rows(workdir)]
  return workdir, proc.returncode, stderr, steps


def _checkpoint_steps(workdir: str) -> list[int]:
  directory = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


def test_reference_run_trains(reference):
  _, rows = reference
  assert sorted(rows) == list(range(STEPS))
  losses = np.array([rows[s]["train/loss"] for s in range(4)])
  # The entropy bonus makes every pre-dynamic-sampling step update the parameters.
  assert np.all(losses != 0) and len(set(losses.tolist())) == 4
  assert np.all(np.array([rows[s]["train/grad_norm"] for s in range(4)]) > 0)


def _run_log(workdir: str) -> str:
  """The run's full log (library INFO goes there, not to the terminal)."""
  with open(os.path.join(workdir, "logs", "run.log")) as f:
    return f.read()


def test_sigterm_saves_and_exits_cleanly(interrupted):
  workdir, rc, stderr, steps = interrupted
  # A distinct exit code tells a job runner "preempted after a checkpoint: run me again".
  assert rc == errors.EXIT_PREEMPTED, stderr[-3000:]
  assert "Stop requested" in stderr
  last = max(steps)
  assert STOP_AFTER <= last < STEPS - 1, f"the run was not interrupted early: steps {steps}"
  assert steps == list(range(last + 1))
  # The stop saved the state after the last logged step, off the checkpoint interval or not.
  assert _checkpoint_steps(workdir)[-1] == last + 1


def test_resume_after_sigterm_is_exact(reference, interrupted, config_path):
  ref_workdir, ref_rows = reference
  workdir, rc, _, steps_before = interrupted
  assert rc == errors.EXIT_PREEMPTED
  resume_step = max(steps_before) + 1
  micro_run.run_main(config_path, workdir, "--mode=train")
  assert f"Resumed from step {resume_step}" in _run_log(workdir)
  rows = micro_run.train_rows(workdir)
  # One run: every step once, in order (the resumed process appended after the stop step).
  assert [r["step"] for r in rows] == list(range(STEPS))
  for row in rows:
    ref = ref_rows[row["step"]]
    for name in COMPARED:
      # Bit-exact: same program, same devices, same inputs; a restored state is the saved one.
      assert row[name] == ref[name], (row["step"], name, row[name], ref[name])
  # The final parameters agree too (checkpoint at the last step of both runs).
  assert _checkpoint_steps(workdir)[-1] == _checkpoint_steps(ref_workdir)[-1] == STEPS


def test_resume_on_fewer_devices(tmp_path_factory, config_path, reference):
  """2 steps on 8 devices (fsdp 8), then the rest on 4 (fsdp 4) from the step-2 checkpoint.

  (Resumed in place: a workdir copied to another path does not resume, see the report.)
  """
  _, ref_rows = reference
  workdir = micro_run.prepared_workdir(tmp_path_factory, "four_devices")
  micro_run.run_main(config_path, workdir, "--mode=train", "--config.train.steps=2")
  assert _checkpoint_steps(workdir)[-1] == 2
  micro_run.run_main(config_path, workdir, "--mode=train", num_devices=4)
  assert "Resumed from step 2" in _run_log(workdir)
  rows = micro_run.train_rows(workdir)
  assert [r["step"] for r in rows] == list(range(STEPS))
  assert _checkpoint_steps(workdir)[-1] == STEPS
  # The 8-device steps are the reference's, bit for bit (optim total_steps differs, but the
  # schedule is constant after warmup).
  for row in rows[:2]:
    assert row["train/loss"] == ref_rows[row["step"]]["train/loss"]
  row, ref = rows[2], ref_rows[2]
  # A 4-way batch split sums in another order: equal to fp32 round-off, not bit-exact (a
  # later step may sample a different token from logits that differ in the last bit).
  assert row["reward/mean_response_length"] == ref["reward/mean_response_length"]
  for name in ("train/loss", "train/entropy", "train/grad_norm"):
    np.testing.assert_allclose(row[name], ref[name], rtol=1e-4, err_msg=name)
