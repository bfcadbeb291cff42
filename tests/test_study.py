"""The study mode: its schedule and compute by hand, and the whole study on the micro config."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

import micro_run
from rpt_jax import scaling
from rpt_jax import study


def test_eval_schedule_is_log_spaced_distinct_and_ends_at_the_last_step():
  assert study.eval_schedule(60, 6) == (5, 8, 14, 22, 37, 60)
  for steps, points in ((60, 6), (200, 8), (7, 6), (3, 6), (1, 6)):
    s = study.eval_schedule(steps, points)
    assert s[-1] == steps and list(s) == sorted(set(s)) and s[0] >= 1
    assert len(s) == min(points, steps)
  ratios = np.diff(np.log(study.eval_schedule(1000, 6)))
  assert ratios.max() / ratios.min() < 1.5  # even in log(step)


def test_cumulative_flops_by_hand():
  assert study.cumulative_flops([1.0, 2.0, 3.0, 4.0], [1, 3, 4]) == [1.0, 6.0, 10.0]


@pytest.mark.parametrize("kwargs,match", [
    (dict(eval_points=2), "eval_points"), (dict(filters=("entropy", "nope")), "filters"),
    (dict(filters=("all", "all")), "filters"), (dict(filters=()), "filters")])
def test_study_config_rejects_bad_values(kwargs, match):
  with pytest.raises(ValueError, match=match):
    study.StudyConfig(**kwargs)


def test_study_mode_writes_the_report_on_the_micro_config(tmp_path_factory):
  steps = 4
  config = micro_run.write_config(
      str(tmp_path_factory.mktemp("config") / "study.py"),
      {"train.steps": steps, "train.checkpoint_every": 2, "study.eval_points": 3,
       "study.filters": ("entropy", "random"), "study.eval_samples": 2})
  workdir = micro_run.prepared_workdir(tmp_path_factory, "study")
  proc = micro_run.run_main(config, workdir, "--mode=study", timeout=1800)
  out = os.path.join(workdir, "study")
  with open(os.path.join(out, "study.json")) as f:
    result = json.load(f)
  schedule = study.eval_schedule(steps, 3)
  assert result["schedule"] == list(schedule)
  curve = result["curve"]
  assert [p["step"] for p in curve] == list(schedule)
  computes = [p["compute"] for p in curve]
  assert computes == sorted(computes) and computes[0] > 0
  for p in curve:  # each point is the evaluation written at that step
    with open(os.path.join(out, "entropy", "eval", f"step_{p['step']}.json")) as f:
      assert json.load(f)["report"] == p["report"]
    # Two sampled answers per position, each rewarded 0 or 1: the mean reward is k / (2 n).
    n = p["report"]["all"]["num_positions"]
    halves = p["report"]["all"]["reasoning_mean_reward"] / 100 * 2 * n
    assert abs(halves - round(halves)) < 1e-6
  assert result["eval_samples"] == 2 and result["metric"] == "reasoning_mean_reward"
  for split, fit in result["scaling"].items():  # the fit reads the curve's mean rewards
    if split != "plot" and "r2" in fit:
      ref = scaling.fit_scaling_law(computes, [p["report"][split]["reasoning_mean_reward"]
                                               for p in curve])
      assert fit["r2"] == pytest.approx(ref.r2, abs=1e-9)
  assert set(result["ablation"]) == {"entropy", "random"}
  sizes = {f: a["report"]["all"]["num_positions"] for f, a in result["ablation"].items()}
  assert len(set(sizes.values())) == 1  # every filter evaluated on the same held-out positions
  for split in ("easy", "medium", "hard", "all"):
    assert split in result["scaling"]
  text = open(os.path.join(out, "report.md")).read()
  assert text.strip() in proc.stdout  # the report is also the command's output
  for heading in ("# RPT study", "## Scaling", "## Position filters at equal RL compute"):
    assert heading in text
  assert os.path.exists(os.path.join(out, "before_after.png"))
  # The study's run links the run's tokenizer and pretrained policy, and resumes: a second call
  # trains nothing new and writes the same report.
  assert os.path.islink(os.path.join(out, "random", "pretrain"))
  rows = micro_run.train_rows(os.path.join(out, "random"))
  micro_run.run_main(config, workdir, "--mode=study", timeout=1800)
  assert micro_run.train_rows(os.path.join(out, "random")) == rows
  assert open(os.path.join(out, "report.md")).read() == text


def test_a_bad_study_value_is_one_config_error_naming_the_field():
  from rpt_jax.spec import RunSpec
  from rpt_jax.validate import ConfigError
  with pytest.raises(ConfigError, match=r"^study\.eval_points=2 must be >= 3"):
    RunSpec.from_config(micro_run.micro_config(study__eval_points=2))
  with pytest.raises(ConfigError, match=r"^study\.eval_samples=0 must be >= 1"):
    RunSpec.from_config(micro_run.micro_config(study__eval_samples=0))
  with pytest.raises(ConfigError, match=r"^study\.filters="):
    RunSpec.from_config(micro_run.micro_config(study__filters=("entropy", "bogus")))
  assert RunSpec.from_config(micro_run.micro_config()).study == study.StudyConfig()
