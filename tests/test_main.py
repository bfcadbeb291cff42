"""End-to-end tests of `python -m rpt_jax.main` on a micro config (tests/micro_run.py):
`--mode=all` over a prepared workdir, then `--mode=eval` and `--mode=export` of the finished run.

References: the eval split sizes are counted in the test from the record files; the exported
folder is loaded by `transformers` and its logits compared with the restored policy's.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import micro_run

STEPS = micro_run.MICRO["train.steps"]


@pytest.fixture(scope="module")
def config_path(tmp_path_factory):
  # eval.max_positions=0: every held-out record, so the split sizes can be counted here.
  return micro_run.write_config(str(tmp_path_factory.mktemp("config") / "micro.py"),
                                {"eval.max_positions": 0})


@pytest.fixture(scope="module")
def finished(tmp_path_factory, config_path):
  """`--mode=all` on a workdir that already holds the tokenizer, pretrained policy, records."""
  workdir = micro_run.prepared_workdir(tmp_path_factory, "all")
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    pretrain_rows = [line for line in f if '"pretrain"' in line]
  proc = micro_run.run_main(config_path, workdir, "--mode=all")
  return workdir, proc, pretrain_rows


def _eval_bucket_counts(workdir: str) -> np.ndarray:
  """Buckets of every held-out record, read from the record files (not via rpt_jax.evaluate)."""
  from rpt_jax.data.records import read_shard
  records = os.path.join(workdir, "records")
  with open(os.path.join(records, "manifest.json")) as f:
    files = json.load(f)["files"]["eval"]
  return np.array([r.bucket for name in files for r in read_shard(os.path.join(records, name))])


def test_all_mode_runs_every_stage(finished):
  workdir, proc, pretrain_rows = finished
  # The finished stages are skipped: pretraining logged nothing new.
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    assert [line for line in f if '"pretrain"' in line] == pretrain_rows
  rows = micro_run.train_rows(workdir)
  assert [r["step"] for r in rows] == list(range(STEPS))
  for name in ("before_rpt.json", "after_rpt.json", "before_after.png"):
    assert os.path.exists(os.path.join(workdir, "eval", name)), name
  assert "Next-token reasoning accuracy on held-out positions" in proc.stdout
  buckets = _eval_bucket_counts(workdir)
  for split, min_bucket in (("easy", 1), ("medium", 2), ("hard", 3), ("all", 0)):
    line = next(l for l in proc.stdout.splitlines() if l.startswith(split + " "))
    assert int(line.split()[1]) == int((buckets >= min_bucket).sum()), line


def test_eval_mode_writes_table1_report(finished, config_path):
  workdir, _, _ = finished
  micro_run.run_main(config_path, workdir, "--mode=eval")
  path = os.path.join(workdir, "eval", f"step_{STEPS}.json")
  with open(path) as f:
    written = json.load(f)
  assert written["step"] == STEPS and written["label"] == f"step_{STEPS}"
  report = written["report"]
  assert set(report) == {"easy", "medium", "hard", "all"}
  buckets = _eval_bucket_counts(workdir)
  thresholds = micro_run.MICRO["data.difficulty_thresholds"]
  for split, min_bucket, threshold in (("easy", 1, thresholds[0]), ("medium", 2, thresholds[1]),
                                       ("hard", 3, thresholds[2]), ("all", 0, None)):
    r = report[split]
    assert r["num_positions"] == int((buckets >= min_bucket).sum()), split
    assert r["entropy_above"] == threshold
    for metric in ("proxy_accuracy", "standard_accuracy", "reasoning_accuracy",
                   "reasoning_mean_reward", "pass@1", "format_rate"):
      if r["num_positions"]:
        assert 0.0 <= r[metric] <= 100.0, (split, metric, r[metric])
      else:
        assert r[metric] is None, (split, metric)
    assert r["mean_response_length"] is None or 0 < r["mean_response_length"] <= 12
  # The splits are nested and the sizes differ (the thresholds sit inside the entropy range).
  sizes = [report[s]["num_positions"] for s in ("all", "easy", "medium", "hard")]
  assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) > 1
  eval_rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))
               if '"eval"' in l]
  assert eval_rows[-1]["step"] == STEPS
  assert eval_rows[-1]["all/num_positions"] == len(buckets)


def test_export_loads_in_transformers_with_the_same_logits(finished, config_path,
                                                           tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  workdir, _, _ = finished
  export_dir = str(tmp_path / "hf")
  proc = micro_run.run_main(config_path, workdir, "--mode=export", f"--export_dir={export_dir}")
  assert json.loads(proc.stdout[proc.stdout.index("{"):])["exported_step"] == STEPS
  for name in ("tokenizer.model", "tokenizer_config.json", "generation_config.json"):
    assert os.path.exists(os.path.join(export_dir, name)), name  # the tokenizer travels along

  # Our side: the policy as the trainer restores it from the last RPT checkpoint.
  from rpt_jax import pipeline
  from rpt_jax.spec import RunSpec
  run = pipeline.Run(RunSpec.from_config(micro_run.micro_config()), workdir, progress=False)
  assert run._load_rpt_params() == STEPS  # pylint: disable=protected-access
  assert run._trainer is None  # Parameters alone: no trainer, no optimiser state was built.
  tokens = np.random.default_rng(0).integers(0, run.model_config.vocab_size, (2, 24))
  ours = np.asarray(run.model(tokens))

  hf = transformers.AutoModelForCausalLM.from_pretrained(export_dir, torch_dtype=torch.float32)
  hf.eval()
  with torch.no_grad():
    theirs = hf(torch.from_numpy(tokens)).logits.numpy()
  np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=1e-4)

  # And the export is the RPT-trained policy, not the pretrained one it started from.
  pretrained = pipeline.Run(RunSpec.from_config(micro_run.micro_config()), workdir,
                            progress=False).model
  assert np.abs(np.asarray(pretrained(tokens)) - ours).max() > 1e-4


def test_train_with_fewer_contexts_than_the_micro_batch(tmp_path_factory, config_path):
  """rl.train_micro_batch (8) above rl.batch_contexts (4) means "the whole batch" for the trainer
  as for validation: the run trains (it used to validate and then fail at step 0)."""
  workdir = micro_run.prepared_workdir(tmp_path_factory, "small_batch")
  micro_run.run_main(config_path, workdir, "--mode=train", "--config.rl.batch_contexts=4",
                     "--config.rl.rollout_micro_batch=8", "--config.train.steps=1",
                     num_devices=4)
  rows = micro_run.train_rows(workdir)
  assert [r["step"] for r in rows] == [0] and np.isfinite(rows[0]["train/loss"])
