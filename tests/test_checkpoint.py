"""Checkpointer: sharded round trips, resharding on restore, retention, corruption, SIGKILL."""
import errno
import glob
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import micro_run
from rpt_jax import checkpoint, errors
from rpt_jax.mesh import MeshConfig, make_mesh

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Tensorstore's failed reads (corruption tests) can leave a callback for an already-closed asyncio
# loop, reported later at garbage collection: harmless.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

GRAIN_BYTES = b"\x00\xff{\"last_seen_indices\": {\"0\": 41}}\x80"  # not valid UTF-8 on purpose


def _host_state(offset: int) -> dict:
  """The reference values, in numpy; `offset` tells checkpoints apart."""
  w = np.arange(16 * 8, dtype=np.float32).reshape(16, 8) + offset
  return {
      "params": {"w": w, "b": (np.arange(8) + offset).astype(jnp.bfloat16)},
      "opt": {"mu": w * 0.5, "count": np.int32(offset)},
      "step": np.int32(offset),
  }


def _key_data(offset: int) -> tuple[np.ndarray, np.ndarray]:
  return (np.asarray(jax.random.key_data(jax.random.key(offset))),
          np.asarray(jax.random.key_data(jax.random.split(jax.random.key(offset + 100), 8))))


def _specs() -> dict:
  return {"params": {"w": P("fsdp", "tensor"), "b": P("tensor")},
          "opt": {"mu": P("data", None), "count": P()}, "step": P(),
          "rng": P(), "rngs": P(("data", "fsdp"))}


def _device_state(mesh, offset: int) -> dict:
  tree = dict(_host_state(offset))
  tree["rng"] = jax.random.key(offset)
  tree["rngs"] = jax.random.split(jax.random.key(offset + 100), 8)
  return jax.tree.map(lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec)), tree,
                      _specs())


def _abstract(mesh, specs=None) -> dict:
  specs = specs or _specs()
  shapes = jax.eval_shape(lambda: _device_state_shapes())
  return jax.tree.map(
      lambda s, spec: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=NamedSharding(mesh, spec)),
      shapes, specs)


def _device_state_shapes() -> dict:
  tree = {k: jax.tree.map(jnp.asarray, v) for k, v in _host_state(0).items()}
  tree["rng"] = jax.random.key(0)
  tree["rngs"] = jax.random.split(jax.random.key(0), 8)
  return tree


def _assert_state_equals(restored: dict, offset: int, mesh, specs=None):
  specs = specs or _specs()
  host = _host_state(offset)
  for path, want in jax.tree_util.tree_leaves_with_path(host):
    got = restored
    for k in path:
      got = got[k.key]
    assert got.dtype == want.dtype, path
    np.testing.assert_array_equal(np.atleast_1d(np.asarray(got)).view(np.uint8),
                                  np.atleast_1d(np.asarray(want)).view(np.uint8))
  key, keys = _key_data(offset)
  assert jax.dtypes.issubdtype(restored["rng"].dtype, jax.dtypes.prng_key)
  assert restored["rngs"].shape == (8,)
  np.testing.assert_array_equal(np.asarray(jax.random.key_data(restored["rng"])), key)
  np.testing.assert_array_equal(np.asarray(jax.random.key_data(restored["rngs"])), keys)
  # The target placement is honoured, leaf by leaf.
  for got, spec in zip(jax.tree.leaves(restored), jax.tree.leaves(specs)):
    assert got.sharding.is_equivalent_to(NamedSharding(mesh, spec), got.ndim), (got.sharding, spec)
    assert set(got.sharding.device_set) == set(mesh.devices.flat)


@pytest.fixture(scope="module")
def mesh8():
  return make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory, mesh8):
  """One checkpoint at step 3 with train state, Grain bytes and extra JSON."""
  workdir = tmp_path_factory.mktemp("run")
  with checkpoint.Checkpointer(workdir, save_interval_steps=1) as ckpt:
    assert ckpt.save(3, _device_state(mesh8, 3), data_state=GRAIN_BYTES,
                     extra={"config": {"lr": 1e-6, "name": "rpt"},
                            "metrics": {"accuracy": np.float32(0.5), "hist": np.arange(3)}})
  return workdir


def test_restore_on_same_mesh_is_exact(saved_run, mesh8):
  with checkpoint.Checkpointer(saved_run) as ckpt:
    step, state, data_state, extra = ckpt.restore_latest(_abstract(mesh8))
  assert step == 3
  _assert_state_equals(state, 3, mesh8)
  assert data_state == GRAIN_BYTES and isinstance(data_state, bytes)
  assert extra == {"config": {"lr": 1e-6, "name": "rpt"},
                   "metrics": {"accuracy": 0.5, "hist": [0, 1, 2]}}
  files = glob.glob(str(saved_run / "checkpoints" / "3" / "data" / "process_0-of-1.json"))
  assert len(files) == 1 and json.loads(open(files[0]).read())["type"] == "bytes"


def test_restore_onto_four_devices_with_other_sharding(saved_run):
  mesh4 = make_mesh(MeshConfig(data=1, fsdp=2, tensor=2), devices=jax.devices()[4:])
  specs = {"params": {"w": P("tensor", "fsdp"), "b": P()},
           "opt": {"mu": P(None, ("fsdp", "tensor")), "count": P()}, "step": P(),
           "rng": P(), "rngs": P("tensor")}
  with checkpoint.Checkpointer(saved_run) as ckpt:
    step, state, _, _ = ckpt.restore_latest(_abstract(mesh4, specs))
  assert step == 3
  _assert_state_equals(state, 3, mesh4, specs)


def test_json_and_text_data_states_round_trip(tmp_path, mesh8):
  states = {1: {"pos": [1, 2], "seed": 7}, 2: "dataset-iterator-state", 3: None}
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    for step, data_state in states.items():
      ckpt.save(step, _device_state(mesh8, step), data_state=data_state)
    ckpt.wait_until_finished()
    for step, data_state in states.items():
      got_step, state, got, extra = ckpt.restore(step, _abstract(mesh8))
      assert (got_step, got, extra) == (step, data_state, {})
      np.testing.assert_array_equal(np.asarray(state["step"]), step)


def test_keeps_last_k_and_saves_on_interval(tmp_path, mesh8):
  state = _device_state(mesh8, 0)
  with checkpoint.Checkpointer(tmp_path, save_interval_steps=2, max_to_keep=2) as ckpt:
    saved = [ckpt.save(step, state) for step in range(8)]
    assert saved == [True, False] * 4
    ckpt.wait_until_finished()
    assert list(ckpt.all_steps()) == [4, 6]
    assert ckpt.save(7, state, force=True)
    assert not ckpt.save(7, state, force=True)  # an existing step is never overwritten
    ckpt.wait_until_finished()
    assert list(ckpt.all_steps()) == [6, 7]
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["6", "7"]


def _truncate_array_files(step_dir):
  files = [f for f in glob.glob(f"{step_dir}/train_state/**/d/*", recursive=True)
           if os.path.isfile(f)]
  assert files
  for f in files:
    os.truncate(f, os.path.getsize(f) // 2)


def _delete_data_state(step_dir):
  os.remove(f"{step_dir}/data/process_0-of-1.json")


def _truncate_metadata(step_dir):
  path = f"{step_dir}/train_state/_METADATA"
  os.truncate(path, os.path.getsize(path) // 2)


@pytest.mark.parametrize("corrupt", [_truncate_array_files, _delete_data_state,
                                     _truncate_metadata])
def test_corrupt_latest_falls_back_to_previous(tmp_path, mesh8, caplog, corrupt):
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    ckpt.save(1, _device_state(mesh8, 1), data_state=b"one")
    ckpt.save(2, _device_state(mesh8, 2), data_state=b"two")
  corrupt(tmp_path / "checkpoints" / "2")
  with caplog.at_level(logging.WARNING, logger="rpt_jax.checkpoint"):
    with checkpoint.Checkpointer(tmp_path) as ckpt:
      step, state, data_state, _ = ckpt.restore_latest(_abstract(mesh8))
  assert step == 1 and data_state == b"one"
  _assert_state_equals(state, 1, mesh8)
  assert any("step 2" in r.getMessage() and "previous" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("error", [
    OSError(errno.EIO, "Input/output error"),
    ValueError("UNAVAILABLE: Error reading local file: connection reset by peer"),
    ValueError("DEADLINE_EXCEEDED: gs://bucket/run/checkpoints/2/train_state"),
])
def test_a_read_error_of_a_whole_step_raises_instead_of_rewinding(tmp_path, mesh8, error):
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    ckpt.save(1, _device_state(mesh8, 1), data_state=b"one")
    ckpt.save(2, _device_state(mesh8, 2), data_state=b"two")
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    real_restore = ckpt._manager.restore  # pylint: disable=protected-access

    def flaky(step, *args, **kwargs):  # storage fails while reading step 2, whose files are whole
      if step == 2:
        raise error
      return real_restore(step, *args, **kwargs)

    ckpt._manager.restore = flaky  # pylint: disable=protected-access
    with pytest.raises(checkpoint.CheckpointRestoreError,
                       match=r"step 2 .* cannot be read .* look complete") as raised:
      ckpt.restore_latest(_abstract(mesh8))
    assert raised.value.__cause__ is error
    assert isinstance(raised.value, errors.UserError)  # one line from rpt_jax.main, exit 2
    ckpt._manager.restore = real_restore  # pylint: disable=protected-access
    step, state, data_state, _ = ckpt.restore_latest(_abstract(mesh8))  # storage is back
  assert (step, data_state) == (2, b"two")
  _assert_state_equals(state, 2, mesh8)


def test_no_checkpoint_returns_none_and_all_corrupt_raises(tmp_path, mesh8):
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    assert ckpt.restore_latest(_abstract(mesh8)) is None
    ckpt.save(1, _device_state(mesh8, 1))
  _truncate_array_files(tmp_path / "checkpoints" / "1")
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    with pytest.raises(checkpoint.CheckpointRestoreError, match=str(tmp_path / "checkpoints")):
      ckpt.restore_latest(_abstract(mesh8))


def test_data_state_from_other_process_count_is_dropped(tmp_path, mesh8, caplog):
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    ckpt.save(1, _device_state(mesh8, 1), data_state=b"one")
  data_dir = tmp_path / "checkpoints" / "1" / "data"
  os.rename(data_dir / "process_0-of-1.json", data_dir / "process_0-of-2.json")
  with caplog.at_level(logging.WARNING, logger="rpt_jax.checkpoint"):
    with checkpoint.Checkpointer(tmp_path) as ckpt:
      step, state, data_state, _ = ckpt.restore_latest(_abstract(mesh8))
  assert (step, data_state) == (1, None)
  _assert_state_equals(state, 1, mesh8)
  assert any("different number of processes" in r.getMessage() for r in caplog.records)


def test_extra_must_be_json(tmp_path, mesh8):
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    with pytest.raises(ValueError, match="extra must be JSON"):
      ckpt.save(1, _device_state(mesh8, 1), extra={"fn": print})


def test_sigterm_sets_stop_flag_and_the_loop_logs_it(tmp_path, caplog):
  """The handler only sets the flag. Python runs a signal handler inside whatever the main
  thread was doing, e.g. a progress bar's write to stderr blocked on a full pipe; a handler that
  logged to that stream made a reentrant write (a '--- Logging error ---' traceback in a
  preempted run's stderr, seen under load). `should_stop` logs the stop, once, from the loop."""
  previous = signal.getsignal(signal.SIGTERM)
  try:
    ckpt = checkpoint.Checkpointer(tmp_path)
    assert not ckpt.should_stop(5)  # no preemption service on CPU: False, not an error
    assert ckpt.install_sigterm_handler()
    with caplog.at_level(logging.DEBUG):
      os.kill(os.getpid(), signal.SIGTERM)
      assert [r.getMessage() for r in caplog.records] == []  # the handler wrote nothing
      assert ckpt.should_stop(5)
      assert ckpt.should_stop(6)  # said once
    assert [r.getMessage() for r in caplog.records] == [
        "SIGTERM received: checkpointing at step 5 and stopping."]
    assert checkpoint.stopped_at() == 5  # what rpt_jax.main turns into EXIT_PREEMPTED
    ckpt.close()
  finally:
    signal.signal(signal.SIGTERM, previous)
    checkpoint._stopped_at.clear()  # pylint: disable=protected-access


def test_sigterm_ends_a_run_with_the_preemption_exit_code(tmp_path_factory):
  """`python -m rpt_jax.main` stopped by SIGTERM mid-training saves, then exits 75."""
  workdir = micro_run.prepared_workdir(tmp_path_factory, "preempted")
  config = micro_run.write_config(str(tmp_path_factory.mktemp("config") / "long.py"),
                                  {"train.steps": 500})
  proc = subprocess.Popen(micro_run.main_command(config, workdir, "--mode=train"),
                          cwd=REPO_ROOT, env=micro_run.subprocess_env(), text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  try:
    micro_run.wait_for_train_step(workdir, 1, proc)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=240)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  assert proc.returncode == errors.EXIT_PREEMPTED == 75, stderr[-3000:]
  assert "Traceback" not in stderr
  saved = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
  assert 1 <= saved[-1] < 500
  assert f"stopped at step {saved[-1]} on SIGTERM" in stderr.strip().splitlines()[-1]


# A child process saves step 1, then starts a large asynchronous save of step 2 and reports it;
# the test kills it with SIGKILL while the background write is in flight.
_CHILD = textwrap.dedent("""
    import sys, time
    import jax, jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P
    from rpt_jax import checkpoint
    from rpt_jax.mesh import MeshConfig, make_mesh
    mesh = make_mesh(MeshConfig(fsdp=-1))
    assert len(jax.devices()) == 8
    def state(step):
      big = (jnp.zeros((4096, 8192), jnp.float32) if step == 1 else
             jax.random.normal(jax.random.key(7), (4096, 8192), jnp.float32))
      return {"big": jax.device_put(big, NamedSharding(mesh, P("fsdp"))),
              "small": jnp.arange(16, dtype=jnp.int32) + step, "rng": jax.random.key(step)}
    ckpt = checkpoint.Checkpointer(sys.argv[1])
    ckpt.save(1, state(1), data_state=b"one")
    ckpt.wait_until_finished()
    s2 = state(2)
    jax.block_until_ready(s2)
    ckpt.save(2, s2, data_state=b"two")
    print("saving", flush=True)
    time.sleep(120)
""")


def test_sigkill_mid_save_leaves_previous_checkpoint_restorable(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=8",
             PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  child = subprocess.Popen([sys.executable, "-c", _CHILD, str(tmp_path)], env=env, cwd=REPO_ROOT,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    line = child.stdout.readline()
    if line.strip() != "saving":
      child.wait(timeout=60)
      pytest.fail(f"child failed before the save: {line!r}\n{child.stderr.read()[-3000:]}")
    os.kill(child.pid, signal.SIGKILL)
    assert child.wait(timeout=60) == -signal.SIGKILL
  finally:
    if child.poll() is None:
      child.kill()
      child.wait()
  mesh = make_mesh(MeshConfig(fsdp=-1))
  abstract = {
      "big": jax.ShapeDtypeStruct((4096, 8192), jnp.float32, sharding=NamedSharding(mesh, P("fsdp"))),
      "small": jax.ShapeDtypeStruct((16,), jnp.int32, sharding=NamedSharding(mesh, P())),
      "rng": jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=NamedSharding(mesh, P())),
  }
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    step, state, data_state, _ = ckpt.restore_latest(abstract)
  assert step in (1, 2)  # 2 only if the write finished before the kill landed
  assert data_state == {1: b"one", 2: b"two"}[step]
  np.testing.assert_array_equal(np.asarray(state["small"]), np.arange(16) + step)
  np.testing.assert_array_equal(np.asarray(jax.random.key_data(state["rng"])),
                                np.asarray(jax.random.key_data(jax.random.key(step))))
  big = np.asarray(state["big"])
  if step == 1:
    assert not big.any()
  else:
    np.testing.assert_array_equal(
        big, np.asarray(jax.random.normal(jax.random.key(7), (4096, 8192), jnp.float32)))
