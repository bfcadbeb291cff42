"""A micro end-to-end run shared by tests/test_main.py and tests/test_train.py.

`MICRO` overrides configs/local.py so that the whole pipeline (tokenizer -> pretrain -> prepare
-> RPT -> eval/export) runs in seconds on 2 CPU cores. `write_config` writes it as a config file
that `python -m rpt_jax.main --config=<file>` reads; `prepared_workdir` builds the tokenizer,
pretrained policy and position records once per test session (in-process) and hands out copies.

The micro policy is too small to learn the answer format in a few dozen pretraining steps, so
rewards are (almost) all zero; `rl.entropy_coef > 0` keeps the loss and the gradient non-zero so
that a resumed run has parameters, optimiser moments and rollouts to get exactly right.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Dotted config field -> value, applied on top of configs/local.py.
MICRO: dict[str, Any] = {
    "data.source.synthetic_documents": 200,
    "tokenizer.train_vocab_size": 384,
    "data.template": "v0_short",  # v0 is ~180 tokens with a 384-piece vocabulary
    "model.scratch.hidden_size": 48,
    "model.scratch.intermediate_size": 96,
    "model.scratch.num_layers": 2,
    "model.scratch.num_heads": 2,
    "model.scratch.num_kv_heads": 1,
    "model.scratch.head_dim": 24,
    "model.scratch.max_position_embeddings": 256,
    "pretrain.steps": 20,
    "pretrain.batch_size": 8,
    "pretrain.seq_len": 160,
    "pretrain.learning_rate": 5e-3,
    "pretrain.warmup_steps": 5,
    "pretrain.log_every": 10,
    "pretrain.thought": "",
    "pretrain.max_context_tokens": 32,
    "data.score_batch_size": 8,
    "data.max_positions_per_document": 4,
    "data.max_prompt_tokens": 32,
    "data.prompt_buckets": (128,),
    # The micro proxy is near-uniform over its top 16 (entropy ~2.750-2.757 nats, ln 16 = 2.77):
    # thresholds inside that range give the three difficulty splits different sizes.
    "data.difficulty_thresholds": (2.752, 2.753, 2.754),
    "rl.batch_contexts": 8,
    "rl.num_generations": 4,
    "rl.max_new_tokens": 12,
    "rl.rollout_micro_batch": 8,
    "rl.train_micro_batch": 8,
    "rl.entropy_coef": 0.01,
    "rl.dynamic_sampling_from_step": 4,  # steps 4+ draw up to 3 batches each (all rewards 0)
    "optim.learning_rate": 1e-3,
    "optim.warmup_steps": 3,
    "train.steps": 8,
    "train.checkpoint_every": 2,
    "train.keep_checkpoints": 10,
    "eval.max_positions": 16,
    "eval.batch_contexts": 8,
}


def apply_overrides(config, overrides: dict[str, Any]):
  """Sets each dotted field of `overrides` on the ConfigDict `config`; returns it."""
  for dotted, value in overrides.items():
    *parents, leaf = dotted.split(".")
    node = config
    for name in parents:
      node = node[name]
    node[leaf] = value
  return config


def micro_config(**extra: Any):
  """configs/local.py + MICRO + `extra` (dotted names with '__' for '.')."""
  sys.path.insert(0, REPO)
  from configs import local  # pylint: disable=g-import-not-at-top
  overrides = dict(MICRO, **{k.replace("__", "."): v for k, v in extra.items()})
  return apply_overrides(local.get_config(), overrides)


def write_config(path: str, overrides: dict[str, Any] | None = None) -> str:
  """A config file holding configs/local.py + MICRO (+ `overrides`), for `--config=`."""
  values = dict(MICRO, **(overrides or {}))
  text = (
      "import sys\n"
      f"sys.path.insert(0, {REPO!r})\n"
      "from configs import local\n\n"
      f"OVERRIDES = {values!r}\n\n"
      "def get_config():\n"
      "  c = local.get_config()\n"
      "  for dotted, value in OVERRIDES.items():\n"
      "    *parents, leaf = dotted.split('.')\n"
      "    node = c\n"
      "    for name in parents:\n"
      "      node = node[name]\n"
      "    node[leaf] = value\n"
      "  return c\n")
  with open(path, "w") as f:
    f.write(text)
  return path


_CACHE_DIR: list[str] = []  # set by `prepared_workdir`: one per test session


def subprocess_env(num_devices: int = 8) -> dict[str, str]:
  """The environment of a `python -m rpt_jax.main` child: CPU, `num_devices` simulated devices,
  the same matmul precision as the test process, and a compilation cache shared by the children
  of this test session (a child then compiles in ~1 s instead of ~30 s; same executables)."""
  env = dict(os.environ)
  if _CACHE_DIR:
    env["JAX_COMPILATION_CACHE_DIR"] = _CACHE_DIR[0]
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={num_devices}"])
  env["JAX_PLATFORMS"] = "cpu"
  env["JAX_DEFAULT_MATMUL_PRECISION"] = "highest"
  env["TOKENIZERS_PARALLELISM"] = "false"
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  return env


def main_command(config_path: str, workdir: str, *flags: str) -> list[str]:
  return [sys.executable, "-m", "rpt_jax.main", f"--config={config_path}",
          f"--workdir={workdir}", *flags]


def run_main(config_path: str, workdir: str, *flags: str, num_devices: int = 8,
             timeout: float = 300) -> subprocess.CompletedProcess:
  """Runs `python -m rpt_jax.main` to completion; raises with its output tail on failure."""
  proc = subprocess.run(main_command(config_path, workdir, *flags), cwd=REPO,
                        env=subprocess_env(num_devices), capture_output=True, text=True,
                        timeout=timeout, check=False)
  if proc.returncode != 0:
    raise AssertionError(f"rpt_jax.main {flags} exited {proc.returncode}:\n"
                         f"{proc.stderr[-4000:]}")
  return proc


def train_rows(workdir: str) -> list[dict[str, Any]]:
  """The `mode == 'train'` rows of `<workdir>/metrics.jsonl`, in file order."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  rows = []
  with open(path) as f:
    for line in f:
      if not line.endswith("\n"):  # Being written.
        break
      row = json.loads(line)
      if row.get("mode") == "train":
        rows.append(row)
  return rows


def wait_for_train_step(workdir: str, step: int, proc: subprocess.Popen,
                        timeout: float = 240.0) -> None:
  """Polls metrics.jsonl until a train row with `step` is written (or the process ends)."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if any(r["step"] >= step for r in train_rows(workdir)):
      return
    if proc.poll() is not None:
      raise AssertionError(f"the run ended (rc={proc.returncode}) before logging step {step}")
    time.sleep(0.02)
  raise AssertionError(f"no train step {step} in {workdir}/metrics.jsonl after {timeout} s")


def prepared_workdir(tmp_path_factory, name: str) -> str:
  """A fresh copy of a workdir holding the micro tokenizer, pretrained policy and records.

  The first call of a session builds it in-process (pretrain + prepare stages); later calls
  (also from other test modules) copy it.
  """
  base = tmp_path_factory.getbasetemp() / "micro_prepared"
  if not _CACHE_DIR:
    _CACHE_DIR.append(str(tmp_path_factory.getbasetemp() / "jax_compilation_cache"))
  if not (base / "records").exists():
    from rpt_jax import pipeline  # pylint: disable=g-import-not-at-top
    from rpt_jax.spec import RunSpec  # pylint: disable=g-import-not-at-top
    build = str(base) + ".building"
    shutil.rmtree(build, ignore_errors=True)
    run = pipeline.Run(RunSpec.from_config(micro_config()), build, progress=False)
    run.pretrain()
    run.prepare()
    os.rename(build, base)
  target = tmp_path_factory.mktemp(name) / "workdir"
  shutil.copytree(base, target)
  return str(target)
