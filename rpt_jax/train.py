"""The RPT loop: prompt batches -> G rollouts per context -> rewards -> GRPO update -> metrics.

One step (PAPER.md, Section 3.3):
  data      next `PromptBatch` of this process's contexts from the Grain loader
  rollout   the slot engine prefills each context once and decodes its G responses in free slots
  reward    each process decodes and scores only its own rows (prefix-matching reward on bytes);
            objectives that need model scores (dense, RLP's information gain, the KL reference's
            log-probs, RMT's context mask and length reward) get them from
            `rpt_jax.rl.rollout_scores` first (`rpt_jax.rl.objectives` names them)
  advantage group-normalised advantages; from `dynamic_sampling_from_step` on, groups whose G
            rewards are all equal are dropped and the batch is refilled from further contexts
            (the choice is made on the GLOBAL rewards, the same on every process, and the kept
            groups are gathered on device, so it is the choice a single process would make)
  train     one jitted, sharded parameter update (gradient accumulation over micro-batches)
  checkpoint every `checkpoint_every` steps, on SIGTERM/preemption, and at the end

A run is a pure function of (config, data, step): the rollout key is `fold_in(root, step)`, the
loader state is checkpointed with the parameters, so a resumed run logs the same numbers.

Over-sampling (`rl.oversample_contexts` O > 0; off by default, the paper is exactly on-policy):
every rollout call (`rpt_jax.oversample.OversampledRollouts`) offers the engine B + O contexts
from a `ContextPool` (whole global batches, topped up from the loader) and takes the first B
whole groups to finish (`SlotEngine.generate_groups`); contexts it never started go back to the
pool, rows still decoding are dropped or, with `rl.partial_rollouts`, continue in the next call
under the new weights. The B returned groups are the candidate batch (scoring, dynamic sampling
and the update as above); a group sampled partly under older weights (staleness > 0) enters the
PPO ratio with the engine's per-token log-probs (`RolloutBatch.old_logprobs`), the others stay
exactly on-policy. `rollout/*` metrics log kept, admitted, dropped, carried and unstarted
contexts, the staleness and the engine's slot utilization. Pooled and carried contexts are not
checkpointed: a resumed run continues at the loader batch after the last one pulled into the
pool (those contexts are skipped, carried rows are lost).

Several processes (multi-host): each process's loader reads the rows of every global batch that
its devices hold under the batch sharding (`process_batch_rows`), rows go to device with
`jax.make_array_from_process_local_data` and come back with `host_rows.local_rows`; the sampler
and the update are SPMD programs every process runs in lockstep. Everything logged is global: reward
metrics are computed on the all-gathered rewards of all processes. Global batch n holds the same
records for every process count, so the same config logs the same numbers on 1 or N processes
(to fp32 reduction order) and a checkpoint restores under another process count: its Grain
state cannot be re-split, so the loader seeks to the saved global batch count instead.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rpt_jax import checkpoint as checkpoint_lib
from rpt_jax import host_rows
from rpt_jax import mesh as mesh_lib
from rpt_jax.data.pipeline import PromptBatch
from rpt_jax.metrics import MetricsWriter, to_float
from rpt_jax.oversample import ContextPool, OversampledRollouts, whole_batch
from rpt_jax.rl import advantages as advantages_lib
from rpt_jax.rl.rpt_config import RPTConfig
from rpt_jax.rl import dynamic_sampling, optim, prompts, update
from rpt_jax.rl import teacher as teacher_lib
from rpt_jax.rl import train_state
from rpt_jax.rl.engine import SlotEngine
from rpt_jax.rl.reward import RewardBatch
from rpt_jax.rl.sampler import SampleOutput
from rpt_jax.rl.rollout_scores import RolloutScorer


class Timer:
  """Wall time per named phase of one step."""

  def __init__(self):
    self.seconds: dict[str, float] = {}

  def phase(self, name: str):
    timer = self

    class _Span:
      def __enter__(self):
        self.start = time.perf_counter()

      def __exit__(self, *exc):
        timer.seconds[name] = timer.seconds.get(name, 0.0) + time.perf_counter() - self.start

    return _Span()


def make_rollout_sampler(model: nnx.Module, config: RPTConfig, **kwargs) -> SlotEngine:
  """The rollout sampler on any process count: the continuous-batching `SlotEngine` with the
  config's decode slots and prefill contexts (rows never wait for the longest one; kwargs: the
  Sampler's mesh, rules, pad_id). It gives the static `Sampler`'s
  tokens for the same rows (tests/rl/test_engine.py); on several processes every process runs
  its scheduler in lockstep on the gathered prompts (tests/test_multihost.py)."""
  return SlotEngine(model, decode_slots=config.slots, prefill_contexts=config.prefill_contexts,
                    **kwargs)


def process_batch_rows(mesh: Mesh, rules: mesh_lib.ShardingRules, global_batch: int
                       ) -> list[int]:
  """The rows of a [global_batch] batch-sharded array that this process's devices hold, in the
  order `jax.make_array_from_process_local_data` maps local rows to (ascending). Feed the loader
  these rows (`PromptLoader(rows=...)`) and a mesh of any device order keeps global row r the
  same record on every process count; processes that hold the same rows read the same records."""
  sharding = NamedSharding(mesh, rules.spec(("batch",)))
  return list(host_rows.batch_feed(sharding, global_batch).rows)


def _pad_prompts(batch: update.RolloutBatch, width: int, pad_id: int) -> update.RolloutBatch:
  """Right-pads prompt_tokens (and the context mask) to `width` (candidates can come from
  different length buckets)."""
  extra = width - batch.prompt_tokens.shape[1]
  if extra == 0:
    return batch
  pad = lambda x, value: np.pad(x, ((0, 0), (0, extra)), constant_values=value)  # noqa: E731
  return batch.replace(prompt_tokens=pad(batch.prompt_tokens, pad_id),
                       context_mask=(None if batch.context_mask is None
                                     else pad(batch.context_mask, 0)))


class RPTTrainer:
  """Owns the policy's train state, the sampler and the jitted update; runs the RPT loop."""

  def __init__(self, model: nnx.Module, tokenizer, config: RPTConfig, *, mesh: Mesh,
               rules: mesh_lib.ShardingRules | None = None, workdir: str,
               files_dir: str | None = None,
               checkpointer: checkpoint_lib.Checkpointer | None = None,
               keep_checkpoints: int = 3, progress: bool = True):
    self.config, self.tokenizer, self.mesh = config, tokenizer, mesh
    self.rules = rules or mesh_lib.ShardingRules()
    self.workdir, self.progress = workdir, progress
    self.files_dir = files_dir or workdir  # metrics (a local path or a gcsfuse mount of workdir)
    self.G = config.num_generations
    self.optimizer = optim.make_optimizer(**config.optimizer)
    self.graphdef, _ = train_state.split_params(model)
    objective = config.objective
    self.state = train_state.create_train_state(
        model, self.optimizer, mesh=mesh, rules=self.rules, teacher=objective.objective.teacher,
        reference=teacher_lib.reference_source(objective.kl.reference, config.loss.beta,
                                               model.config, mesh=mesh, rules=self.rules))
    self.train_step = update.make_train_step(
        self.graphdef, config.loss, self.optimizer, num_generations=self.G,
        temperature=config.temperature, micro_batch_contexts=config.train_micro_contexts,
        shared_prefix=config.shared_prefix, mesh=mesh, rules=self.rules,
        ema_decay=getattr(objective.settings, "ema_decay", None))
    self.sampler = make_rollout_sampler(model, config, mesh=mesh, rules=self.rules,
                                        pad_id=tokenizer.pad_id)
    self.root_key = jax.random.key(config.seed)
    self.checkpointer = checkpointer or checkpoint_lib.Checkpointer(
        workdir, save_interval_steps=max(config.checkpoint_every, 1),
        max_to_keep=keep_checkpoints)
    self.batch_sharding = NamedSharding(mesh, self.rules.spec(("batch",)))
    self.step = 0
    self.data_batches = 0  # Loader batches read so far: the data position in any layout.
    self.oversampled = None if not config.oversample_contexts else OversampledRollouts(
        self.sampler, config, pad_id=tokenizer.pad_id, stop_ids=tokenizer.stop_ids,
        rows=process_batch_rows(mesh, self.rules, config.batch_contexts),
        whole=lambda batch: whole_batch(self._global_width(batch), self._all_rows),
        local_rollouts=lambda out: self._local_rollouts(out, with_logprobs=True))
    self._checkpoint_seconds: float | None = None
    self._gather = jax.jit(dynamic_sampling.gather_groups, out_shardings=self.batch_sharding)
    self.scorer = RolloutScorer(
        self.graphdef, tokenizer, objective, config.loss, num_generations=self.G,
        temperature=config.temperature, template=config.template,
        shared_prefix=config.shared_prefix, to_global=self._to_global, mesh=mesh,
        rules=self.rules)

  # -- state ---------------------------------------------------------------------------------------

  def restore(self, data_iterator) -> bool:
    """Restores the latest checkpoint (params, optimiser, step, loader state); False if none.
    Over-sampling's pooled and carried contexts are not in it: they start empty."""
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), self.state)
    restored = self.checkpointer.restore_latest(abstract)
    if restored is None:
      return False
    step, self.state, data_state, extra = restored
    self.step = int(step)
    if self.oversampled is not None:  # Pooled and carried contexts are not checkpointed.
      self.oversampled.reset()
    self.data_batches = int((extra or {}).get("data_batches", 0))
    if data_state is not None and self._set_loader_state(data_iterator, data_state):
      pass
    elif "data_batches" in (extra or {}) and hasattr(data_iterator, "seek"):
      # Written under another process count: batch n is global batch n in every layout.
      data_iterator.seek(self.data_batches)
      logging.info("Checkpoint %d is from another process layout: the loader continues at "
                   "global batch %d.", step, self.data_batches)
    else:
      logging.warning("Checkpoint %d has no loader state for this process layout; the data "
                      "order restarts.", step)
    logging.info("Resumed from step %d.", self.step)
    return True

  def _set_loader_state(self, data_iterator, data_state) -> bool:
    """Grain refuses a state whose data source differs by path (a copied/moved workdir): the
    caller then seeks to the saved global batch, which is the same position."""
    try:
      data_iterator.set_state(data_state)
      return True
    except ValueError as e:
      logging.warning("Loader state not restorable (%s); seeking to the saved batch instead.", e)
      return False

  def save(self, data_iterator, *, force: bool = False) -> None:
    self.checkpointer.save(self.step, self.state, data_state=data_iterator.get_state(),
                           extra={"step": self.step, "data_batches": self.data_batches},
                           force=force)

  def params(self):
    return self.state.params

  @property
  def pool(self) -> ContextPool | None:
    """Over-sampling's contexts waiting for the engine (None: over-sampling off)."""
    return None if self.oversampled is None else self.oversampled.pool

  # -- one step ------------------------------------------------------------------------------------

  def _to_global(self, local: np.ndarray) -> jax.Array:
    return jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(local))

  def _all_rows(self, local: np.ndarray) -> np.ndarray:
    """Every process's rows of a per-process row array, in global row order, on every process."""
    if jax.process_count() == 1:
      return np.asarray(local)
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(self._to_global(local), tiled=True))

  def _global_width(self, batch: PromptBatch) -> PromptBatch:
    """Pads this process's prompts to the widest bucket of any process: the global array needs
    one width, and it is then the bucket a single process would pick for the whole batch."""
    if jax.process_count() == 1:
      return batch
    from jax.experimental import multihost_utils
    width = int(np.max(multihost_utils.process_allgather(np.int32(batch.prompt_tokens.shape[1]))))
    extra = width - batch.prompt_tokens.shape[1]
    if extra == 0:
      return batch
    return dataclasses.replace(batch, prompt_tokens=np.pad(
        batch.prompt_tokens, ((0, 0), (0, extra)), constant_values=self.tokenizer.pad_id))

  def global_scores(self, scored: RewardBatch) -> RewardBatch:
    """The rewards of ALL processes' rows (global row order): what metrics and dynamic sampling
    read, so they equal a single process's. One all-gather of [rows, 4 + components] fp32
    (exact: rewards are fp32, the rest small integers; components are logged in fp32)."""
    lengths = (np.zeros_like(scored.rewards) if scored.response_lengths is None
               else scored.response_lengths)
    names = sorted(scored.components)
    both = self._all_rows(np.stack([scored.rewards, scored.has_prediction, scored.correct,
                                    lengths, *(scored.components[k] for k in names)],
                                   axis=1).astype(np.float32))
    return RewardBatch(rewards=both[:, 0], has_prediction=both[:, 1] > 0,
                       correct=both[:, 2] > 0,
                       response_lengths=(None if scored.response_lengths is None
                                         else both[:, 3].astype(np.int32)),
                       predictions=(),
                       components={k: both[:, 4 + i] for i, k in enumerate(names)})

  def budget(self, step: int) -> int:
    """This step's response budget: RMT's decaying thought budget, else rl.max_new_tokens."""
    cfg = self.config
    return cfg.objective.budget.at(step, cfg.steps, cfg.max_new_tokens)

  def _rollout_key(self, step: int, attempt: int) -> jax.Array:
    return jax.random.fold_in(jax.random.fold_in(self.root_key, step), attempt)

  def rollout(self, batch: PromptBatch, step: int, attempt: int):
    cfg = self.config
    # A scalar budget (one decode compile per distinct value; ThoughtBudget.at keeps them few).
    out = self.sampler.generate(
        self._to_global(batch.prompt_tokens), self._to_global(batch.prompt_lengths),
        num_samples=self.G, max_new_tokens=self.budget(step), temperature=cfg.temperature,
        top_k=cfg.top_k, top_p=cfg.top_p, eos_ids=tuple(self.tokenizer.stop_ids),
        rng=self._rollout_key(step, attempt), params=self.state.params)
    return self._local_rollouts(out)

  def _local_rollouts(self, out: SampleOutput, with_logprobs: bool = False):
    """(tokens [R, max_new_tokens], lengths, done[, logprobs [R, max_new_tokens]]) of this
    process's rows of a sampler output."""
    cfg = self.config
    fields = (out.tokens, out.lengths, out.done) + ((out.logprobs,) if with_logprobs else ())
    # Batch-sharded again (micro-batch outputs are concatenated) so each process reads its rows.
    rows = [host_rows.local_rows(x) for x in jax.device_put(fields, self.batch_sharding)]
    extra = ((0, 0), (0, cfg.max_new_tokens - rows[0].shape[1]))  # One width every step.
    rows[0] = np.pad(rows[0], extra, constant_values=self.tokenizer.pad_id)
    return tuple(rows[:3]) + ((np.pad(rows[3], extra),) if with_logprobs else ())

  def score(self, batch: PromptBatch, tokens: np.ndarray, lengths: np.ndarray,
            done: np.ndarray, step: int):
    """(rewards, objective scores) of this process's rows; a response's stop token is not part
    of its text."""
    parts = self.scorer.score(self.state, batch.prompt_tokens, batch.prompt_lengths,
                              batch.completions(), batch.boundary_lists(), tokens, lengths,
                              done, self.budget(step))
    responses = prompts.response_texts(self.tokenizer, tokens, lengths, done)
    completions = [c for c in batch.completions() for _ in range(self.G)]
    boundaries = [b for b in batch.boundary_lists() for _ in range(self.G)]
    return parts.rewards(responses, completions, boundaries, self.config.reward, lengths), parts

  def candidate(self, data_iterator, step: int, attempt: int, timer: Timer):
    """One candidate rollout batch (this process's rows, numpy) and the scored rewards of all
    processes' rows (global order)."""
    old_logprobs = None
    if self.oversampled is None:
      with timer.phase("data"):
        batch = self._global_width(next(data_iterator))
        self.data_batches += 1
      with timer.phase("rollout"):
        tokens, lengths, done = self.rollout(batch, step, attempt)
    else:
      with timer.phase("data"):
        self.data_batches += self.oversampled.top_up(data_iterator, self.data_batches)
      with timer.phase("rollout"):
        batch, tokens, lengths, done, old_logprobs = self.oversampled.rollout(
            self.state.params, step=step, rng=self._rollout_key(step, attempt),
            max_new_tokens=self.budget(step))
    with timer.phase("reward"):
      scored, parts = self.score(batch, tokens, lengths, done, step)
      advantages = advantages_lib.group_advantages(
          jnp.asarray(scored.rewards), self.G, estimator=self.config.advantage)
      # The trained tokens: the whole response, or the thought alone (RLP).
      mask = np.arange(tokens.shape[1])[None, :] < parts.gradient_lengths[:, None]
      rollouts = update.RolloutBatch(
          prompt_tokens=batch.prompt_tokens, prompt_lengths=batch.prompt_lengths,
          completion_tokens=tokens, completion_mask=mask.astype(np.int32),
          advantages=np.asarray(advantages, np.float32), old_logprobs=old_logprobs,
          ref_logprobs=parts.ref_logprobs, context_mask=parts.context_mask)
      scored = self.global_scores(scored)
    return rollouts, scored

  def dynamic_sampling_active(self, step: int) -> bool:
    return step >= self.config.dynamic_sampling_from_step

  def gather_candidates(self, data_iterator, step: int, timer: Timer):
    """Candidates for dynamic sampling, generated in lockstep on every process (the sampler is
    one SPMD program): more are drawn until the GLOBAL batch has enough groups with reward
    spread (every process sees the same global rewards, so all stop together).

    Returns [(this process's rollouts, global RewardBatch)] with prompts padded to one width.
    """
    cfg = self.config
    active = self.dynamic_sampling_active(step)
    candidates = []
    for attempt in range(cfg.dynamic_sampling_max_tries if active else 1):
      candidates.append(self.candidate(data_iterator, step, attempt, timer))
      if dynamic_sampling.enough_groups([s.rewards for _, s in candidates], self.G):
        break
    width = max(c.prompt_tokens.shape[1] for c, _ in candidates)  # Candidates' buckets differ.
    return [(_pad_prompts(c, width, self.tokenizer.pad_id), s) for c, s in candidates]

  def assemble(self, candidates, step: int):
    """(global train batch, GroupChoice): dynamic sampling's choice on the global rewards, the
    chosen groups gathered from the candidates on device (rows may move between processes)."""
    choice = dynamic_sampling.choose_groups([s.rewards for _, s in candidates], self.G,
                                            active=self.dynamic_sampling_active(step))
    if choice.is_first_candidate:
      return jax.tree.map(self._to_global, candidates[0][0]), choice
    replicated = NamedSharding(self.mesh, PartitionSpec())
    index = jax.device_put(choice.rows(self.G), replicated)  # The same values on every process.
    stacked = [jax.tree.map(self._to_global, c) for c, _ in candidates]
    return self._gather(stacked, *index), choice

  def run_step(self, data_iterator: Iterator[PromptBatch], writer: MetricsWriter | None) -> dict:
    cfg, step, timer = self.config, self.step, Timer()
    if self.oversampled is not None:
      self.oversampled.start_step()
    candidates = self.gather_candidates(data_iterator, step, timer)
    scored = candidates[0][1]
    with timer.phase("train"):
      rollouts, choice = self.assemble(candidates, step)
      self.state, train_metrics = self.train_step(self.state, rollouts)
      train_metrics = jax.device_get(train_metrics)
    self.step += 1
    metrics = {**{f"reward/{k}": v for k, v in scored.metrics().items()},
               **{f"train/{k}": to_float(v) for k, v in train_metrics.items()},
               **(choice.metrics() if self.dynamic_sampling_active(step) else {}),
               **{f"time/{k}": v for k, v in timer.seconds.items()}}
    if self.oversampled is not None:
      metrics.update(self.oversampled.metrics())
    if cfg.objective.budget.active:
      metrics["train/thought_budget"] = float(self.budget(step))
    metrics["time/step"] = sum(timer.seconds.values())
    if self._checkpoint_seconds is not None:  # The save after the previous step.
      metrics["time/checkpoint"] = self._checkpoint_seconds
      self._checkpoint_seconds = None
    if writer is not None and (step % cfg.log_every == 0 or self.step == cfg.steps):
      writer.write(step, metrics)
    return metrics

  # -- the loop ------------------------------------------------------------------------------------

  def run(self, data_iterator, *, on_step: Callable[[int, dict], None] | None = None) -> dict:
    """Trains until `config.steps`; returns the last step's metrics."""
    from tqdm.auto import tqdm

    cfg = self.config
    writer = MetricsWriter(self.files_dir, mode="train", resume_step=self.step)
    self.checkpointer.install_sigterm_handler()
    nonfinite, metrics = 0, {}
    bar = tqdm(total=cfg.steps, initial=self.step, desc="rpt", unit="step",
               disable=not self.progress or jax.process_index() != 0)
    try:
      while self.step < cfg.steps:
        metrics = self.run_step(data_iterator, writer)
        bar.update(1)
        bar.set_postfix(reward=f"{metrics['reward/mean_reward']:.3f}",
                        fmt=f"{metrics['reward/format_rate']:.2f}")
        if on_step is not None:
          on_step(self.step, metrics)
        skipped = metrics.get("train/skipped", 0.0) > 0 or not math.isfinite(
            metrics.get("train/loss", 0.0))
        nonfinite = nonfinite + 1 if skipped else 0
        if skipped:
          logging.warning("step %d: non-finite loss or gradient; the update was skipped.",
                          self.step - 1)
        if nonfinite >= cfg.max_consecutive_nonfinite:
          self.save(data_iterator, force=True)
          self.checkpointer.wait_until_finished()
          raise FloatingPointError(
              f"{nonfinite} consecutive non-finite updates at step {self.step}; stopped after "
              "a checkpoint. Lower optim.learning_rate or check the data.")
        t0 = time.perf_counter()
        if self.checkpointer.should_stop(self.step):
          self.save(data_iterator, force=True)
          self.checkpointer.wait_until_finished()
          logging.warning("Stop requested (SIGTERM/preemption): saved step %d.", self.step)
          break
        self.save(data_iterator, force=self.step == cfg.steps)
        # Logged with the next step's row (this step's row is already written).
        self._checkpoint_seconds = time.perf_counter() - t0
    finally:
      bar.close()
      self.checkpointer.wait_until_finished()
      writer.close()
    return metrics
