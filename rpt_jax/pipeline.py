"""One run's stages over its workdir: tokenizer, pretrain, prepare, train, eval, export.

`Run(config, workdir)` builds the mesh, tokenizer and policy once and runs whichever stages the
mode asks for. Each stage resumes from what the workdir holds (see rpt_jax.assemble for the
layout): a finished stage is skipped, a stopped one continues.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any

import jax
from absl import logging
from flax import nnx

from rpt_jax import assemble, evaluate as evaluate_lib
from rpt_jax import mesh as mesh_lib
from rpt_jax import run_dir
from rpt_jax import checkpoint as checkpoint_lib
from rpt_jax import pretrain as pretrain_lib
from rpt_jax import train as train_lib
from rpt_jax import validate
from rpt_jax.data import prepare as prepare_lib
from rpt_jax.data.pipeline import PromptLoader, read_manifest
from rpt_jax.data.sources import iter_documents
from rpt_jax.metrics import MetricsWriter
from rpt_jax.model import hf_io
from rpt_jax.rl.sampler import Sampler
from rpt_jax.train import RPTConfig, RPTTrainer


class Run:
  """Lazily built pieces of one run and its stages."""

  def __init__(self, config, workdir: str, *, progress: bool = True):
    self.config, self.workdir, self.progress = config, workdir, progress
    # Checkpoints (Orbax) go to `workdir` as given, gs:// included; every other file goes to
    # `files`: the same folder, through the bucket's gcsfuse mount for a gs:// workdir.
    self.files = run_dir.files_dir(workdir)
    self.mesh, self.rules = assemble.make_run_mesh(config)
    self.records_dir = assemble.records_dir(config, self.files)
    self._trainer: RPTTrainer | None = None

  # -- pieces ------------------------------------------------------------------------------------

  @functools.cached_property
  def tokenizer(self):
    if jax.process_count() > 1 and jax.process_index() != 0:
      _sync("tokenizer")  # Process 0 trains/writes it first.
      return assemble.load_or_train_tokenizer(self.config, self.files)
    tokenizer = assemble.load_or_train_tokenizer(self.config, self.files)
    if jax.process_count() > 1:
      _sync("tokenizer")
    return tokenizer

  @functools.cached_property
  def model(self):
    """The policy: HF weights or a random init, then the pretrained params if the workdir has
    them (the RPT checkpoints, newer still, are restored by the trainer)."""
    # Checked on the config alone, before the initialiser compiles or weights load.
    validate.validate_against_model(
        self.config, assemble.policy_config(self.config, self.tokenizer).max_position_embeddings)
    model, model_config = assemble.build_policy(self.config, self.tokenizer, self.mesh,
                                                self.rules)
    self.model_config = model_config
    ckpt = self._pretrain_checkpointer()
    if ckpt.latest_step() is not None:
      params = nnx.state(model, nnx.Param)
      abstract = {"params": jax.tree.map(
          lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
          nnx.to_pure_dict(params))}
      step, restored, _, _ = ckpt.restore(ckpt.latest_step(), abstract)
      nnx.replace_by_pure_dict(params, restored["params"])
      nnx.update(model, params)
      logging.info("Policy: pretrained params from step %d.", step)
    ckpt.close()
    return model

  def _pretrain_checkpointer(self) -> checkpoint_lib.Checkpointer:
    return checkpoint_lib.Checkpointer(assemble.workdir_path(self.workdir, "pretrain"),
                                       max_to_keep=1, async_save=False)

  def documents(self) -> list[str]:
    return list(iter_documents(assemble.source_config(self.config)))

  @property
  def trainer(self) -> RPTTrainer:
    if self._trainer is None:
      c = self.config
      self._trainer = RPTTrainer(
          self.model, self.tokenizer, RPTConfig.from_config(c), mesh=self.mesh,
          rules=self.rules, workdir=self.workdir, files_dir=self.files,
          keep_checkpoints=c.train.keep_checkpoints,
          progress=self.progress)
    return self._trainer

  # -- stages ------------------------------------------------------------------------------------

  def pretrain(self) -> dict | None:
    c = self.config.pretrain
    # First: loads the pretrained params when present, and checks the config against the model
    # before anything else is opened (an open Checkpointer would outlive a ConfigError).
    model = self.model
    ckpt = self._pretrain_checkpointer()
    done = ckpt.latest_step() is not None
    if done or c.steps <= 0:
      ckpt.close()
      return None
    writer = MetricsWriter(self.files, mode="pretrain", resume_step=0)
    config = pretrain_lib.PretrainConfig(
        steps=c.steps, batch_size=c.batch_size, seq_len=c.seq_len, learning_rate=c.learning_rate,
        warmup_steps=c.warmup_steps, reasoning_example_fraction=c.reasoning_example_fraction,
        thought=c.thought, template=self.config.data.template,
        max_context_tokens=c.max_context_tokens, min_context_tokens=c.min_context_tokens,
        seed=self.config.seed, log_every=c.log_every)
    metrics = pretrain_lib.pretrain(model, self.tokenizer, self.documents(), config,
                                    mesh=self.mesh, rules=self.rules, progress=self.progress,
                                    log_fn=writer.write)
    writer.close()
    ckpt.save(c.steps, {"params": nnx.to_pure_dict(nnx.state(model, nnx.Param))}, force=True)
    ckpt.wait_until_finished()
    ckpt.close()
    return {"pretrain": {k: v for k, v in metrics.items() if isinstance(v, (int, float))}}

  def prepare(self) -> dict:
    c = self.config
    if os.path.exists(os.path.join(self.records_dir, prepare_lib.MANIFEST)):
      return {"records": self._check_records()["counts"]}
    proxy = assemble.load_proxy(c, self.model, self.mesh, self.rules)
    # Every process: one SPMD scorer over the run's mesh, each feeding its own documents.
    manifest = prepare_lib.prepare(
        assemble.prepare_config(c), self.tokenizer, proxy, self.records_dir, mesh=self.mesh,
        show_progress=self.progress and jax.process_index() == 0)
    return {"records": manifest["counts"]}

  def _check_records(self) -> dict:
    """The finished preparation's manifest, if made with this data config and tokenizer.

    The proxy's weight fingerprint (`prepare.proxy_identity`) is not compared: that would load
    a separate proxy (`data.proxy_hf_path`) only to check it; `prepare` itself compares it
    when it resumes an unfinished folder.
    """
    manifest = read_manifest(self.records_dir)
    found = manifest["identity"]
    want = {"config": assemble.prepare_config(self.config).to_dict(),
            "tokenizer": prepare_lib.tokenizer_identity(self.tokenizer)}
    for key, value in want.items():
      if found.get(key) != value:
        raise ValueError(
            f"{self.records_dir!r} holds records prepared with another data {key}; use a new "
            "data.records_dir (or workdir) or delete that folder.")
    return manifest

  def train_loader(self) -> PromptLoader:
    c = self.config
    # The rows of each global batch this process's devices hold (any mesh device order).
    rows = train_lib.process_batch_rows(self.mesh, self.rules, c.rl.batch_contexts)
    return PromptLoader(self.records_dir, "train", self.tokenizer, batch_size=len(rows),
                        shard_count=c.rl.batch_contexts // len(rows), rows=rows,
                        template=c.data.template, prompt_buckets=tuple(c.data.prompt_buckets),
                        seed=c.seed, shuffle=True, num_epochs=None,
                        worker_count=c.data.worker_count)

  def train(self) -> dict:
    if not os.path.exists(os.path.join(self.records_dir, prepare_lib.MANIFEST)):
      self.prepare()
    iterator = iter(self.train_loader())
    trainer = self.trainer
    trainer.restore(iterator)
    metrics = trainer.run(iterator)
    nnx.update(self.model, trainer.params())
    return {k: v for k, v in metrics.items() if k.startswith(("reward/", "train/loss"))}

  def _sync_policy_from_checkpoint(self) -> int:
    """Loads the latest RPT params into the policy (eval/export of a finished run)."""
    trainer = self.trainer
    if trainer.step == 0:
      iterator_stub = _NullIterator()
      trainer.restore(iterator_stub)
    nnx.update(self.model, trainer.params())
    return trainer.step

  def evaluate(self, label: str | None = None) -> dict:
    c = self.config
    step = self._sync_policy_from_checkpoint()
    label = label or f"step_{step}"
    sampler = Sampler(self.model, mesh=self.mesh, rules=self.rules,
                      pad_id=self.tokenizer.pad_id)
    eval_config = evaluate_lib.EvalConfig(
        max_positions=c.eval.max_positions or None, num_samples=c.eval.num_samples,
        pass_k=tuple(c.eval.pass_k), temperature=c.eval.temperature,
        max_new_tokens=c.rl.max_new_tokens, template=c.data.template,
        reward="prefix_match" if c.rl.reward == "dense" else c.rl.reward,
        batch_size=c.eval.batch_contexts, prompt_buckets=tuple(c.data.prompt_buckets),
        seed=c.seed)
    report = evaluate_lib.evaluate(self.model, self.tokenizer, sampler, self.records_dir,
                                   config=eval_config, rng=jax.random.key(c.seed + 1),
                                   mesh=self.mesh)
    if jax.process_index() == 0:
      out_dir = assemble.workdir_path(self.files, "eval")
      evaluate_lib.write_report({"step": step, "label": label, "report": report}, out_dir,
                                label)
      MetricsWriter(self.files, mode="eval", tensorboard=False).write(
          step, {f"{split}/{k}": v for split, r in report.items() for k, v in r.items()
                 if isinstance(v, (int, float))})
    return report

  def export(self, export_dir: str | None = None) -> dict:
    step = self._sync_policy_from_checkpoint()
    path = export_dir or assemble.workdir_path(self.files, "export")
    hf_io.save_hf(self.model, self.model_config, path)
    if jax.process_index() == 0 and hasattr(self.tokenizer, "name"):
      _copy_tokenizer(self.tokenizer, path)
    return {"exported_step": step, "path": path}

  def run_all(self) -> str:
    """The offline default end to end; returns the before/after report table."""
    _ = self.tokenizer
    self.pretrain()
    self.prepare()
    before_path = os.path.join(self.files, "eval", "before_rpt.json")
    if os.path.exists(before_path):  # A resumed run keeps its first "before" measurement.
      with open(before_path) as f:
        before = json.load(f)["report"]
    else:
      before = self.evaluate("before_rpt")
    self.train()
    after = self.evaluate("after_rpt")
    reports = {"before RPT": before, "after RPT": after}
    if jax.process_index() == 0:
      evaluate_lib.plot_report(reports, os.path.join(self.files, "eval", "before_after.png"))
    return summary_table(before, after)


def summary_table(before: dict, after: dict) -> str:
  """Next-token-reasoning accuracy before/after RPT per difficulty split."""
  lines = ["", "Next-token reasoning accuracy on held-out positions (%):",
           f"{'split':<8} {'positions':>9} {'before':>8} {'after':>8} {'format before':>14} "
           f"{'format after':>13}"]
  for split in after:
    b, a = before.get(split, {}), after[split]
    fmt = lambda v: "   -" if v is None else f"{v:8.2f}"
    lines.append(f"{split:<8} {a.get('num_positions', 0):>9} {fmt(b.get('reasoning_accuracy'))}"
                 f" {fmt(a.get('reasoning_accuracy'))} {fmt(b.get('format_rate')):>14}"
                 f" {fmt(a.get('format_rate')):>13}")
  return "\n".join(lines)


class _NullIterator:
  """Stands in for a data iterator when only the params of a checkpoint are wanted."""

  def set_state(self, state) -> None:
    del state

  def get_state(self) -> bytes:
    return b""


def _sync(name: str) -> None:
  from jax.experimental import multihost_utils
  multihost_utils.sync_global_devices(f"rpt_jax:{name}")


def _copy_tokenizer(tokenizer, path: str) -> None:
  """Copies the tokenizer's files beside the exported weights when it came from files."""
  import shutil
  source = getattr(tokenizer, "path", None) or getattr(tokenizer, "name", None)
  if not source or not os.path.exists(source):
    return
  if os.path.isdir(source):
    for name in os.listdir(source):
      if name.startswith("tokenizer") or name in ("special_tokens_map.json",
                                                   "chat_template.jinja"):
        shutil.copy2(os.path.join(source, name), path)
  else:
    shutil.copy2(source, path)
