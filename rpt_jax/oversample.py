"""Over-sampled rollouts in the RPT loop (`rl.oversample_contexts`): the call the loop makes each
candidate batch (`OversampledRollouts`), the pool of contexts waiting for the rollout engine
(`ContextPool`), and the per-step `rollout/*` metrics of its calls (`RolloutStats`).

The pool holds whole global batches (every process's rows, gathered: the same pool on every
process, so every process offers the engine the same contexts). Each context is keyed by its
global running index, id = n * B + r for row r of global batch n: unique for the run, and the
same on every process count.

One rollout call `take`s the first B + O waiting ids (they are then issued: in the engine). Of
what the engine reports back, the returned groups' records are `pop`ped into the step's batch,
unstarted ids are `give_back` to the FRONT (they are the next call's first), dropped ids are
`discard`ed (rows aborted mid-generation are lost), carried ids stay issued until a later call
returns them. Batches are appended with growing ids and taken from the front, so every taken id
is below every waiting one: the waiting list stays sorted and contexts are offered in data
order.

Not checkpointed: a restart loses the waiting and issued contexts (the loader continues at the
batch after the last one pulled into the pool).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable, Sequence

import jax
import numpy as np

from rpt_jax.data.pipeline import PromptBatch
from rpt_jax.rl.engine import GroupRollouts, SlotEngine
from rpt_jax.rl.rpt_config import RPTConfig
from rpt_jax.rl.sampler import SampleOutput


def whole_batch(batch: PromptBatch, all_rows: Callable[[np.ndarray], np.ndarray]) -> PromptBatch:
  """Every process's rows of a loader batch (global row order), on every process; all_rows
  gathers one per-process row array (`RPTTrainer._all_rows`)."""
  def whole(x):
    if x.dtype.itemsize != 8:
      return all_rows(x)
    # 64-bit fields (doc ids) travel as int32 pairs: JAX arrays are 32-bit by default.
    pairs = all_rows(np.ascontiguousarray(x).reshape(len(x), -1).view(np.int32))
    return np.ascontiguousarray(pairs).view(x.dtype).reshape((-1,) + x.shape[1:])
  return PromptBatch(**{f.name: whole(getattr(batch, f.name)) for f in dataclasses.fields(batch)})


class ContextPool:
  """Waiting and issued `PromptBatch` rows by context id (see the module docstring)."""

  def __init__(self):
    self.waiting: list[int] = []
    self._records: dict[int, tuple[int, dict[str, np.ndarray]]] = {}  # id -> (width, row)

  def __len__(self) -> int:
    """Contexts waiting to be offered."""
    return len(self.waiting)

  @property
  def issued(self) -> int:
    """Contexts handed to the engine and not yet returned, dropped or given back."""
    return len(self._records) - len(self.waiting)

  def add(self, batch: PromptBatch, first_id: int) -> None:
    """Appends a whole batch; row r gets id first_id + r."""
    width = batch.prompt_tokens.shape[1]
    fields = {f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)}
    for r in range(len(batch)):
      self._records[first_id + r] = (width, {k: v[r] for k, v in fields.items()})
      self.waiting.append(first_id + r)

  def take(self, count: int) -> np.ndarray:
    """The first `count` waiting ids (int64), now issued."""
    if count > len(self.waiting):
      raise ValueError(f"the pool holds {len(self.waiting)} contexts, fewer than {count}.")
    ids, self.waiting = self.waiting[:count], self.waiting[count:]
    return np.asarray(ids, np.int64)

  def give_back(self, ids: Iterable[int]) -> None:
    """Issued ids the engine never started: waiting again, first."""
    self.waiting = sorted(int(i) for i in ids) + self.waiting

  def discard(self, ids: Iterable[int]) -> None:
    for i in ids:
      del self._records[int(i)]

  def width(self, ids: Iterable[int]) -> int:
    """The widest prompt bucket among `ids` (the batches they came in)."""
    return max(self._records[int(i)][0] for i in ids)

  def batch(self, ids: Iterable[int], width: int, pad_id: int) -> PromptBatch:
    """The records of `ids`, in that order, with prompts right-padded to `width`."""
    rows = [self._records[int(i)][1] for i in ids]
    if not rows:
      raise ValueError("an empty set of context ids has no batch.")
    fields = {k: np.stack([row[k] for row in rows]) for k in rows[0] if k != "prompt_tokens"}
    longest = int(fields["prompt_lengths"].max())
    if longest > width:
      raise ValueError(f"a pooled prompt of {longest} tokens does not fit the rollout width "
                       f"{width}; set prompt_width to the widest of data.prompt_buckets.")
    tokens = np.full((len(rows), width), pad_id, np.int32)
    for j, row in enumerate(rows):  # Rows keep the width of the batch they came in.
      tokens[j, :min(width, len(row["prompt_tokens"]))] = row["prompt_tokens"][:width]
    fields["prompt_tokens"] = tokens
    return PromptBatch(**fields)

  def pop(self, ids: Iterable[int], width: int, pad_id: int) -> PromptBatch:
    """`batch(ids, ...)`, and the ids leave the pool."""
    ids = list(ids)
    out = self.batch(ids, width, pad_id)
    self.discard(ids)
    return out


class RolloutStats:
  """The over-sampled calls of one step (`add` after each) -> `metrics()` (rollout/*)."""

  def __init__(self):
    self.calls: list[dict[str, float]] = []

  def add(self, out: GroupRollouts, *, offered: int, engine_stats: dict, slots: int) -> None:
    """One call: `out` from `generate_groups` on `offered` contexts; the engine's last_stats."""
    self.calls.append(dict(
        groups=len(out.context_ids), admitted=offered - len(out.unstarted),
        dropped=len(out.dropped), carried=len(out.carried), unstarted=len(out.unstarted),
        staleness_sum=float(out.staleness.sum()), staleness_max=float(out.staleness.max(initial=0)),
        tokens=engine_stats["tokens"], slot_steps=slots * engine_stats["decode_steps"]))

  def metrics(self, pool_size: int) -> dict[str, float]:
    """Counts summed over the step's calls (carried: left in the engine after the last call);
    staleness over the kept groups; slot utilization = generated tokens / (slots x steps)."""
    total = lambda name: float(sum(c[name] for c in self.calls))  # noqa: E731
    return {"rollout/groups_kept": total("groups"),
            "rollout/contexts_admitted": total("admitted"),
            "rollout/contexts_dropped": total("dropped"),
            "rollout/contexts_carried": float(self.calls[-1]["carried"]),
            "rollout/contexts_unstarted": total("unstarted"),
            "rollout/pool_contexts": float(pool_size),
            "rollout/staleness_mean": total("staleness_sum") / max(total("groups"), 1.0),
            "rollout/staleness_max": max(c["staleness_max"] for c in self.calls),
            "rollout/slot_utilization": total("tokens") / max(total("slot_steps"), 1.0)}


class OversampledRollouts:
  """The RPT loop's over-sampled rollout call (`rl.oversample_contexts` > 0): owns the pool and
  the step's `RolloutStats`, offers the engine B + O pooled contexts and returns the B whole
  groups it finished first, as this process's rows.

  sampler: the `SlotEngine`. rows: this process's rows of a [B] batch-sharded array
  (`train.process_batch_rows`). whole: a loader batch -> every process's rows at one width
  (`whole_batch` after `RPTTrainer._global_width`). local_rollouts: a SampleOutput -> this
  process's (tokens [R, N], lengths [R], done [R], logprobs [R, N]) with N = max_new_tokens.
  """

  def __init__(self, sampler: SlotEngine, config: RPTConfig, *, pad_id: int,
               stop_ids: Sequence[int], rows: Sequence[int],
               whole: Callable[[PromptBatch], PromptBatch],
               local_rollouts: Callable[[SampleOutput], tuple[np.ndarray, ...]]):
    self.sampler, self.config = sampler, config
    self.pad_id, self.stop_ids, self.rows = pad_id, tuple(stop_ids), list(rows)
    self.whole, self.local_rollouts = whole, local_rollouts
    self.pool, self.stats = ContextPool(), RolloutStats()

  def reset(self) -> None:
    """After a restore: pooled and carried contexts are not checkpointed, so they start empty."""
    self.pool = ContextPool()
    self.sampler.drop_partial()

  def start_step(self) -> None:
    self.stats = RolloutStats()

  def metrics(self) -> dict[str, float]:
    """rollout/* of this step's calls (`RolloutStats.metrics`)."""
    return self.stats.metrics(len(self.pool))

  def top_up(self, data_iterator, data_batches: int) -> int:
    """Pulls whole loader batches until the pool can offer B + O contexts; data_batches: loader
    batches read before (batch n's row r is context n * B + r). Returns the batches pulled."""
    b, pulled = self.config.batch_contexts, 0
    while len(self.pool) < b + self.config.oversample_contexts:
      self.pool.add(self.whole(next(data_iterator)), first_id=(data_batches + pulled) * b)
      pulled += 1
    return pulled

  def rollout(self, params, *, step: int, rng: jax.Array, max_new_tokens: int):
    """One over-sampled call under `params` (policy version `step`): (this process's
    PromptBatch, tokens, lengths, done, old_logprobs or None), the step's B groups in the order
    they finished. old_logprobs [R, N]: the engine's per-token log-probs of rows sampled partly
    under older weights (with rl.partial_rollouts), NaN on on-policy rows."""
    cfg, b, g = self.config, self.config.batch_contexts, self.config.num_generations
    ids = self.pool.take(b + cfg.oversample_contexts)
    # Carried rows continue only at the width and cache they started with.
    width = cfg.prompt_width if cfg.partial_rollouts else self.pool.width(ids)
    offered = self.pool.batch(ids, width, self.pad_id)
    out = self.sampler.generate_groups(
        offered.prompt_tokens, offered.prompt_lengths, num_samples=g,
        max_new_tokens=max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
        top_p=cfg.top_p, eos_ids=self.stop_ids, rng=rng, params=params, groups_needed=b,
        carry_over=cfg.partial_rollouts, policy_version=step, context_ids=ids,
        cache_tokens=cfg.max_new_tokens if cfg.partial_rollouts else None)
    self.pool.give_back(out.unstarted)
    self.pool.discard(out.dropped)
    self.stats.add(out, offered=len(ids), engine_stats=self.sampler.last_stats,
                   slots=self.sampler.slots)
    batch = self.pool.pop(out.context_ids, width, self.pad_id)  # Group k: global row k.
    batch = PromptBatch(**{f.name: getattr(batch, f.name)[self.rows]
                           for f in dataclasses.fields(batch)})
    tokens, lengths, done, logprobs = self.local_rollouts(out.output)
    old_logprobs = None
    if cfg.partial_rollouts:  # NaN: an on-policy row (RolloutBatch.old_logprobs).
      stale_R = np.repeat(out.staleness[self.rows] > 0, g)
      old_logprobs = np.where(stale_R[:, None], logprobs, np.nan).astype(np.float32)
    return batch, tokens, lengths, done, old_logprobs
