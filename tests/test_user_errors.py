"""Every mistake a user can make answers in one line: `python -m rpt_jax.main` with bad inputs.

Each case runs the CLI on the micro config (tests/micro_run.py) with one bad input and asserts
exit code 2 (rpt_jax.errors.EXIT_USER_ERROR), no traceback, and a last stderr line
`rpt_jax: ...` that names the file or field. An internal error still shows its traceback.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

import micro_run
import tiny_hf

# id -> (extra flags, or a callable(inputs) -> flags; text the last stderr line must contain)
CASES = {
    # Config values and flags.
    "num_generations": (["--config.rl.num_generations=1"], "rl.num_generations=1"),
    "unknown_field": (["--config.rl.top_kk=3"], "top_kk"),
    "bad_value_type": (["--config.rl.top_k=abc"], "--config.rl.top_k=abc"),
    "top_p_range": (["--config.rl.top_p=1.5"], "rl.top_p=1.5"),
    "mode": (["--mode=fly"], "--mode"),
    "config_file_missing": (["--config=/no/such/config.py"], "/no/such/config.py"),
    # Devices.
    "mesh_vs_devices": (["--config.mesh.data=3", "--config.mesh.fsdp=1"], "mesh"),
    "distributed": (["--config.distributed.coordinator_address=127.0.0.1:1",
                     "--config.distributed.num_processes=2",
                     "--config.distributed.process_id=5"], "config.distributed"),
    # Weights (model.hf_path).
    "model_missing": (lambda d: [f"--config.model.hf_path={d}/nowhere"], "nowhere"),
    "model_type": (lambda d: [f"--config.model.hf_path={d}/gemma"], "gemma/config.json"),
    "config_json": (lambda d: [f"--config.model.hf_path={d}/badjson"], "badjson/config.json"),
    "truncated_weights": (lambda d: [f"--config.model.hf_path={d}/truncated"],
                          "truncated/model.safetensors"),
    "weight_shape": (lambda d: [f"--config.model.hf_path={d}/shape"], "shape/model.safetensors"),
    # Tokenizer.
    "tokenizer_text_file": (lambda d: [f"--config.tokenizer.path={d}/notes.txt"], "notes.txt"),
    "tokenizer_missing": (lambda d: [f"--config.tokenizer.path={d}/none.model"], "none.model"),
    "tokenizer_folder": (lambda d: [f"--config.tokenizer.path={d}/empty"], "tokenizer.path"),
    "tokenizer_json": (lambda d: [f"--config.tokenizer.path={d}/badtok/tokenizer.json"],
                       "badtok/tokenizer.json"),
    # Corpora, each format.
    "text_missing": (lambda d: _source("text", f"{d}/nowhere"), "data.source.path"),
    "text_empty_folder": (lambda d: _source("text", f"{d}/empty"), "data.source.path"),
    "text_blank": (lambda d: _source("text", f"{d}/blank"), "data.source"),
    "jsonl_bad_line": (lambda d: _source("jsonl", f"{d}/bad.jsonl"), "bad.jsonl:2"),
    "jsonl_field": (lambda d: _source("jsonl", f"{d}/body.jsonl"), "data.source.field"),
    "parquet_corrupt": (lambda d: _source("parquet", f"{d}/corrupt.parquet"),
                        "corrupt.parquet"),
    "parquet_column": (lambda d: _source("parquet", f"{d}/other.parquet"), "data.source.field"),
    "source_kind": (["--config.data.source.kind=csv"], "data.source.kind"),
    "no_heldout": (lambda d: _source("text", f"{d}/one") + ["--mode=all"], "data.eval_fraction"),
    # Prepared records.
    "records_manifest": (lambda d: [f"--config.data.records_dir={d}/records"],
                         "records/manifest.json"),
    # Workdir.
    "workdir_is_file": (lambda d: [f"--workdir={d}/notes.txt"], "notes.txt"),
    "workdir_under_file": (lambda d: [f"--workdir={d}/notes.txt/run"], "notes.txt/run"),
    # Checkpoints.
    "checkpoints_damaged": (lambda d: [f"--workdir={d}/damaged_run", "--mode=export"],
                            "damaged_run/checkpoints"),
}


def _source(kind: str, path: str) -> list[str]:
  return [f"--config.data.source.kind={kind}", f"--config.data.source.path={path}"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> str:
  """A folder of bad inputs, one per case."""
  d = tmp_path_factory.mktemp("bad_inputs")
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top

  (d / "notes.txt").write_text("just some notes, not a tokenizer\n")
  (d / "empty").mkdir()
  (d / "blank").mkdir()
  (d / "blank" / "a.txt").write_text("\n  \n")
  (d / "one").mkdir()
  (d / "one" / "a.txt").write_text("a single short document.\n")
  (d / "bad.jsonl").write_text('{"text": "fine"}\n{"text": "unterminated\n')
  (d / "body.jsonl").write_text('{"body": "no text field"}\n')
  (d / "corrupt.parquet").write_bytes(b"PAR1" + os.urandom(64))
  pq.write_table(pa.table({"content": ["a", "b"]}), d / "other.parquet")
  (d / "badtok").mkdir()
  (d / "badtok" / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": ')
  (d / "records").mkdir()
  (d / "records" / "manifest.json").write_text("not json")

  good = tiny_hf.write_checkpoint(str(d / "good"))
  for name in ("gemma", "badjson", "truncated", "shape"):
    shutil.copytree(good, d / name)
  config = json.loads((d / "good" / "config.json").read_text())
  (d / "gemma" / "config.json").write_text(json.dumps(dict(config, model_type="gemma")))
  (d / "badjson" / "config.json").write_text(json.dumps(config)[:-20])
  (d / "shape" / "config.json").write_text(json.dumps(dict(config, intermediate_size=48)))
  weights = (d / "truncated" / "model.safetensors").read_bytes()
  (d / "truncated" / "model.safetensors").write_bytes(weights[:len(weights) // 2])

  # A run whose only checkpoint lost its metadata (provably damaged: nothing to fall back to).
  step = d / "damaged_run" / "checkpoints" / "4"
  for item in ("train_state", "data", "extra"):
    (step / item).mkdir(parents=True)
  (step / "train_state" / "_METADATA").write_text("{")
  return str(d)


@pytest.fixture(scope="module")
def config_path(tmp_path_factory) -> str:
  return micro_run.write_config(str(tmp_path_factory.mktemp("config") / "micro.py"))


def _run(config_path: str, workdir: str, flags: list[str]) -> subprocess.CompletedProcess:
  args = [f"--config={config_path}", f"--workdir={workdir}", "--mode=prepare"]
  # A later --config/--workdir/--mode in `flags` wins.
  args = [a for a in args if a.split("=")[0] not in {f.split("=")[0] for f in flags}] + flags
  return subprocess.run([sys.executable, "-m", "rpt_jax.main", *args], cwd=micro_run.REPO,
                        env=micro_run.subprocess_env(), capture_output=True, text=True,
                        timeout=300, check=False)


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_and_exit_2(case, inputs, config_path, tmp_path):
  flags, names = CASES[case]
  flags = flags(inputs) if callable(flags) else flags
  proc = _run(config_path, str(tmp_path / "workdir"), flags)
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert lines and lines[-1].startswith("rpt_jax: "), proc.stderr[-3000:]
  assert names in lines[-1], lines[-1]
  print(f"{case}: {lines[-1]}")  # the table, with -s


def test_traceback_flag_shows_where_a_user_error_was_raised(inputs, config_path, tmp_path):
  proc = _run(config_path, str(tmp_path / "w"),
              [f"--config.tokenizer.path={inputs}/notes.txt", "--traceback"])
  assert proc.returncode == 2
  assert "Traceback" in proc.stderr and "load_tokenizer" in proc.stderr
  assert proc.stderr.strip().splitlines()[-1].startswith("rpt_jax: tokenizer path")


def test_an_internal_error_keeps_its_traceback(tmp_path, config_path):
  # A bug (not a UserError) deep in a run: the traceback is printed and the exit code is 1.
  code = ("import sys; from absl import app; from rpt_jax import main, pipeline\n"
          "def broken(*a, **k): raise KeyError('internal bug')\n"
          "pipeline.Run = broken\n"
          "app.run(main.main, flags_parser=main._parse_flags)\n")
  proc = subprocess.run([sys.executable, "-c", code, f"--config={config_path}",
                         f"--workdir={tmp_path / 'w'}", "--mode=prepare"],
                        cwd=micro_run.REPO, env=micro_run.subprocess_env(), capture_output=True,
                        text=True, timeout=300, check=False)
  assert proc.returncode == 1, proc.stderr[-2000:]
  assert "Traceback" in proc.stderr and "KeyError: 'internal bug'" in proc.stderr
  # The full log (library INFO included) is in the workdir.
  assert os.path.getsize(tmp_path / "w" / "logs" / "run.log") > 0


def test_hf_spelling_of_off_is_accepted():
  """`top_k=None` / `top_p=None` (Hugging Face's "off") mean our 0 / 1.0."""
  from configs import base  # pylint: disable=g-import-not-at-top
  from rpt_jax import main  # pylint: disable=g-import-not-at-top
  config = base.get_config()
  config.rl.top_k, config.rl.top_p = None, None
  main._hf_off_values(config)  # pylint: disable=protected-access
  assert (config.rl.top_k, config.rl.top_p) == (0, 1.0)


_TWO_PROCESSES = """
import sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
port, pid = sys.argv[1], int(sys.argv[2])
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                           process_id=pid)
from jax.experimental import multihost_utils
from rpt_jax import errors
# Process 1 hits a bad input in its part of a stage; process 0 has none.
error = errors.InputError("corpus file 'c.jsonl':3 is not valid JSON") if pid == 1 else None
try:
  errors.raise_together(error)
  multihost_utils.sync_global_devices("the stage's next collective")
  print("both continued")
except errors.UserError as e:
  print(f"rpt_jax: {e}")
  sys.exit(errors.EXIT_USER_ERROR)
"""


def test_one_process_failing_stops_both_within_seconds(tmp_path):
  """`errors.raise_together`: the process without an error does not wait in the next
  collective for one that left; both exit 2, each saying why."""
  import socket  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = micro_run.subprocess_env(num_devices=1)
  start = time.monotonic()
  procs = [subprocess.Popen([sys.executable, "-c", _TWO_PROCESSES, str(port), str(i)],
                            cwd=micro_run.REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for i in range(2)]
  try:
    outs = [p.communicate(timeout=120)[0] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  assert [p.returncode for p in procs] == [2, 2], outs
  assert time.monotonic() - start < 60  # start-up included; a hang would take the timeout
  assert "process(es) [1] stopped on a user error" in outs[0]
  assert "c.jsonl':3 is not valid JSON" in outs[1]
