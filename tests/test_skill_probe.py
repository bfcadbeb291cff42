"""benchmarks/skill_probe.py end to end at toy sizes (seconds): it pretrains, then reports
accuracies in [0, 1] for every skill kind and digit role, and reuses the checkpoint after."""
import os
import sys

import micro_run

sys.path.insert(0, micro_run.REPO)
from benchmarks import skill_probe  # noqa: E402


def test_skill_probe_pretrains_then_reports_every_kind(tmp_path, capsys):
  config = micro_run.write_config(str(tmp_path / "micro.py"))
  args = ["--config", config, "--workdir", str(tmp_path / "run"), "--set", "pretrain.steps=2",
          "--problems", "12", "--max-new-tokens", "8"]
  result = skill_probe.main(args)
  assert set(result["greedy"]) == set(result["n"]) | {"all"}
  assert sum(result["n"].values()) == 12
  for figures in (result["greedy"], result["reference"], result["forced"]):
    assert all(0.0 <= v <= 1.0 for v in figures.values())
  assert {"fact", "operand", "answer"} <= set(result["forced"])
  assert result["pretrain_seconds"] > 0 and "teacher-forced" in capsys.readouterr().out
  assert os.path.isdir(tmp_path / "run" / "pretrain")
  assert skill_probe.main(args)["pretrain_seconds"] == 0.0  # the checkpoint is reused
