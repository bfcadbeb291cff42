"""Checkpoints of a training run: one Orbax `CheckpointManager` under `<workdir>/checkpoints`.

A step directory holds three items:

    train_state/   any pytree of jax Arrays (params, optimiser state, step, rng key), written as
                   global arrays by Orbax (every process writes its own shards)
    data/          the Grain iterator state of EACH process, as `process_{i}-of-{n}.json`
    extra/         one JSON dict (the config, metrics), written by the primary process

Typed PRNG keys (`jax.random.key`) are stored as their raw `uint32` key data
(`jax.random.key_data`) and wrapped back (`jax.random.wrap_key_data`) on restore, so the files
do not depend on how a given Orbax release treats key dtypes.

Saves are asynchronous (device -> host copy blocks, the file writes run in the background) and
atomic: Orbax writes into a temporary directory and renames it when every item is complete, so a
process killed mid-save leaves the previous checkpoint as the latest. `restore_latest` also
survives checkpoints damaged after the fact (missing or truncated files): it warns and falls back
to the next older step.

Typical loop:

    ckpt = Checkpointer(workdir, save_interval_steps=100, max_to_keep=3)
    ckpt.install_sigterm_handler()
    restored = ckpt.restore_latest(abstract_state)       # None on a fresh run
    for step in range(start, num_steps):
      ...
      ckpt.save(step, state, data_state=it.get_state(), extra={'config': cfg})
      if ckpt.should_stop(step):
        ckpt.save(step, state, data_state=it.get_state(), extra=..., force=True)
        ckpt.wait_until_finished()
        break
    ckpt.close()
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import os
import signal
import threading
from typing import Any, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

log = logging.getLogger(__name__)

TRAIN_STATE_ITEM = "train_state"
DATA_ITEM = "data"
EXTRA_ITEM = "extra"

PyTree = Any
DataState = dict | list | bytes | str | None
Restored = tuple[int, PyTree, DataState, dict]


class CheckpointRestoreError(ValueError):
  """No checkpoint in the directory could be restored."""


# ----------------------------------------------------------------------------------------------
# Per-process data-iterator state. Orbax's JsonCheckpointHandler writes on the primary process
# only, and the item names of a composite save must agree across processes, so each process's
# Grain state goes into ONE item, `data/`, as its own file (the layout Grain's own handler uses).


def _process_filename(index: int, count: int) -> str:
  return f"process_{index}-of-{count}.json"


class ProcessJsonHandler(ocp.CheckpointHandler):
  """Every process saves/restores its own JSON value as `process_{i}-of-{n}.json`."""

  def save(self, directory: epath.Path, item: Any = None, args: Any = None) -> None:
    value = args.item if args is not None else item
    name = _process_filename(jax.process_index(), jax.process_count())
    (epath.Path(directory) / name).write_text(json.dumps(value))

  def restore(self, directory: epath.Path, item: Any = None, args: Any = None) -> Any:
    del item, args
    directory = epath.Path(directory)
    count = jax.process_count()
    path = directory / _process_filename(jax.process_index(), count)
    if path.exists():
      return json.loads(path.read_text())
    saved = sorted(p.name for p in directory.glob("process_*-of-*.json"))
    if saved and not any(name.endswith(f"-of-{count}.json") for name in saved):
      # Saved by a different number of processes: a Grain state cannot be re-split, so no data
      # state is returned (rpt_jax.train seeks its loader to the saved global batch count
      # instead). The train state still restores.
      if json.loads((directory / saved[0]).read_text()) != _encode_data_state(None):
        log.warning(
            "Data-iterator state in %s was saved by a different number of processes (%s); this "
            "run has %d. No loader state is restored.", directory, saved, count)
      return _encode_data_state(None)
    raise FileNotFoundError(f"{path} is missing: this process's data-iterator state was not saved.")


@ocp.args.register_with_handler(ProcessJsonHandler, for_save=True)
@dataclasses.dataclass
class ProcessJsonSave(ocp.args.CheckpointArgs):
  item: Any


@ocp.args.register_with_handler(ProcessJsonHandler, for_restore=True)
@dataclasses.dataclass
class ProcessJsonRestore(ocp.args.CheckpointArgs):
  pass


def _encode_data_state(state: DataState) -> dict:
  """Tags the value so bytes (Grain `DataLoaderIterator.get_state()`) and str round-trip."""
  if state is None:
    return {"type": "none"}
  if isinstance(state, (bytes, bytearray)):
    return {"type": "bytes", "base64": base64.b64encode(bytes(state)).decode("ascii")}
  if isinstance(state, str):
    return {"type": "str", "value": state}
  if isinstance(state, (dict, list)):
    return {"type": "json", "value": _jsonable(state, "data_state")}
  raise ValueError(
      f"data_state of type {type(state).__name__} cannot be checkpointed: pass the Grain "
      "iterator's get_state() (bytes or a JSON-able dict), a str, a list, or None.")


def _decode_data_state(record: dict) -> DataState:
  kind = record.get("type")
  if kind == "none":
    return None
  if kind == "bytes":
    return base64.b64decode(record["base64"])
  if kind in ("str", "json"):
    return record["value"]
  raise ValueError(f"unknown data-state record type {kind!r} in checkpoint.")


def _jsonable(value: Any, what: str) -> Any:
  """A JSON round-trip of `value`; numpy/jax scalars and arrays become Python numbers/lists."""

  def default(x):
    if isinstance(x, (np.ndarray, np.generic, jax.Array)):
      return np.asarray(x).tolist()
    raise TypeError(f"{type(x).__name__} is not JSON serialisable")

  try:
    return json.loads(json.dumps(value, default=default))
  except (TypeError, ValueError) as e:
    raise ValueError(
        f"{what} must be JSON-serialisable (dicts, lists, str, numbers, numpy scalars): {e}. "
        "Convert the offending value (e.g. a dataclass via dataclasses.asdict) before saving."
    ) from e


# ----------------------------------------------------------------------------------------------
# Typed PRNG keys <-> raw key data.


def _is_key(x: Any) -> bool:
  dtype = getattr(x, "dtype", None)
  return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def keys_to_data(tree: PyTree) -> PyTree:
  """Replaces every typed PRNG key array with its `uint32` key data (shape + impl trailing dims)."""
  return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def abstract_keys_to_data(abstract: PyTree) -> PyTree:
  """The abstract counterpart of `keys_to_data`: key structs -> uint32 structs, same sharding.

  A `NamedSharding` leaves the extra trailing key-data dimension replicated.
  """

  def convert(x):
    if not _is_key(x):
      return x
    data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(x.shape, x.dtype))
    return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=getattr(x, "sharding", None))

  return jax.tree.map(convert, abstract)


def data_to_keys(tree: PyTree, abstract: PyTree) -> PyTree:
  """Wraps key data back into typed keys wherever `abstract` has a key dtype."""

  def convert(abstract_leaf, leaf):
    if not _is_key(abstract_leaf):
      return leaf
    try:
      return jax.random.wrap_key_data(leaf, dtype=abstract_leaf.dtype)
    except TypeError:  # JAX releases whose wrap_key_data has no `dtype` argument.
      return jax.random.wrap_key_data(leaf, impl=abstract_leaf.dtype._impl)  # pylint: disable=protected-access

  return jax.tree.map(convert, abstract, tree)


# ----------------------------------------------------------------------------------------------


class Checkpointer:
  """Saves and restores (train state, per-process data state, extra JSON) with Orbax.

  Every process calls every method; Orbax coordinates the processes and writes global arrays.

  Args:
    workdir: run directory (local path or `gs://...`); checkpoints go to `<workdir>/checkpoints`.
    save_interval_steps: `save` without `force` writes only on multiples of this.
    max_to_keep: how many of the newest checkpoints to keep (None keeps all).
    async_save: write files in a background thread (True) or block in `save` (False).
  """

  def __init__(self, workdir: str | os.PathLike, *, save_interval_steps: int = 1,
               max_to_keep: int | None = 3, async_save: bool = True):
    if save_interval_steps < 1:
      raise ValueError(f"save_interval_steps={save_interval_steps} must be >= 1.")
    if max_to_keep is not None and max_to_keep < 1:
      raise ValueError(f"max_to_keep={max_to_keep} must be >= 1 (or None to keep all).")
    self.directory = epath.Path(workdir) / "checkpoints"
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=save_interval_steps,
        max_to_keep=max_to_keep,
        create=True,
        enable_async_checkpointing=async_save,
        # Temporary directories are what a killed save leaves behind.
        cleanup_tmp_directories=True,
    )
    self._manager = ocp.CheckpointManager(self.directory, options=options)
    self._stop_requested = threading.Event()

  # -- saving ------------------------------------------------------------------------------------

  def save(self, step: int, train_state: PyTree, *, data_state: DataState = None,
           extra: dict | None = None, force: bool = False) -> bool:
    """Starts an (asynchronous) save of `step`; returns whether a save was started.

    Without `force`, only steps on the save interval are written. A step that already has a
    checkpoint is never overwritten (returns False), so a forced preemption save right after an
    interval save is harmless.

    Args:
      step: the training step the state belongs to.
      train_state: pytree of jax Arrays (typed PRNG keys allowed).
      data_state: THIS process's Grain iterator state: `bytes` from
        `DataLoaderIterator.get_state()`, a JSON-able dict/list, a str, or None.
      extra: JSON-able dict (config, metrics); numpy scalars/arrays are converted to numbers/lists.
      force: save regardless of the interval.
    """
    if force and step in self._manager.all_steps():
      return False
    args = ocp.args.Composite(**{
        TRAIN_STATE_ITEM: ocp.args.StandardSave(keys_to_data(train_state)),
        DATA_ITEM: ProcessJsonSave(_encode_data_state(data_state)),
        EXTRA_ITEM: ocp.args.JsonSave(_jsonable(extra or {}, "extra")),
    })
    return bool(self._manager.save(step, args=args, force=force))

  def wait_until_finished(self) -> None:
    """Blocks until the in-flight save (if any) is fully written and committed."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases Orbax's background resources."""
    self._manager.close()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()

  # -- restoring ---------------------------------------------------------------------------------

  def all_steps(self) -> Sequence[int]:
    """Steps with a committed checkpoint, ascending."""
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def restore(self, step: int, abstract_train_state: PyTree) -> Restored:
    """Restores `step` onto the shardings in `abstract_train_state`.

    Args:
      step: a step in `all_steps()`.
      abstract_train_state: pytree of `jax.ShapeDtypeStruct` with `.sharding` set to where each
        array should live (any mesh, any device count: Orbax reshards on read). Typed PRNG keys
        are given with their key dtype, e.g. `jax.eval_shape(lambda: key)` plus a sharding.

    Returns:
      (step, train_state, data_state, extra); `data_state` is this process's value as saved
      (bytes stay bytes), or None if it was saved by a different number of processes.
    """
    restored = self._manager.restore(step, args=ocp.args.Composite(**{
        TRAIN_STATE_ITEM: ocp.args.StandardRestore(abstract_keys_to_data(abstract_train_state)),
        DATA_ITEM: ProcessJsonRestore(),
        EXTRA_ITEM: ocp.args.JsonRestore(),
    }))
    train_state = data_to_keys(restored[TRAIN_STATE_ITEM], abstract_train_state)
    return step, train_state, _decode_data_state(restored[DATA_ITEM]), restored[EXTRA_ITEM]

  def restore_latest(self, abstract_train_state: PyTree) -> Restored | None:
    """Restores the newest readable checkpoint; None if the directory holds no checkpoint.

    A checkpoint that fails to restore (missing/truncated files) is skipped with a warning and
    the next older one is tried. Skipped steps are left on disk (never deleted automatically: the
    failure may be transient); interval saves resume once the run passes the newest of them.

    Raises:
      CheckpointRestoreError: checkpoints exist but none restores; names the directory and the
        error of each step.
    """
    self._manager.wait_until_finished()
    self._manager.reload()  # Pick up steps written or removed by an earlier run.
    steps = sorted(self._manager.all_steps(), reverse=True)
    if not steps:
      return None
    errors, last_error = [], None
    for step in steps:
      try:
        result = self.restore(step, abstract_train_state)
        error = None
      except Exception as e:  # pylint: disable=broad-except  # Orbax/tensorstore raise many types.
        result, error = None, e
      # All processes must land on the same step: a shard unreadable on one host fails all.
      if _all_processes_ok(error is None):
        return result
      errors.append(f"step {step}: {_describe(error)}" if error else
                    f"step {step}: failed on another process")
      last_error = error or last_error
      log.warning("Checkpoint step %d in %s could not be restored (%s); trying the previous one.",
                  step, self.directory, errors[-1])
    raise CheckpointRestoreError(
        f"None of the checkpoints {sorted(steps)} in {self.directory} could be restored:\n  "
        + "\n  ".join(errors)
        + "\nIf the abstract train state no longer matches the saved one, restore with the old "
        "structure; otherwise move the damaged directory away to start afresh.") from last_error

  def restore_params(self, abstract_params: PyTree, step: int | None = None
                     ) -> tuple[int, PyTree] | None:
    """Only the parameters of a train-state checkpoint (`step`, default the newest), onto the
    shardings in `abstract_params` (the `params` field of the saved state); None if there is no
    checkpoint. The optimiser state is never read: evaluation and export need the weights alone.
    """
    self._manager.wait_until_finished()
    self._manager.reload()
    step = self._manager.latest_step() if step is None else step
    if step is None:
      return None
    item = {"params": abstract_keys_to_data(abstract_params)}
    path = self.directory / str(step) / TRAIN_STATE_ITEM
    restored = ocp.PyTreeCheckpointer().restore(path, args=ocp.args.PyTreeRestore(
        item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
        partial_restore=True))
    return step, data_to_keys(restored["params"], abstract_params)

  # -- preemption --------------------------------------------------------------------------------

  def install_sigterm_handler(self) -> bool:
    """Makes SIGTERM set a stop flag (read by `should_stop`) instead of killing the process.

    Single-process runs only (returns False and installs nothing otherwise): on multi-host JAX
    the preemption service already receives SIGTERM and agrees on a step across hosts
    (`reached_preemption`); a per-host flag would let hosts stop at different steps. Must be
    called from the main thread.
    """
    if jax.process_count() > 1:
      log.info("Multi-process run: relying on JAX's preemption sync point, not a SIGTERM handler.")
      return False

    def on_sigterm(signum, frame):
      del signum, frame
      log.warning("SIGTERM received: will checkpoint and stop at the next step boundary.")
      self._stop_requested.set()

    signal.signal(signal.SIGTERM, on_sigterm)
    return True

  def request_stop(self) -> None:
    """Sets the stop flag by hand (what the SIGTERM handler does)."""
    self._stop_requested.set()

  def reached_preemption(self, step: int) -> bool:
    """True when all hosts reached JAX's preemption sync point at `step` (TPU/multi-host).

    Wraps `jax.experimental.multihost_utils.reached_preemption_sync_point`; False where the
    preemption service is not running (single process, CPU). Call it at EVERY step on every host.
    """
    try:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      return bool(multihost_utils.reached_preemption_sync_point(step))
    except (RuntimeError, AttributeError, ImportError):
      return False

  def should_stop(self, step: int) -> bool:
    """True when the loop should save (`force=True`), wait, and exit at this step."""
    return self._stop_requested.is_set() or self.reached_preemption(step)


def _describe(error: BaseException, limit: int = 400) -> str:
  """One short line: tensorstore errors embed kilobytes of JSON spec."""
  text = f"{type(error).__name__}: {error}".splitlines()[0]
  return text if len(text) <= limit else text[:limit] + " ..."


def _all_processes_ok(ok: bool) -> bool:
  """AND of `ok` over processes (no communication in a single-process run)."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))
