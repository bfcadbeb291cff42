"""Dynamic sampling (DAPO-style, PAPER.md: on from step 500): keep only groups whose G rewards are
not all equal, and refill the batch with groups from further rollout batches.

`choose_groups` is the whole decision, a pure function of the candidates' rewards: which
(candidate, group) fills each of the B slots of the train batch, and which slots are inert
padding. The loop gathers the chosen rows on device (`gather_groups`, one program for any
choice), so the rollouts never travel through the host.

A group whose rewards are all equal has zero advantage under every estimator ('grpo', 'drgrpo',
'rloo'), so it adds no policy gradient but still adds tokens to a token-mean denominator (diluting
the update) and costs compute. If the candidates do not yield B groups with spread, the batch is
PADDED to its static shape with inert groups: copies of dropped (or, if none, kept) groups whose
completion masks and advantages are zeroed, so they add nothing to the loss, its denominator or
the gradient (no recompilation, and the update is the mean over the real groups).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rpt_jax.rl.update import CONTEXT_FIELDS, RolloutBatch


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


@dataclasses.dataclass(frozen=True)
class GroupChoice:
  """What fills the train batch.

  source: int [B, 2], (candidate index, group index within it) of each output group.
  padded: bool [B], True for inert padding groups (masks and advantages zeroed when gathered).
  num_seen / num_dropped: groups looked at / without spread (when active).
  filled: all B groups are real (not padding).
  """

  source: np.ndarray
  padded: np.ndarray
  tries: int
  num_seen: int
  num_dropped: int
  filled: bool

  @property
  def is_first_candidate(self) -> bool:
    """The batch is the first candidate as it is (nothing to gather)."""
    b = len(self.padded)
    return bool(np.array_equal(self.source, np.stack([np.zeros(b), np.arange(b)], 1))
                and not self.padded.any())

  def rows(self, group_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(contexts_B, rows_R, keep_R) as indices into the candidates stacked along the batch:
    context c of candidate k is k*B + c, its rows (k*B + c)*G .. +G-1; keep 0 marks padding."""
    b = len(self.padded)
    contexts_B = self.source[:, 0] * b + self.source[:, 1]
    rows_R = (contexts_B[:, None] * group_size + np.arange(group_size)[None, :]).reshape(-1)
    keep_R = np.repeat(~self.padded, group_size).astype(np.float32)
    return contexts_B.astype(np.int32), rows_R.astype(np.int32), keep_R

  def metrics(self) -> dict[str, float]:
    return {"dynamic_sampling/tries": float(self.tries),
            "dynamic_sampling/dropped_fraction": self.num_dropped / max(self.num_seen, 1),
            "dynamic_sampling/padded_groups": float(self.padded.sum()),
            "dynamic_sampling/filled": float(self.filled)}


def enough_groups(candidate_rewards: Sequence[Any], group_size: int) -> bool:
  """Whether the candidates so far hold a full batch (as many groups as one candidate) of groups
  with reward spread: the loop stops drawing candidates then."""
  if not candidate_rewards:
    return False
  b = len(candidate_rewards[0]) // group_size
  return sum(int(groups_with_spread(r, group_size).sum()) for r in candidate_rewards) >= b


def choose_groups(candidate_rewards: Sequence[Any], group_size: int, *,
                  active: bool) -> GroupChoice:
  """The B groups of the train batch from the candidates' rewards (each float [B*G]).

  Inactive: the first candidate as it is. Active: groups with spread in candidate order, the
  first B of them; missing slots are padding, copying dropped groups in turn (kept ones if none
  were dropped). Every candidate must hold B groups.
  """
  if not candidate_rewards:
    raise ValueError("dynamic sampling got no candidate batch.")
  g = group_size
  b = len(candidate_rewards[0]) // g
  if b < 1:
    raise ValueError("dynamic sampling got a candidate of 0 contexts.")
  kept: list[tuple[int, int]] = []
  dropped: list[tuple[int, int]] = []
  for k, rewards in enumerate(candidate_rewards if active else candidate_rewards[:1]):
    rewards = np.asarray(rewards, np.float32)
    if rewards.shape != (b * g,):
      raise ValueError(f"candidate {k} has rewards of shape {rewards.shape}; every candidate "
                       f"holds B={b} contexts x G={g} rows ({b * g},).")
    spread = groups_with_spread(rewards, g) if active else np.ones(b, bool)
    for i in range(b):
      (kept if spread[i] else dropped).append((k, i))
  tries = len(candidate_rewards) if active else 1
  kept = kept[:b]
  pads = dropped or kept
  source = np.asarray(kept + [pads[i % len(pads)] for i in range(b - len(kept))],
                      np.int64).reshape(b, 2)
  padded = np.arange(b) >= len(kept)
  return GroupChoice(source=source, padded=padded, tries=tries, num_seen=tries * b,
                     num_dropped=len(dropped), filled=len(kept) == b)


def gather_groups(candidates: Sequence[RolloutBatch], contexts_B: jax.Array, rows_R: jax.Array,
                  keep_R: jax.Array) -> RolloutBatch:
  """The chosen contexts and rows of the candidates stacked along the batch (indices from
  `GroupChoice.rows`); rows with keep 0 become inert (mask and advantage 0). Traceable: the
  loop jits it with the batch sharding as output, so rows move between devices on device."""
  def pick(name):
    if getattr(candidates[0], name) is None:
      return None
    x = jnp.concatenate([getattr(c, name) for c in candidates])
    if name in CONTEXT_FIELDS:
      return x[contexts_B]
    x = x[rows_R]
    keep = keep_R.reshape(keep_R.shape + (1,) * (x.ndim - 1)).astype(x.dtype)
    # Inert rows: no tokens and no advantage; their other fields are never read.
    return x * keep if name in ("completion_mask", "advantages") else x

  return RolloutBatch(**{f.name: pick(f.name) for f in dataclasses.fields(RolloutBatch)})
