"""Every objective end to end through `python -m rpt_jax.main --mode=train` on the micro config
(tests/micro_run.py), with the override a user would type: it trains, logs its parts in
metrics.jsonl, and a run stopped by SIGTERM and resumed logs what an uninterrupted run logs,
bit for bit (the EMA teacher and the KL reference are in the checkpoint)."""

from __future__ import annotations

import os
import signal
import subprocess

import numpy as np
import pytest

import micro_run

STEPS = 6
# Override -> the metrics that name its parts.
OBJECTIVES = {
    "dense": (["--config.rl.reward=dense"],
              ["reward/first_token_prob", "reward/answer_logprob"]),
    "kl": (["--config.rl.beta=0.01"], ["train/ref_kl"]),
    "rlp": (["--config.rl.reward=rlp", "--config.rl.ema_decay=0.5"],
            ["reward/information_gain", "reward/teacher_logprob", "reward/answer_logprob",
             "reward/thought_length"]),
    "ntp": (["--config.rl.ntp_coef=0.1"], ["train/ntp_loss", "train/ntp_tokens"]),
    "budget": (["--config.rl.thought_budget=(12,4,0.25)", "--config.rl.length_reward_coef=0.1"],
               ["train/thought_budget", "reward/length_reward", "reward/thought_length"]),
}
# Compared exactly between an uninterrupted and a resumed run.
COMPARED = ("train/loss", "train/pg_loss", "train/grad_norm", "train/entropy",
            "reward/mean_reward", "reward/mean_response_length")


@pytest.fixture(scope="module")
def config_path(tmp_path_factory):
  return micro_run.write_config(str(tmp_path_factory.mktemp("config") / "micro.py"),
                                {"train.steps": STEPS, "rl.dynamic_sampling_from_step": 3})


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_objective_trains_logs_its_parts_and_resumes_exactly(tmp_path_factory, config_path,
                                                             name):
  flags, parts = OBJECTIVES[name]
  full = micro_run.prepared_workdir(tmp_path_factory, f"{name}_full")
  micro_run.run_main(config_path, full, "--mode=train", *flags)
  rows = {r["step"]: r for r in micro_run.train_rows(full)}
  assert sorted(rows) == list(range(STEPS))
  for part in parts:
    values = [rows[s][part] for s in range(STEPS)]
    assert all(np.isfinite(values)), (part, values)
  assert any(rows[s]["train/grad_norm"] > 0 for s in range(STEPS))

  # Stopped by SIGTERM once step 1 is logged (a real preemption: same config, same schedule),
  # then resumed to the end.
  resumed = micro_run.prepared_workdir(tmp_path_factory, f"{name}_resumed")
  proc = subprocess.Popen(micro_run.main_command(config_path, resumed, "--mode=train", *flags),
                          cwd=micro_run.REPO, env=micro_run.subprocess_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    micro_run.wait_for_train_step(resumed, 1, proc)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
  finally:
    if proc.poll() is None:
      proc.kill()
  stopped = [r["step"] for r in micro_run.train_rows(resumed)]
  assert max(stopped) < STEPS - 1, f"the run was not interrupted: {stopped}"
  micro_run.run_main(config_path, resumed, "--mode=train", *flags)
  logged = [r["step"] for r in micro_run.train_rows(resumed)]
  assert logged == list(range(STEPS))  # The second process continued where the first stopped.
  again = {r["step"]: r for r in micro_run.train_rows(resumed)}
  for step in range(STEPS):
    for metric in COMPARED + tuple(parts):
      assert again[step][metric] == rows[step][metric], (step, metric)
  assert os.path.isdir(os.path.join(resumed, "checkpoints", str(STEPS)))
