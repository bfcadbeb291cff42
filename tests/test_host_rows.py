"""Which rows each process feeds: worked by hand for pod layouts, and on the 8 simulated
devices of tests/conftest.py (the real multi-process runs are in tests/test_multihost.py)."""
import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rpt_jax import host_rows
from rpt_jax.host_rows import BatchFeed


def test_each_process_its_own_block():
  held = {0: {0, 1}, 1: {2, 3}, 2: {4, 5}, 3: {6, 7}}
  assert [host_rows.feed_of(held, p) for p in range(4)] == [
      BatchFeed(rows=(2 * p, 2 * p + 1), group=p, num_groups=4, leader=True) for p in range(4)]


def test_processes_sharing_rows_form_one_group_led_by_the_lowest():
  # tensor=2 across hosts: processes (0, 2) hold rows 0-3, (1, 3) rows 4-7.
  held = {0: {0, 1, 2, 3}, 1: {4, 5, 6, 7}, 2: {3, 2, 1, 0}, 3: {4, 5, 6, 7}}
  feeds = [host_rows.feed_of(held, p) for p in range(4)]
  assert [f.rows for f in feeds] == [(0, 1, 2, 3), (4, 5, 6, 7)] * 2
  assert [f.group for f in feeds] == [0, 1, 0, 1]
  assert [f.leader for f in feeds] == [True, True, False, False]
  assert {f.num_groups for f in feeds} == {2}


def test_overlapping_row_sets_are_refused():
  with pytest.raises(ValueError, match="overlapping but different rows"):
    host_rows.feed_of({0: {0, 1, 2}, 1: {2, 3}}, 0)


def test_one_process_feeds_everything_and_rows_round_trip():
  mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("batch", "model"))
  sharding = NamedSharding(mesh, PartitionSpec("batch", None))
  feed = host_rows.batch_feed(sharding, 8)
  assert feed == BatchFeed(rows=tuple(range(8)), group=0, num_groups=1, leader=True)
  local = np.arange(24).reshape(8, 3)
  x = host_rows.to_global(sharding, local, 8)
  assert x.sharding == sharding
  np.testing.assert_array_equal(host_rows.local_rows(x), local)
