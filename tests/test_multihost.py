"""Multi-host correctness on one machine: 2 JAX processes x 2 CPU devices vs 1 process x 4.

SLOW: 9 minutes on this 2-core machine at load ~7 (other work running; 2.5 minutes when it was
quieter), most of it compiling in 4 child processes; `runs` prints each launch's wall time with
-s. The same global batch (8 contexts x G=2) runs through the real stages
(`rpt_jax.pipeline.Run`, driven by tests/multihost_driver.py) on both layouts:

  one    1 process: tokenizer, pretrain, prepare (snapshot), RPT train 4 steps, over-sampling
         ("groups"), eval, 3 RPT steps over-sampling with partial rollouts from the pretrained
         policy ("oversample"), then 4 pretrain steps from the pretrained checkpoint
         ("repretrain")
  two    2 processes (gloo collectives) on the snapshot without its tokenizer: process 0 trains
         the tokenizer again, prepare finds the records (and prepares a second copy, the two
         processes scoring 2 of its 4 shards each in one SPMD program), train, groups, eval;
         then the same trainer resumes `one`'s step-2 checkpoint (written by 1 process) in a
         copy of `one`'s workdir and trains to the end ("across"); "oversample"; "repretrain"
  back   1 process, resumed from `two`'s step-2 checkpoint (written by 2 processes)
  tensor 2 processes with mesh 1x1x4: the tensor axis crosses them, so both hold every batch
         row and feed the same rows; prepare again (one feed group), train, eval

Rollouts (train, over-sampling and eval) come from the continuous-batching SlotEngine on every
layout, each process scheduling in lockstep. The logged numbers must agree: rewards,
dynamic-sampling counts, token counts and the engine's schedule exactly (they come from
identical sampled tokens), losses/entropies/gradient norms to fp32 reduction order (`TOL`;
observed differences are at most 3e-7 relative), the eval report exactly. Dynamic
sampling is on from step 0 and the reward gives partial credit for the answer format, so groups
are dropped, refilled from a second candidate batch and padded: the metrics are not trivially
zero. The reference is the single-process run, not the code under test on the same layout.

The loader tests at the top are fast and in-process: global batches are the same records in the
same rows whatever the process count, the worker count or the row assignment, and `seek` lands
where a loader that read that many batches is.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from rpt_jax.data import records, synthetic
from rpt_jax.data.pipeline import PromptLoader
from rpt_jax.data.prepare import prepare
from rpt_jax.data.sources import SourceConfig
from rpt_jax.tokenizer import train_sentencepiece
from tests.data.conftest import tiny_proxy
from tests.data.test_prepare import small_config

DRIVER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multihost_driver.py")
TOL = dict(rtol=1e-5, atol=1e-6)  # fp32 sums in another order (gloo vs in-process reductions)
TIMEOUT_S = 900  # per launch; a hung collective must fail the test, not the suite
STEPS = 4  # train steps; checkpoints every 2


# ---- the loader's global batches (fast, in-process) ---------------------------------------------


@pytest.fixture(scope="module")
def loader_data(tmp_path_factory):
  docs = synthetic.synthetic_documents(synthetic.SyntheticConfig(num_documents=300, seed=99))
  tokenizer = train_sentencepiece(docs, 400, str(tmp_path_factory.mktemp("sp") / "tok.model"))
  out = str(tmp_path_factory.mktemp("mh_loader") / "d")
  # 26 documents x 5 positions = 130 records: 16 global batches of 8 and a remainder.
  cfg = small_config(source=SourceConfig(synthetic=synthetic.SyntheticConfig(num_documents=26)),
                     filter="all", max_positions_per_document=5, eval_fraction=0.0)
  prepare(cfg, tokenizer, tiny_proxy(tokenizer.vocab_size), out, show_progress=False)
  return out, tokenizer


def _keys(batch):
  return list(zip(batch.doc_id.tolist(), batch.position.tolist()))


def _batches(data, n, **kw):
  out, tokenizer = data
  kw = {"batch_size": 8, "prompt_buckets": (384, 512), "seed": 5, "shard_index": 0,
        "shard_count": 1, **kw}
  it = iter(PromptLoader(out, "train", tokenizer, **kw))
  return [_keys(next(it)) for _ in range(n)]


def test_global_batches_do_not_depend_on_the_process_layout(loader_data):
  n = 20  # past the first epoch (16 global batches)
  one = _batches(loader_data, n)
  assert len({k for b in one[:16] for k in b}) == 128  # one epoch: no record twice
  blocks = [_batches(loader_data, n, batch_size=2, shard_index=i, shard_count=4)
            for i in range(4)]
  strided = [_batches(loader_data, n, batch_size=4, shard_count=2, rows=rows)
             for rows in ([0, 2, 4, 6], [1, 3, 5, 7])]
  for k in range(n):
    assert sum((blocks[i][k] for i in range(4)), []) == one[k]
    assert strided[0][k] == one[k][0::2] and strided[1][k] == one[k][1::2]


def test_seek_and_grain_workers_keep_the_global_batches(loader_data):
  out, tokenizer = loader_data
  one = _batches(loader_data, 12)

  def half(workers, seek=None):
    it = iter(PromptLoader(out, "train", tokenizer, batch_size=4, prompt_buckets=(384, 512),
                           seed=5, shard_index=1, shard_count=2, worker_count=workers))
    if seek is not None:
      it.seek(seek)
    return it

  for workers in (0, 2):  # Grain batches inside each worker process; the sampler undoes it
    it = half(workers)
    assert [_keys(next(it)) for _ in range(5)] == [b[4:] for b in one[:5]]
    resumed = half(workers)
    resumed.set_state(it.get_state())
    assert _keys(next(resumed)) == one[5][4:]
    # A checkpoint of another layout: the 7th global batch, read as this layout's half.
    assert _keys(next(half(workers, seek=7))) == one[7][4:]
  full = iter(PromptLoader(out, "train", tokenizer, batch_size=8, prompt_buckets=(384, 512),
                           seed=5, shard_index=0, shard_count=1))
  full.seek(9)
  assert _keys(next(full)) == one[9]


def test_rows_must_fit_the_global_batch(loader_data):
  out, tokenizer = loader_data
  with pytest.raises(ValueError, match="distinct rows of the global batch of 8"):
    PromptLoader(out, "train", tokenizer, batch_size=4, shard_count=2, rows=[0, 1, 2, 8])


# ---- 2 processes x 2 devices vs 1 process x 4 devices (slow: child processes) -------------------


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class _Launch:
  """`num_processes` driver processes on `workdir` (started at construction)."""

  def __init__(self, name: str, workdir: str, stages: str, num_processes: int, logs: str,
               cache: str, extra: tuple[str, ...] = ()):
    self.name, self.procs, self.outs, self.logs = name, [], [], []
    port = _free_port()
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=cache,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    env.pop("XLA_FLAGS", None)  # The driver sets its own device count.
    for i in range(num_processes):
      out = os.path.join(logs, f"{name}_{i}.json")
      log = os.path.join(logs, f"{name}_{i}.log")
      cmd = [sys.executable, DRIVER, f"--workdir={workdir}", f"--stages={stages}",
             f"--num_processes={num_processes}", f"--process_id={i}", f"--port={port}",
             f"--local_devices={4 // num_processes}", f"--train_steps={STEPS}", f"--out={out}",
             *extra]
      with open(log, "w") as f:
        self.procs.append(subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env,
                                           cwd=os.path.dirname(os.path.dirname(DRIVER))))
      self.outs.append(out)
      self.logs.append(log)
    self.start = time.perf_counter()

  def _tails(self) -> str:
    text = []
    for i, log in enumerate(self.logs):
      with open(log, errors="replace") as f:
        lines = [l for l in f.read().splitlines() if not l.startswith(("W0", "I0", "[Gloo]"))]
      text.append(f"---- {self.name} process {i} (exit {self.procs[i].returncode}), last lines "
                  f"of {log}:\n" + "\n".join(lines[-40:]))
    return "\n".join(text)

  def results(self) -> list[dict]:
    deadline = self.start + TIMEOUT_S
    for proc in self.procs:
      try:
        proc.wait(timeout=max(deadline - time.perf_counter(), 1))
      except subprocess.TimeoutExpired:
        for p in self.procs:  # Only the processes this launch started.
          if p.poll() is None:
            p.kill()
            p.wait()
        pytest.fail(f"{self.name}: no result after {TIMEOUT_S} s (a hung collective?)\n"
                    + self._tails())
    if any(p.returncode != 0 for p in self.procs):
      pytest.fail(f"{self.name} failed\n" + self._tails())
    out = []
    for path in self.outs:
      with open(path) as f:
        out.append(json.load(f))
    out[0]["wall_s"] = time.perf_counter() - self.start
    return out


def _copy(src: str, dst: str, *, drop: tuple[str, ...] = ()) -> str:
  shutil.copytree(src, dst)
  for name in drop:
    shutil.rmtree(os.path.join(dst, name))
  return dst


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  tmp = str(tmp_path_factory.mktemp("multihost"))
  logs, cache = os.path.join(tmp, "logs"), os.path.join(tmp, "jax_cache")
  os.makedirs(logs)
  path = lambda name: os.path.join(tmp, name)  # noqa: E731
  out = {}
  out["one"] = _Launch("one", path("one"),
                       "pretrain,prepare,train,groups,eval,oversample,repretrain", 1, logs, cache,
                       (f"--snapshot=prepare:{path('prepared')}",)).results()
  last_ckpt = os.path.join("checkpoints", str(STEPS))
  # One launch at a time: 4 JAX processes compiling at once on 2 cores starve each other.
  across = _copy(path("one"), path("across"), drop=(last_ckpt,))
  out["two"] = _Launch("two", _copy(path("prepared"), path("two"), drop=("tokenizer",)),
                       "prepare,reprepare,train,groups,eval,across,oversample,repretrain", 2,
                       logs, cache, (f"--across={across}",)).results()
  out["back"] = _Launch("back", _copy(path("two"), path("back"), drop=(last_ckpt,)),
                        "train,eval", 1, logs, cache).results()
  # Tensor across the two processes: both hold every batch row, so they must feed identical rows.
  out["tensor"] = _Launch("tensor", _copy(path("prepared"), path("tensor"), drop=("tokenizer",)),
                          "reprepare,train,eval", 2, logs, cache, ("--mesh=1,1,4",)).results()
  out["dirs"] = {name: path(name) for name in ("prepared", "one", "two", "back", "across",
                                               "tensor")}
  out["across"] = [{"metrics": out["two"][0]["across_metrics"]}]
  print({name: round(out[name][0]["wall_s"], 1) for name in ("one", "two", "back", "tensor")})
  return out


def _rows(result: dict, mode: str) -> dict[int, dict]:
  """The last logged row per step of `mode` (a resumed run rewrites the steps it redoes)."""
  return {m["step"]: m for m in result["metrics"] if m["mode"] == mode}


def _assert_rows_close(want: dict, got: dict, where: str) -> None:
  logged = lambda row: sorted(k for k in row if k not in ("step", "mode", "time") and  # noqa
                              not k.startswith("time/"))  # wall clock
  names = logged(want)
  assert names and logged(got) == names, where
  for name in names:
    a, b = want[name], got[name]
    if isinstance(a, str) or isinstance(b, str):  # "nan"/"inf" are logged as strings
      assert a == b, f"{where} {name}: {a} vs {b}"
    else:
      assert math.isclose(a, b, rel_tol=TOL["rtol"], abs_tol=TOL["atol"]), (
          f"{where} {name}: 1 process {a} vs {b}")


def _assert_same_training(one: dict, other: dict, steps, label: str) -> None:
  want, got = _rows(one, "train"), _rows(other, "train")
  for step in steps:
    _assert_rows_close(want[step], got[step], f"{label} step {step}")
  # Counts come from the sampled tokens: equal means the same rollouts were drawn.
  for step in steps:
    for name in ("reward/mean_reward", "reward/format_rate", "train/num_tokens",
                 "dynamic_sampling/tries", "dynamic_sampling/padded_groups"):
      assert want[step][name] == got[step][name], f"{label} step {step} {name}"


def test_the_single_process_reference_is_not_trivial(runs):
  train = _rows(runs["one"][0], "train")
  assert sorted(train) == list(range(STEPS))
  assert any(m["reward/mean_reward"] > 0 for m in train.values())
  assert any(abs(m["train/loss"]) > 1e-4 for m in train.values())
  assert any(m["dynamic_sampling/tries"] > 1 for m in train.values())
  assert any(m["dynamic_sampling/padded_groups"] > 0 or m["dynamic_sampling/dropped_fraction"] > 0
             for m in train.values())


def test_each_process_reads_its_own_block_of_the_global_batch(runs):
  assert runs["one"][0]["batch_rows"] == list(range(8))
  assert [r["batch_rows"] for r in runs["two"]] == [[0, 1, 2, 3], [4, 5, 6, 7]]
  assert [r["process_count"] for r in runs["two"]] == [2, 2]
  assert [r["devices"] for r in runs["two"]] == [4, 4]


def test_every_layout_rolls_out_with_the_slot_engine(runs):
  """The rollouts above came from the continuous-batching engine on every layout, and every
  process took the single process's scheduling decisions (admissions, chunks, decode steps)."""
  one = runs["one"][0]
  assert one["engine_stats"]["admissions"] == 8 and one["engine_stats"]["chunks"] > 1
  for name in ("two", "back", "tensor"):
    for result in runs[name]:
      assert result["sampler"] == "SlotEngine", name
      assert result["engine_stats"] == one["engine_stats"], name


def test_two_processes_over_sample_like_one(runs):
  """generate_groups: 3 of 8 groups, the rest carried into a second call that finishes them
  (one policy version stale) and 8 new groups; the same groups, order and tokens on 2 processes
  as on 1 (the engine's rows equal the static sampler's: tests/rl/test_engine.py)."""
  want = runs["one"][0]["groups"]
  first, second = want
  assert len(first["context_ids"]) == 3 and first["carried"]
  assert sorted(second["context_ids"]) == sorted(first["carried"] + list(range(8, 16)))
  assert second["staleness"] == [int(i < 8) for i in second["context_ids"]]
  for result in runs["two"]:
    assert result["groups"] == want


def test_the_over_sampled_loop_logs_the_single_process_numbers(runs):
  """RPTTrainer with rl.oversample_contexts=4 and partial rollouts: every process holds the
  same context pool and takes the engine's groups in the same order, so 2 processes log the
  1-process numbers (rollout/* counts and staleness exactly)."""
  want = {m["step"]: m for m in runs["one"][0]["oversample_metrics"] if m["mode"] == "train"}
  got = {m["step"]: m for m in runs["two"][0]["oversample_metrics"] if m["mode"] == "train"}
  assert sorted(want) == [0, 1, 2]
  assert any(m["rollout/staleness_max"] >= 1 for m in want.values())
  for step in want:
    _assert_rows_close(want[step], got[step], f"over-sampled step {step}")
    for name in want[step]:
      if name.startswith(("rollout/", "dynamic_sampling/")) or name in ("reward/mean_reward",
                                                                       "train/num_tokens"):
        assert want[step][name] == got[step][name], f"over-sampled step {step} {name}"


def test_two_processes_log_the_single_process_numbers(runs):
  one, two = runs["one"][0], runs["two"][0]
  _assert_same_training(one, two, range(STEPS), "2 processes")
  assert two["eval"] == one["eval"]  # Every process evaluates the same positions: exact.
  assert runs["two"][1]["eval"] == two["eval"]
  _assert_rows_close(_rows(one, "eval")[STEPS], _rows(two, "eval")[STEPS], "eval")


def test_processes_that_share_batch_shards_log_the_single_process_numbers(runs):
  # mesh 1x1x4 over 2 processes: every device holds every row (tensor crosses the hosts), so
  # each process feeds and scores all 8 rows, identically.
  tensor = runs["tensor"]
  assert [r["batch_rows"] for r in tensor] == [list(range(8))] * 2
  _assert_same_training(runs["one"][0], tensor[0], range(STEPS), "tensor across processes")
  assert tensor[0]["eval"] == tensor[1]["eval"] == runs["one"][0]["eval"]


def test_two_processes_prepare_the_same_records(runs):
  dirs = runs["dirs"]
  # Process 0 trained the tokenizer again (the others waited): the same model.
  with open(os.path.join(dirs["prepared"], "tokenizer", "spm.model"), "rb") as f:
    want = f.read()
  with open(os.path.join(dirs["two"], "tokenizer", "spm.model"), "rb") as f:
    assert f.read() == want
  assert runs["two"][0]["records"] == runs["two"][1]["records"] == runs["one"][0]["records"]
  assert runs["two"][0]["records_again"] == runs["two"][1]["records_again"] == (
      runs["one"][0]["records"])
  assert runs["tensor"][0]["records_again"] == runs["tensor"][1]["records_again"] == (
      runs["one"][0]["records"])
  # Both processes scored (each fed its own shards to one SPMD scorer): every shard file of the
  # 1-process preparation, with the same records.
  names = sorted(f for f in os.listdir(os.path.join(dirs["prepared"], "records"))
                 if f.endswith(".arrayrecord"))
  assert {n.split("-")[1].split(".")[0] for n in names} == {"00000", "00001", "00002", "00003"}
  assert sorted(f for f in os.listdir(os.path.join(dirs["two"], "records_again"))
                if f.endswith(".arrayrecord")) == names
  # "tensor": both processes hold every row, so they are one feed group: they score every
  # shard together and process 0 alone writes.
  for layout in ("two", "tensor"):
    for name in names:
      want = records.read_shard(os.path.join(dirs["prepared"], "records", name))
      got = records.read_shard(os.path.join(dirs[layout], "records_again", name))
      assert [(r.doc_id, r.position, r.bucket, r.completion) for r in got] == [
          (r.doc_id, r.position, r.bucket, r.completion) for r in want], (layout, name)
      np.testing.assert_allclose([r.entropy for r in got], [r.entropy for r in want], **TOL)
  # The identity's proxy fingerprint is exact weight bits: the same on 1 and 2 processes.
  with open(os.path.join(dirs["prepared"], "records", "manifest.json")) as f:
    one = json.load(f)["identity"]
  for layout in ("two", "tensor"):
    with open(os.path.join(dirs[layout], "records_again", "manifest.json")) as f:
      assert json.load(f)["identity"] == one, layout


def test_a_process_failing_in_prepare_stops_both(runs, tmp_path):
  """Process 1 fails while writing records: both processes raise at the end of that round's
  collective scorer calls (errors.raise_together) instead of process 0 waiting forever."""
  fail = _Launch("fail", _copy(runs["dirs"]["prepared"], str(tmp_path / "fail")), "reprepare",
                 2, str(tmp_path), str(tmp_path / "cache"), ("--fail_prepare_on=1",))
  for proc in fail.procs:  # A hung collective would hold process 0 until the timeout.
    proc.wait(timeout=300)
  tails = fail._tails()  # pylint: disable=protected-access
  assert all(p.returncode != 0 for p in fail.procs), tails
  with open(fail.logs[1]) as f:
    assert "injected: the disk is full" in f.read(), tails
  with open(fail.logs[0]) as f:
    assert "process(es) [1] failed" in f.read(), tails  # process 0 names the one that failed


def test_two_processes_pretrain_like_one(runs):
  # 4 pretrain steps from the same pretrained params, on each layout.
  one, two = runs["one"][0]["repretrain"], runs["two"][0]["repretrain"]
  assert [r["step"] for r in one] == [r["step"] for r in two] == [2, 4]
  names = ("loss", "plain_loss", "reasoning_loss", "grad_norm", "learning_rate", "loss_tokens")
  for a, b, other in zip(one, two, runs["two"][1]["repretrain"]):
    for name in names:
      assert math.isclose(a[name], b[name], rel_tol=TOL["rtol"], abs_tol=TOL["atol"]), (
          name, a[name], b[name])
      assert other[name] == b[name]  # Every process reads the same (replicated) metrics.


def test_a_two_process_checkpoint_continues_on_one_process(runs):
  _assert_same_training(runs["one"][0], runs["back"][0], range(2, STEPS), "2 -> 1 processes")
  assert runs["back"][0]["eval"] == runs["one"][0]["eval"]


def test_a_one_process_checkpoint_continues_on_two_processes(runs):
  _assert_same_training(runs["one"][0], runs["across"][0], range(2, STEPS), "1 -> 2 processes")
