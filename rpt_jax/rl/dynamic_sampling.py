"""Dynamic sampling (DAPO-style, PAPER.md: on from step 500): keep only groups whose G rewards are
not all equal, and refill the batch with groups from further rollout batches.

Owns `groups_with_spread` (pure numpy) and `DynamicSampler` (host side), which the RL loop calls
with a lazy iterator of candidate rollout batches: candidates are only generated while the batch
is not full, and at most `max_tries` of them are consumed.

A group whose rewards are all equal has zero advantage under every estimator ('grpo', 'drgrpo',
'rloo'), so it adds no policy gradient but still adds tokens to a token-mean denominator (diluting
the update) and costs compute. If `max_tries` candidates do not yield B groups with spread, the
batch is PADDED to its static shape with inert groups: copies of dropped (or, if none, kept)
groups whose completion masks and advantages are zeroed, so they add nothing to the loss, its
denominator or the gradient (no recompilation, and the update is the mean over the real groups).
`FillResult.filled` is then False and `num_padded` says how many groups were inert.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Iterator

import numpy as np

from rpt_jax.rl.update import RolloutBatch


def groups_with_spread(rewards_N: Any, group_size: int) -> np.ndarray:
  """bool [N / G]: True where a group's G rewards are not all equal (row i*G+j is group i).

  NaN rewards count as no spread (such a group cannot give a valid advantage).
  """
  rewards = np.asarray(rewards_N, np.float64)
  if rewards.ndim != 1:
    raise ValueError(f"rewards must be a 1-D array [N]; got shape {rewards.shape}.")
  if group_size < 1 or rewards.shape[0] % group_size:
    raise ValueError(f"{rewards.shape[0]} rewards do not split into groups of "
                     f"group_size={group_size}; the batch must hold whole, adjacent groups.")
  groups = rewards.reshape(-1, group_size)
  return (groups.max(axis=1) > groups.min(axis=1)) & ~np.isnan(groups).any(axis=1)


def take_groups(batch: RolloutBatch, groups: np.ndarray, group_size: int) -> RolloutBatch:
  """The sub-batch of the given context indices (each with its G rows), as numpy arrays."""
  groups = np.asarray(groups, np.int64)
  rows = (groups[:, None] * group_size + np.arange(group_size)[None, :]).reshape(-1)

  def pick(value, index):
    return None if value is None else np.asarray(value)[index]

  return RolloutBatch(
      prompt_tokens=pick(batch.prompt_tokens, groups),
      prompt_lengths=pick(batch.prompt_lengths, groups),
      completion_tokens=pick(batch.completion_tokens, rows),
      completion_mask=pick(batch.completion_mask, rows),
      advantages=pick(batch.advantages, rows),
      old_logprobs=pick(batch.old_logprobs, rows),
      ref_logprobs=pick(batch.ref_logprobs, rows))


def concat_batches(batches: list[RolloutBatch]) -> RolloutBatch:
  """Concatenates rollout batches along the batch axis (shapes past axis 0 must agree)."""
  fields = [f.name for f in dataclasses.fields(RolloutBatch)]
  out = {}
  for name in fields:
    values = [getattr(b, name) for b in batches]
    if any(v is None for v in values):
      if not all(v is None for v in values):
        raise ValueError(f"RolloutBatch.{name} is set in some candidate batches and None in "
                         "others; produce every candidate the same way.")
      out[name] = None
      continue
    tails = {np.shape(v)[1:] for v in values}
    if len(tails) > 1:
      raise ValueError(f"candidate batches disagree on the shape of {name} past the batch axis "
                       f"({sorted(tails)}); pad prompts and completions to the same static "
                       "lengths.")
    out[name] = np.concatenate([np.asarray(v) for v in values], axis=0)
  return RolloutBatch(**out)


@dataclasses.dataclass
class FillResult:
  """What `DynamicSampler.fill` assembled.

  batch: B contexts x G rows (numpy); rewards: float [B*G] of those rows (inert padding rows keep
  the rewards of the group they copy). source: int [B, 2] (candidate index, group index within
  that candidate) of each output group, so the loop can gather its own per-rollout extras
  (texts, lengths). padded: bool [B], True for inert padding groups. tries: candidates consumed.
  num_seen / num_dropped / num_padded: groups looked at / dropped for having no spread / inert.
  filled: True when all B groups have reward spread (or, inactive, the first candidate had B).
  Groups with spread found beyond the B-th are discarded.
  """

  batch: RolloutBatch
  rewards: np.ndarray
  source: np.ndarray
  padded: np.ndarray
  tries: int
  num_seen: int
  num_dropped: int
  num_padded: int
  filled: bool

  def metrics(self) -> dict[str, float]:
    seen = max(self.num_seen, 1)
    return {"dynamic_sampling/tries": float(self.tries),
            "dynamic_sampling/dropped_fraction": self.num_dropped / seen,
            "dynamic_sampling/padded_groups": float(self.num_padded),
            "dynamic_sampling/filled": float(self.filled)}


@dataclasses.dataclass(frozen=True)
class DynamicSampler:
  """Fills a batch of `batch_contexts` groups that have reward spread.

  batch_contexts: B, contexts per train batch. group_size: G. from_step: first step at which
  filtering is on (PAPER.md: 500; before it `fill` passes the first candidate through).
  max_tries: most candidate batches consumed per fill (>= 1).
  """

  batch_contexts: int
  group_size: int
  from_step: int = 0
  max_tries: int = 4

  def __post_init__(self):
    for name in ("batch_contexts", "group_size", "max_tries"):
      value = getattr(self, name)
      if int(value) != value or value < 1:
        raise ValueError(f"DynamicSampler.{name}={value} must be a positive integer.")
    if self.from_step < 0:
      raise ValueError(f"DynamicSampler.from_step={self.from_step} must be >= 0.")

  def active(self, step: int) -> bool:
    return step >= self.from_step

  def fill(self, candidates: Iterable[tuple[RolloutBatch, Any]], step: int) -> FillResult:
    """Consumes (batch, rewards_N) candidates lazily until B groups with spread are found or
    `max_tries` candidates were used; see the module docstring for the padding rule."""
    b, g = self.batch_contexts, self.group_size
    iterator: Iterator = iter(candidates)
    kept: list[tuple[int, int]] = []
    dropped: list[tuple[int, int]] = []
    seen_batches: list[RolloutBatch] = []
    seen_rewards: list[np.ndarray] = []
    tries = 0
    active = self.active(step)
    while len(kept) < b and tries < (self.max_tries if active else 1):
      try:
        batch, rewards = next(iterator)
      except StopIteration:
        break
      rewards = np.asarray(rewards, np.float32)
      num_groups = np.shape(batch.prompt_tokens)[0]
      if rewards.shape != (num_groups * g,):
        raise ValueError(f"candidate {tries} has rewards of shape {rewards.shape} for "
                         f"{num_groups} contexts x G={g}; expected ({num_groups * g},).")
      if not active and num_groups == b:  # Filtering off: the candidate as it is.
        return FillResult(batch=batch, rewards=rewards, source=np.stack(
            [np.zeros(b, np.int64), np.arange(b)], axis=1), padded=np.zeros(b, bool), tries=1,
                          num_seen=b, num_dropped=0, num_padded=0, filled=True)
      spread = groups_with_spread(rewards, g) if active else np.ones(num_groups, bool)
      for i in range(num_groups):
        (kept if spread[i] else dropped).append((tries, i))
      seen_batches.append(batch)
      seen_rewards.append(rewards)
      tries += 1
    if not seen_batches:
      raise ValueError("dynamic sampling got no candidate batch; the candidate iterator was "
                       "empty.")
    kept = kept[:b]
    filled = len(kept) == b
    pads = (dropped or kept)
    if not pads:
      raise ValueError("dynamic sampling saw only empty candidate batches (0 contexts).")
    pad_sources = [pads[i % len(pads)] for i in range(b - len(kept))]
    source = np.asarray(kept + pad_sources, np.int64).reshape(-1, 2)
    padded = np.arange(b) >= len(kept)

    parts, rewards_parts = [], []
    for cand, group in source:
      parts.append(take_groups(seen_batches[cand], np.array([group]), g))
      rewards_parts.append(seen_rewards[cand][group * g:(group + 1) * g])
    batch = concat_batches(parts)
    if padded.any():
      rows_padded = np.repeat(padded, g)
      mask = np.array(batch.completion_mask, copy=True)
      mask[rows_padded] = 0
      advantages = np.array(batch.advantages, copy=True)
      advantages[rows_padded] = 0
      batch = batch.replace(completion_mask=mask, advantages=advantages)
    num_seen = sum(np.shape(x.prompt_tokens)[0] for x in seen_batches)
    return FillResult(batch=batch, rewards=np.concatenate(rewards_parts), source=source,
                      padded=padded, tries=tries, num_seen=num_seen, num_dropped=len(dropped),
                      num_padded=int(padded.sum()), filled=filled)
