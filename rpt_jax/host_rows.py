"""Which rows of a batch-sharded global array each JAX process feeds and reads back.

Under several processes, a [B, ...] array sharded over its first axis is assembled from each
process's own rows (`to_global`, `jax.make_array_from_process_local_data`) and read back the
same way (`local_rows`). A process feeds the rows its devices hold, in ascending order. When a
non-batch mesh axis (tensor) crosses hosts, several processes hold the same rows: they form one
feed GROUP and must feed identical data; the group's lowest process is its LEADER (the one that
writes files for it). With one process everything is one group of all B rows.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax.sharding import NamedSharding


@dataclasses.dataclass(frozen=True)
class BatchFeed:
  """This process's part in feeding a batch of `global_batch` rows.

  rows: the global rows its devices hold, ascending (len = rows it feeds per batch).
  group, num_groups: the index of its row set among the distinct row sets (ordered by first
    row), and how many there are; processes of one group feed the same rows.
  leader: it is the lowest process index of its group.
  """

  rows: tuple[int, ...]
  group: int
  num_groups: int
  leader: bool


def batch_feed(sharding: NamedSharding, global_batch: int,
               process_index: int | None = None) -> BatchFeed:
  """The BatchFeed of `process_index` (default: this process) for arrays sharded as `sharding`
  whose first axis has `global_batch` rows. Raises ValueError for a layout where two processes
  hold overlapping but different row sets (no consistent feeding exists)."""
  me = jax.process_index() if process_index is None else process_index
  return feed_of(rows_by_process(sharding, global_batch), me)


def rows_by_process(sharding: NamedSharding, global_batch: int) -> dict[int, set[int]]:
  """{process index: the rows of a [global_batch, ...] array its devices hold} for `sharding`."""
  shape = (global_batch,) + (1,) * (len(sharding.spec) - 1)
  held: dict[int, set[int]] = {}
  for device, index in sharding.devices_indices_map(shape).items():
    held.setdefault(device.process_index, set()).update(range(*index[0].indices(global_batch)))
  return held


def feed_of(held: dict[int, set[int]], process: int) -> BatchFeed:
  """The BatchFeed of `process`, given the rows every process holds ({process: rows})."""
  groups = sorted({tuple(sorted(rows)) for rows in held.values()})
  seen: set[int] = set()
  for rows in groups:
    if seen & set(rows):
      raise ValueError(
          f"processes hold overlapping but different rows of the batch ({groups}); choose "
          "mesh sizes whose batch shards map to whole processes.")
    seen.update(rows)
  mine = tuple(sorted(held[process]))
  leader = min(p for p, rows in held.items() if tuple(sorted(rows)) == mine)
  return BatchFeed(rows=mine, group=groups.index(mine), num_groups=len(groups),
                   leader=leader == process)


def to_global(sharding: NamedSharding, local: np.ndarray, global_batch: int) -> jax.Array:
  """The global [global_batch, ...] array from this process's rows (`batch_feed(...).rows`)."""
  local = np.asarray(local)
  return jax.make_array_from_process_local_data(sharding, local,
                                                (global_batch,) + local.shape[1:])


def local_rows(x: jax.Array) -> np.ndarray:
  """This process's rows of a batch-sharded global array, in global row order."""
  if x.is_fully_addressable:
    return np.asarray(x)
  shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
  rows, seen = [], set()
  for shard in shards:
    start = shard.index[0].start or 0
    if start not in seen:  # Replicas over non-batch axes hold the same rows.
      seen.add(start)
      rows.append(np.asarray(shard.data))
  return np.concatenate(rows, axis=0)
