r"""One process of a multi-host CPU run of the real stages, for tests/test_multihost.py.

    python tests/multihost_driver.py --workdir=W --stages=pretrain,prepare,train,eval \
        --num_processes=2 --process_id=0 --port=PORT --local_devices=2 --out=result.json

Starts JAX with `--local_devices` simulated CPU devices, joins `--num_processes` processes through
`jax.distributed.initialize` (gloo CPU collectives) when more than one, builds the MICRO config
below (configs/local.py, shrunk to seconds) and runs `rpt_jax.pipeline.Run` stages in order. Each
process writes `--out` (JSON): its process index/count, the metrics rows of metrics.jsonl (process
0 only writes that file), the eval report, and the rollout sampler's class with its last schedule
(`engine_stats`). Not a test itself (pytest collects test_*.py only).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time


def micro_config(train_steps: int, dynamic_from: int):
  """configs/local.py shrunk: 200 docs, 512 pieces, a 2-layer width-32 policy, 8 contexts x G=2."""
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from configs import local

  c = local.get_config()
  # Pinned here (not inherited) so edits to configs/local.py do not change this test's run.
  c.mesh.update(data=1, fsdp=-1, tensor=1)
  c.model.update(compute_dtype="float32", remat="none")
  c.data.update(filter="entropy", entropy_threshold=0.5, min_context_tokens=8,
                completion_tokens=8, template="v0", worker_count=0)
  c.rl.update(temperature=0.8, top_k=0, top_p=1.0, advantage="grpo", shared_prefix=True)
  c.model.scratch.update(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
                         num_kv_heads=1, head_dim=16, max_position_embeddings=256)
  c.tokenizer.train_vocab_size = 512  # 384 pieces spell the v0 template in ~180 tokens
  c.data.source.synthetic_documents = 200
  c.data.docs_per_shard = 60  # 4 shards: with 2 processes, each scores and writes 2
  c.data.max_positions_per_document = 4
  c.data.max_prompt_tokens = 32
  c.data.prompt_buckets = (128,)
  c.data.score_seq_len = 128
  c.data.score_overlap = 32
  c.data.score_batch_size = 8
  c.data.eval_fraction = 0.1
  # Enough next-token + answer-format pretraining that some answers are well formed.
  c.pretrain.update(steps=300, batch_size=8, seq_len=160, max_context_tokens=32,
                    learning_rate=3e-3, warmup_steps=4, thought="", log_every=100,
                    reasoning_example_fraction=0.5, skill_example_fraction=0.0)
  c.rl.update(batch_contexts=8, num_generations=2, max_new_tokens=12, rollout_micro_batch=4,
              train_micro_batch=4, dynamic_sampling_from_step=dynamic_from,
              dynamic_sampling_max_tries=2)
  c.rl.reward = "format_or_match"  # registered in main()
  c.optim.update(learning_rate=3e-4, warmup_steps=0)
  c.train.update(steps=train_steps, log_every=1, checkpoint_every=2, keep_checkpoints=10)
  c.eval.update(max_positions=8, num_samples=2, pass_k=(1, 2), batch_contexts=4)
  return c


def _snapshot(workdir: str, dest: str) -> None:
  import shutil

  import jax
  from jax.experimental import multihost_utils

  multihost_utils.sync_global_devices("snapshot:before")  # Every process's writes are done.
  if jax.process_index() == 0:
    shutil.copytree(workdir, dest)
  multihost_utils.sync_global_devices("snapshot:after")


def _repretrain(run, config) -> list[dict]:
  """Runs rpt_jax.pretrain for 4 steps from the pretrained checkpoint (the same params in every
  layout); returns the rows it logs. Replaces the run's policy: a last stage."""
  from rpt_jax import pretrain as pretrain_lib

  run.__dict__.pop("model", None)  # Run.model (cached) rebuilds it from pretrain/checkpoints.
  pc, rows = config.pretrain, []
  settings = pretrain_lib.PretrainConfig(
      steps=4, batch_size=pc.batch_size, seq_len=pc.seq_len, learning_rate=pc.learning_rate,
      warmup_steps=1, reasoning_example_fraction=pc.reasoning_example_fraction,
      thought=pc.thought, template=config.data.template, max_context_tokens=pc.max_context_tokens,
      min_context_tokens=pc.min_context_tokens, seed=config.seed + 1, log_every=2)
  pretrain_lib.pretrain(run.model, run.tokenizer, run.documents(), settings, mesh=run.mesh,
                        rules=run.rules, progress=False,
                        log_fn=lambda step, m: rows.append({"step": step, **m}))
  return rows


def _over_sample(run) -> list[dict]:
  """Over-sampling on the trainer's engine, with the pretrained weights (the same bits on every
  layout): the first global train batch (this process's rows, per-row budgets) returns 3 of its
  8 groups and carries those in flight, then a second call on the same prompts finishes the
  carried groups and 8 new ones. Returns per call: context ids, staleness, carried ids, and every
  returned row's tokens and length (all rows, gathered)."""
  import jax
  import numpy as np
  from jax.experimental import multihost_utils

  trainer, cfg = run.trainer, run.spec.rpt
  batch = trainer._global_width(next(iter(run.train_loader())))  # pylint: disable=protected-access
  prompts = [trainer._to_global(x) for x in (batch.prompt_tokens, batch.prompt_lengths)]  # noqa
  rows = cfg.batch_contexts * cfg.num_generations
  kwargs = dict(num_samples=cfg.num_generations, temperature=cfg.temperature,
                eos_ids=tuple(run.tokenizer.stop_ids), cache_tokens=cfg.max_new_tokens,
                max_new_tokens=np.random.RandomState(0).randint(1, cfg.max_new_tokens + 1, rows))
  calls = [trainer.sampler.generate_groups(*prompts, groups_needed=3, carry_over=True,
                                           rng=jax.random.key(3), **kwargs)]
  calls.append(trainer.sampler.generate_groups(
      *prompts, groups_needed=len(calls[0].carried) + cfg.batch_contexts, policy_version=1,
      context_ids=cfg.batch_contexts + np.arange(cfg.batch_contexts), rng=jax.random.key(4),
      **kwargs))
  whole = lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True))  # noqa: E731
  return [{"context_ids": c.context_ids.tolist(), "staleness": c.staleness.tolist(),
           "carried": c.carried.tolist(), "tokens": whole(c.output.tokens).tolist(),
           "lengths": whole(c.output.lengths).tolist()} for c in calls]


def _train_over_sampled(run, workdir: str) -> list[dict]:
  """The RPT loop with over-sampling and partial rollouts (rl.oversample_contexts=4, 3 steps)
  from the pretrained policy (rebuilt: the same bits on every layout) in `workdir`; returns its
  metrics rows. Replaces the run's policy: a late stage."""
  import dataclasses

  from rpt_jax.metrics import read_metrics
  from rpt_jax.train import RPTTrainer

  run.__dict__.pop("model", None)  # Run.model (cached) rebuilds it from pretrain/checkpoints.
  config = dataclasses.replace(run.spec.rpt, oversample_contexts=4, partial_rollouts=True,
                               steps=3)
  trainer = RPTTrainer(run.model, run.tokenizer, config, mesh=run.mesh, rules=run.rules,
                       workdir=workdir, progress=False)
  trainer.run(iter(run.train_loader()))
  trainer.checkpointer.close()
  return read_metrics(workdir)


def _train_across(run, config, workdir: str) -> list[dict]:
  """Points the run's trainer at `workdir`, restores its newest checkpoint (written by another
  process layout) and trains on to the end there; returns that workdir's metrics rows. Reusing
  the trainer keeps its compiled programs: a second launch of these processes would compile
  everything again (the persistent compilation cache only serves process 0)."""
  from rpt_jax import checkpoint as checkpoint_lib
  from rpt_jax.metrics import read_metrics

  trainer = run.trainer
  trainer.checkpointer.close()
  trainer.checkpointer = checkpoint_lib.Checkpointer(
      workdir, save_interval_steps=config.train.checkpoint_every,
      max_to_keep=config.train.keep_checkpoints)
  trainer.workdir = trainer.files_dir = workdir
  iterator = iter(run.train_loader())
  if not trainer.restore(iterator):
    raise FileNotFoundError(f"no checkpoint in {workdir}")
  trainer.run(iterator)
  return read_metrics(workdir)


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--workdir", required=True)
  p.add_argument("--stages", default="pretrain,prepare,train,eval",
                 help="comma list of pretrain, prepare, reprepare, train, eval, groups, "
                 "across, oversample, repretrain")
  p.add_argument("--num_processes", type=int, default=1)
  p.add_argument("--process_id", type=int, default=0)
  p.add_argument("--port", type=int, default=0)
  p.add_argument("--local_devices", type=int, default=4)
  p.add_argument("--train_steps", type=int, default=4)
  p.add_argument("--dynamic_from", type=int, default=0)
  p.add_argument("--mesh", default="1,-1,1",
                 help="data,fsdp,tensor sizes; 1,1,4 on 2 processes puts tensor across them")
  p.add_argument("--out", required=True)
  p.add_argument("--fail_prepare_on", type=int, default=-1,
                 help="this process fails while writing records (the error-path test)")
  p.add_argument("--across", default="", help="workdir of another layout's run to resume")
  p.add_argument("--snapshot", default="",
                 help="STAGE:DIR copies the workdir to DIR after STAGE (process 0)")
  args = p.parse_args()

  # A loaded 2-core machine can hold one device thread of an in-process CPU collective past
  # XLA:CPU's default rendezvous timeouts (40 s): give them 10 minutes.
  os.environ["XLA_FLAGS"] = (f"--xla_force_host_platform_device_count={args.local_devices} "
                             "--xla_cpu_collective_timeout_seconds=600 "
                             "--xla_cpu_collective_call_terminate_timeout_seconds=600")
  os.environ["JAX_PLATFORMS"] = "cpu"
  os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
  import jax

  jax.config.update("jax_default_matmul_precision", "highest")
  config = micro_config(args.train_steps, args.dynamic_from)
  config.mesh.update(dict(zip(("data", "fsdp", "tensor"), map(int, args.mesh.split(",")))))
  if args.num_processes > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    config.distributed.update(coordinator_address=f"127.0.0.1:{args.port}",
                              num_processes=args.num_processes, process_id=args.process_id)
  from rpt_jax import main as main_lib
  from rpt_jax import validate
  from rpt_jax.spec import RunSpec
  from rpt_jax.rl import reward

  # Rewards with spread from a barely trained policy: 1 for the right next token, 0.5 for an
  # answer in the right format, else 0 (the plumbing under test does not care what is scored).
  def format_or_match(p, completion, boundaries, prob):
    hit = reward.REWARDS["prefix_match"].fn(p, completion, boundaries, prob)[1]
    return (1.0 if hit else 0.5 if p else 0.0), hit

  reward.register_reward("format_or_match", format_or_match, overwrite=True)

  if args.num_processes > 1:
    # A loaded test machine can starve a process of CPU for minutes while the other compiles;
    # the default 100 s heartbeat timeout would then kill a healthy run.
    jax.distributed.initialize = functools.partial(jax.distributed.initialize,
                                                   heartbeat_timeout_seconds=900)
  main_lib.initialize_distributed(config)  # The real start-up path (rpt_jax.main).
  assert jax.process_count() == args.num_processes, jax.process_count()
  spec = RunSpec.from_config(config)
  validate.validate_run(spec, mode="all", num_devices=jax.device_count(),
                        num_processes=jax.process_count())
  from rpt_jax import pipeline
  from rpt_jax.metrics import read_metrics

  from rpt_jax.train import process_batch_rows

  run = pipeline.Run(spec, args.workdir, progress=False)
  result = {"process_index": jax.process_index(), "process_count": jax.process_count(),
            "devices": jax.device_count(), "seconds": {},
            "batch_rows": process_batch_rows(run.mesh, run.rules, config.rl.batch_contexts)}
  if args.process_id == args.fail_prepare_on:
    from rpt_jax.data import prepare as prepare_lib

    def failing_write(*unused_args, **unused_kwargs):
      raise OSError("injected: the disk is full")

    prepare_lib._write_document = failing_write  # pylint: disable=protected-access
  for stage in args.stages.split(","):
    t0 = time.perf_counter()
    if stage == "pretrain":
      run.pretrain()
    elif stage == "prepare":
      result["records"] = run.prepare()["records"]
    elif stage == "reprepare":  # prepare again, into <workdir>/records_again
      records_dir, run.records_dir = run.records_dir, os.path.join(args.workdir, "records_again")
      result["records_again"] = run.prepare()["records"]
      run.records_dir = records_dir
    elif stage == "train":
      run.train()
      # Which rollout sampler ran, and its schedule of the last rollout (counts only).
      sampler = run.trainer.sampler
      result["sampler"] = type(sampler).__name__
      result["engine_stats"] = {k: v for k, v in getattr(sampler, "last_stats", {}).items()
                                if isinstance(v, int)}
    elif stage == "eval":
      result["eval"] = run.evaluate("driver")
    elif stage == "groups":  # over-sampling with carried partial rollouts
      result["groups"] = _over_sample(run)
    elif stage == "oversample":  # the RPT loop over-sampling, in <workdir>/oversample
      result["oversample_metrics"] = _train_over_sampled(
          run, os.path.join(args.workdir, "oversample"))
    elif stage == "repretrain":  # A few more pretrain steps on the current policy (changes it).
      result["repretrain"] = _repretrain(run, config)
    elif stage == "across":  # The same trainer (compiled programs) resumed from --across's
      result["across_metrics"] = _train_across(run, config, args.across)  # newest checkpoint.
    else:
      raise ValueError(f"unknown stage {stage!r}")
    result["seconds"][stage] = time.perf_counter() - t0
    if args.snapshot.startswith(stage + ":"):
      _snapshot(args.workdir, args.snapshot.split(":", 1)[1])
  result["metrics"] = read_metrics(args.workdir)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=1, default=str)
  jax.distributed.shutdown() if args.num_processes > 1 else None


if __name__ == "__main__":
  main()
