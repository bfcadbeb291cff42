"""One run's stages over its workdir: tokenizer, pretrain, prepare, train, eval, export.

`Run(spec, workdir)` builds the mesh, tokenizer and policy once and runs whichever stages the
mode asks for. Each stage resumes from what the workdir holds (see rpt_jax.assemble for the
layout): a finished stage is skipped, a stopped one continues.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os

import jax
from absl import logging
from flax import nnx

from rpt_jax import assemble, console, errors, evaluate as evaluate_lib
from rpt_jax import export as export_lib
from rpt_jax import report as report_lib
from rpt_jax import run_dir
from rpt_jax import checkpoint as checkpoint_lib
from rpt_jax import pretrain as pretrain_lib
from rpt_jax import train as train_lib
from rpt_jax import validate
from rpt_jax.data import fingerprints, synthetic
from rpt_jax.data import prepare as prepare_lib
from rpt_jax.data.pipeline import PromptLoader, read_manifest
from rpt_jax.data import sources
from rpt_jax.data.sources import iter_documents
from rpt_jax.metrics import MetricsWriter
from rpt_jax.spec import RunSpec, VocabFacts
from rpt_jax.train import RPTTrainer


class Run:
  """Lazily built pieces of one run and its stages."""

  def __init__(self, spec: RunSpec, workdir: str, *, progress: bool = True):
    self.spec, self.workdir, self.progress = spec, workdir, progress
    # Checkpoints (Orbax) go to `workdir` as given, gs:// included; every other file goes to
    # `files`: the same folder, through the bucket's gcsfuse mount for a gs:// workdir.
    self.files = run_dir.files_dir(workdir)
    self.mesh, self.rules = assemble.make_run_mesh(spec)
    self.records_dir = assemble.records_dir(spec, self.files)
    self._trainer: RPTTrainer | None = None

  # -- pieces ------------------------------------------------------------------------------------

  @functools.cached_property
  def tokenizer(self):
    if jax.process_count() > 1 and jax.process_index() != 0:
      _sync("tokenizer")  # Process 0 trains/writes it first.
      return assemble.load_or_train_tokenizer(self.spec, self.files)
    tokenizer = assemble.load_or_train_tokenizer(self.spec, self.files)
    if jax.process_count() > 1:
      _sync("tokenizer")
    return tokenizer

  @functools.cached_property
  def model(self):
    """The policy: HF weights or a random init, then the pretrained params if the workdir has
    them (the RPT checkpoints, newer still, are restored by the trainer)."""
    # Checked on the config alone, before the initialiser compiles or weights load.
    validate.validate_against_model(self.spec, self.spec.model.model_config(
        VocabFacts.of(self.tokenizer)).max_position_embeddings)
    model, model_config = assemble.build_policy(self.spec, self.tokenizer, self.mesh,
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

  @functools.cached_property
  def sampler(self):
    """The evaluation sampler (compiled once per run; takes the weights at each call): the
    rollout engine, as the RPT loop generates."""
    rpt = self.spec.rpt
    return train_lib.make_rollout_sampler(self.model, rpt, mesh=self.mesh, rules=self.rules,
                                          pad_id=self.tokenizer.pad_id)

  def _pretrain_checkpointer(self) -> checkpoint_lib.Checkpointer:
    return checkpoint_lib.Checkpointer(assemble.workdir_path(self.workdir, "pretrain"),
                                       max_to_keep=1, async_save=False)

  def documents(self) -> list[str]:
    return list(iter_documents(self.spec.source))

  @property
  def trainer(self) -> RPTTrainer:
    if self._trainer is None:
      self._trainer = RPTTrainer(
          self.model, self.tokenizer, self.spec.rpt, mesh=self.mesh, rules=self.rules,
          workdir=self.workdir, files_dir=self.files,
          keep_checkpoints=self.spec.keep_checkpoints, progress=self.progress)
    return self._trainer

  # -- stages ------------------------------------------------------------------------------------

  def pretrain(self) -> dict | None:
    config = self.spec.pretrain
    # First: loads the pretrained params when present, and checks the config against the model
    # before anything else is opened (an open Checkpointer would outlive a ConfigError).
    model = self.model
    if config is None:
      return None
    ckpt = self._pretrain_checkpointer()
    if ckpt.latest_step() is not None:
      ckpt.close()
      return None
    writer = MetricsWriter(self.files, mode="pretrain", resume_step=0)
    documents = pretrain_lib.train_documents(self.documents(), self.spec.prepare.eval_fraction,
                                             self.spec.prepare.seed)
    metrics = pretrain_lib.pretrain(model, self.tokenizer, documents, config,
                                    mesh=self.mesh, rules=self.rules, progress=self.progress,
                                    log_fn=writer.write)
    writer.close()
    ckpt.save(config.steps, {"params": nnx.to_pure_dict(nnx.state(model, nnx.Param))},
              force=True)
    ckpt.wait_until_finished()
    ckpt.close()
    return {"pretrain": {k: v for k, v in metrics.items() if isinstance(v, (int, float))}}

  def prepare(self) -> dict:
    if os.path.exists(os.path.join(self.records_dir, prepare_lib.MANIFEST)):
      return {"records": self._check_records()["counts"]}
    proxy = assemble.load_proxy(self.spec, self.model, self.mesh, self.rules)
    # Every process: one SPMD scorer over the run's mesh, each feeding its own documents.
    manifest = prepare_lib.prepare(
        self.spec.prepare, self.tokenizer, proxy, self.records_dir, mesh=self.mesh,
        show_progress=self.progress and jax.process_index() == 0)
    return {"records": manifest["counts"]}

  def _check_records(self) -> dict:
    """The finished preparation's manifest, if made with this data config and tokenizer.

    The proxy's weight fingerprint (`fingerprints.proxy_identity`) is not compared: that would load
    a separate proxy (`data.proxy_hf_path`) only to check it; `prepare` itself compares it
    when it resumes an unfinished folder.
    """
    manifest = read_manifest(self.records_dir)
    found = manifest["identity"]
    want = {"config": self.spec.prepare.to_dict(),
            "tokenizer": fingerprints.tokenizer_identity(self.tokenizer)}
    for key, value in want.items():
      if found.get(key) != value:
        raise errors.InputError(
            f"{self.records_dir!r} holds records prepared with another data {key}; use a new "
            "data.records_dir (or workdir) or delete that folder.")
    return manifest

  def train_loader(self) -> PromptLoader:
    loader = self.spec.loader
    # The rows of each global batch this process's devices hold (any mesh device order).
    rows = train_lib.process_batch_rows(self.mesh, self.rules, loader.batch_contexts)
    return PromptLoader(self.records_dir, "train", self.tokenizer, batch_size=len(rows),
                        shard_count=loader.batch_contexts // len(rows), rows=rows,
                        template=loader.template, prompt_buckets=loader.prompt_buckets,
                        seed=loader.seed, shuffle=True, num_epochs=None,
                        worker_count=loader.worker_count)

  def train(self, on_step=None) -> dict:
    """The RPT loop (resumed); `on_step(step, metrics)` is called after each new step."""
    if not os.path.exists(os.path.join(self.records_dir, prepare_lib.MANIFEST)):
      self.prepare()
    iterator = iter(self.train_loader())
    trainer = self.trainer
    trainer.restore(iterator)
    metrics = trainer.run(iterator, on_step=on_step)
    nnx.update(self.model, trainer.params())
    if checkpoint_lib.stopped_at() is not None:  # SIGTERM: saved; no later stage runs.
      raise errors.Preempted(checkpoint_lib.stopped_at())
    return {k: v for k, v in metrics.items() if k.startswith(("reward/", "train/loss"))}

  def _load_rpt_params(self) -> int:
    """Puts the latest RPT params into the policy (eval/export); returns their step (0: none
    yet, the policy as pretrained). Reads the parameters alone: no trainer, no optimiser state."""
    if self._trainer is not None:  # Trained in this process: its state is the newest.
      nnx.update(self.model, self._trainer.params())
      return self._trainer.step
    params = nnx.state(self.model, nnx.Param)
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), params)
    with checkpoint_lib.Checkpointer(self.workdir, async_save=False) as ckpt:
      restored = ckpt.restore_params(abstract)
    if restored is None:
      return 0
    step, values = restored
    nnx.update(self.model, values)
    return int(step)

  def evaluate(self, label: str | None = None) -> dict:
    """The `eval` stage: the report of `evaluate_full`."""
    return self.evaluate_full(label)["report"]

  def evaluate_full(self, label: str | None = None, records_dir: str | None = None) -> dict:
    """Evaluates the latest policy on the held-out records (this run's, or `records_dir`'s) and
    writes eval/<label>.json: {step, label, report} and, on the synthetic corpus, the breakdown
    by line kind; returns that dict."""
    step = self._load_rpt_params()
    label = label or f"step_{step}"
    records_dir = records_dir or self.records_dir
    measured = evaluate_lib.measure(self.model, self.tokenizer, self.sampler, records_dir,
                                    config=self.spec.eval, rng=jax.random.key(self.spec.seed + 1),
                                    mesh=self.mesh, params=nnx.state(self.model))
    thresholds = evaluate_lib.bucket_thresholds(records_dir)
    report = evaluate_lib.summarize(measured, thresholds, self.spec.eval.pass_k)
    result = {"step": step, "label": label, "report": report}
    if self.spec.source.kind == "synthetic":
      result["breakdown"] = evaluate_lib.breakdown(measured, self._line_kind, thresholds)
    if jax.process_index() == 0:
      out_dir = assemble.workdir_path(self.files, "eval")
      report_lib.write_report(result, out_dir, label)
      MetricsWriter(self.files, mode="eval", tensorboard=False).write(
          step, {f"{split}/{k}": v for split, r in report.items() for k, v in r.items()
                 if isinstance(v, (int, float))})
    return result

  def _line_kind(self, record) -> str:
    """'<line kind>: computed' or '<line kind>: other' (`synthetic.position_kind`)."""
    line = self.tokenizer.decode(record.context_ids.tolist()).rsplit("\n", 1)[-1]
    kind, computable = synthetic.position_kind(line)
    return f"{kind}: {'computed' if computable else 'other'}"

  def export(self, export_dir: str | None = None) -> dict:
    """The policy as an HF checkpoint: weights, every tokenizer file, generation_config.json."""
    step = self._load_rpt_params()
    path = export_dir or assemble.workdir_path(self.files, "export")
    export_lib.export_hf(self.model, self.model_config, self.tokenizer, path)
    return {"exported_step": step, "path": path}

  def study(self) -> str:
    """The study mode (rpt_jax.study): scaling curve and filter ablation; returns report.md."""
    from rpt_jax import study  # pylint: disable=g-import-not-at-top
    return study.run_study(self, self.spec.study)

  def filter_run(self, filter_name: str, workdir: str, records_dir: str | None = None,
                 eval_samples: int | None = None, **prepare_overrides) -> "Run":
    """This run's policy and budget with position filter `filter_name`, in `workdir`: its
    tokenizer and pretrained policy are this run's (linked), its records `records_dir` or its
    own (prepared with `prepare_overrides` of PrepareConfig fields), its RL checkpoints, metrics
    and evaluations its own (`eval_samples` sampled answers per position, if given)."""
    os.makedirs(workdir, exist_ok=True)
    for name in ("tokenizer", "pretrain"):
      link = os.path.join(workdir, name)
      if not os.path.lexists(link):
        os.symlink(os.path.abspath(os.path.join(self.files, name)), link)
    spec = dataclasses.replace(
        self.spec, prepare=dataclasses.replace(self.spec.prepare, filter=filter_name,
                                               **prepare_overrides),
        records_dir=records_dir or "")
    if eval_samples is not None:
      spec = dataclasses.replace(spec, eval=dataclasses.replace(
          spec.eval, num_samples=eval_samples, pass_k=(1,)))
    return Run(spec, workdir, progress=self.progress)

  def run_all(self) -> str:
    """The offline default end to end; returns the before/after tables."""
    console.stage("tokenizer")
    _ = self.tokenizer
    if self.spec.pretrain is not None:
      console.stage(f"pretrain ({self.spec.pretrain.steps} steps)")
    self.pretrain()
    if not os.path.exists(os.path.join(self.records_dir, prepare_lib.MANIFEST)):
      # Evaluation follows: its held-out split must get documents (one line if not, now).
      sources.check_heldout(self.spec.source, self.spec.prepare.eval_fraction, self.spec.seed)
    console.stage("prepare: score and filter positions")
    self.prepare()
    # A resumed run keeps its first "before" measurement.
    before = self._read_eval("before_rpt")
    if before is None:
      console.stage("evaluate before RPT")
      before = self.evaluate_full("before_rpt")
    console.stage(f"RPT ({self.spec.rpt.steps} steps)")
    self.train()
    console.stage("evaluate after RPT")
    after = self.evaluate_full("after_rpt")
    if jax.process_index() == 0:
      report_lib.plot_report({"before RPT": before["report"], "after RPT": after["report"]},
                             os.path.join(self.files, "eval", "before_after.png"))
    table = report_lib.summary_table(before["report"], after["report"])
    if "breakdown" in after:
      table += "\n\n" + report_lib.breakdown_table(before.get("breakdown", {}),
                                                    after["breakdown"])
    return table

  def _read_eval(self, label: str) -> dict | None:
    """eval/<label>.json as written by `evaluate_full`, None if not written yet."""
    path = os.path.join(self.files, "eval", f"{label}.json")
    if not os.path.exists(path):
      return None
    with open(path) as f:
      return json.load(f)


def _sync(name: str) -> None:
  from jax.experimental import multihost_utils
  multihost_utils.sync_global_devices(f"rpt_jax:{name}")
