"""Over-sampled rollouts in the RPT loop (`rl.oversample_contexts`): the pool of contexts waiting
for the rollout engine, and the per-step `rollout/*` metrics of its calls.

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
from typing import Callable, Iterable

import numpy as np

from rpt_jax.data.pipeline import PromptBatch
from rpt_jax.rl.engine import GroupRollouts


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
