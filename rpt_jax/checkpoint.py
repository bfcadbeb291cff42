# Over ~400 lines: save, damage-only fallback and preemption share one Orbax manager.
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
survives a step provably damaged after the fact (a missing item or metadata file, unparseable
metadata, a truncated array file): it warns and falls back to the next older step. Any other
failure to read the newest step (a storage error, a train state of another structure) raises
`CheckpointRestoreError` at once: falling back then would silently rewind the run.

A run stopped by SIGTERM/preemption (`should_stop` returned True) is remembered for the process
(`stopped_at`), so `rpt_jax.main` can exit with `rpt_jax.errors.EXIT_PREEMPTED`.

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
from typing import Any, Callable, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from rpt_jax import errors

log = logging.getLogger(__name__)

TRAIN_STATE_ITEM = "train_state"
DATA_ITEM = "data"
EXTRA_ITEM = "extra"

PyTree = Any
DataState = dict | list | bytes | str | None
Restored = tuple[int, PyTree, DataState, dict]


class CheckpointRestoreError(errors.InputError):
  """The newest checkpoint cannot be read, and no older one may be used in its place."""


# Tensorstore status codes (the first word of its error text) that mean the stored bytes are
# missing or shorter than their metadata says: the step is damaged, not the storage unreachable.
_DAMAGE_STATUSES = ("DATA_LOSS", "NOT_FOUND", "OUT_OF_RANGE")
_ITEMS = (TRAIN_STATE_ITEM, DATA_ITEM, EXTRA_ITEM)
_stopped_at: list[int] = []  # The step a Checkpointer of this process stopped at (SIGTERM).


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
    """Restores the newest checkpoint; None if the directory holds no checkpoint.

    A step that is provably damaged (`damage` names what) is skipped with a warning and the next
    older one is tried. Skipped steps are left on disk; interval saves resume once the run passes
    the newest of them. Every process lands on the same step.

    Raises:
      CheckpointRestoreError: the newest readable-looking step failed for another reason (a
        storage error, a train state of another structure): nothing older is tried, since that
        would silently rewind the run. Also when every step is damaged.
    """
    return self._restore_newest(lambda step: self.restore(step, abstract_train_state))

  def _restore_newest(self, read: Callable[[int], Any]) -> Any:
    """`read(step)` of the newest step that is not provably damaged (see `restore_latest`)."""
    self._manager.wait_until_finished()
    self._manager.reload()  # Pick up steps written or removed by an earlier run.
    steps = sorted(self._manager.all_steps(), reverse=True)
    if not steps:
      return None
    skipped = []
    for step in steps:
      try:
        result, error = read(step), None
      except Exception as e:  # pylint: disable=broad-except  # Orbax/tensorstore raise many types.
        result, error = None, e
      damage = self.damage(step, error) if error is not None else None
      # 0 restored, 1 damaged, 2 failed otherwise; the worst over processes decides for all.
      outcome = _max_over_processes(0 if error is None else 1 if damage else 2)
      if outcome == 0:
        return result
      where = f"checkpoint step {step} in {self.directory}"
      if outcome == 2:
        cause = _describe(error) if error is not None and not damage else "failed on another process"
        raise CheckpointRestoreError(
            f"{where} cannot be read ({cause}) though its files look complete, so no older step "
            "is restored in its place (that would rewind the run): retry if storage failed; if "
            "the train state changed shape, restore with the old config.") from error
      skipped.append(f"step {step}: {damage or 'damaged on another process'}")
      log.warning("%s is damaged (%s); trying the previous one.", where, skipped[-1])
    raise CheckpointRestoreError(
        f"every checkpoint {sorted(steps)} in {self.directory} is damaged ({'; '.join(skipped)}):"
        " move the folder away to start afresh.")

  def damage(self, step: int, error: BaseException | None = None) -> str | None:
    """What makes `step` provably incomplete or corrupt, or None when it looks whole.

    Checks that every item folder and the train state's metadata exist and parse; a
    restore `error` proves damage only when it says a file is missing or shorter than its
    metadata (FileNotFoundError, JSON that does not parse, tensorstore DATA_LOSS / NOT_FOUND /
    OUT_OF_RANGE), never for a storage error (any other OSError, UNAVAILABLE, ...).
    """
    step_dir = self.directory / str(step)
    try:
      if (step_dir / "_CHECKPOINT_METADATA").exists():  # Optional: Orbax restores without it.
        json.loads((step_dir / "_CHECKPOINT_METADATA").read_text())
      for item in _ITEMS:
        if not (step_dir / item).is_dir():
          return f"item {item}/ is missing"
      json.loads((step_dir / TRAIN_STATE_ITEM / "_METADATA").read_text())
    except FileNotFoundError as e:
      return f"{e.filename or e} is missing"
    except json.JSONDecodeError as e:
      return f"metadata does not parse ({e.msg})"
    if isinstance(error, (FileNotFoundError, json.JSONDecodeError)):
      return _describe(error)
    if error is not None and not isinstance(error, OSError):
      if str(error).lstrip().startswith(_DAMAGE_STATUSES):
        return _describe(error, limit=200)
    return None

  def restore_params(self, abstract_params: PyTree, step: int | None = None
                     ) -> tuple[int, PyTree] | None:
    """(step, params): only the parameters of the newest train-state checkpoint that is not
    provably damaged (the same rule as `restore_latest`), or of `step`, onto the shardings in
    `abstract_params` (the `params` field of the saved state); None if there is no checkpoint.
    The optimiser state is never read: evaluation and export need the weights alone.
    """
    item = {"params": abstract_keys_to_data(abstract_params)}

    def read(step: int) -> tuple[int, PyTree]:
      path = self.directory / str(step) / TRAIN_STATE_ITEM
      restored = ocp.PyTreeCheckpointer().restore(path, args=ocp.args.PyTreeRestore(
          item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
          partial_restore=True))
      return step, data_to_keys(restored["params"], abstract_params)

    if step is not None:
      return read(step)
    return self._restore_newest(read)

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
      # Only the flag: Python runs this handler inside whatever the main thread was doing, e.g.
      # a progress bar's write to stderr blocked on a full pipe, and a write to that stream
      # from here is a reentrant call (a logging error). `should_stop` says it from the loop.
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
    if jax.process_count() == 1 or not jax.config.jax_enable_preemption_service:
      return False  # Single process: the SIGTERM handler. Service switched off: on purpose.
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    # A RuntimeError here is a broken preemption service: it must not read as "no preemption".
    return bool(multihost_utils.reached_preemption_sync_point(step))

  def should_stop(self, step: int) -> bool:
    """True when the loop should save (`force=True`), wait, and exit at this step."""
    requested = self._stop_requested.is_set()
    stop = requested or self.reached_preemption(step)
    if stop and not _stopped_at:
      _stopped_at.append(step)
      log.warning("%s: checkpointing at step %d and stopping.",
                  "SIGTERM received" if requested else "Preemption sync point reached", step)
    return stop


def stopped_at() -> int | None:
  """The step at which a Checkpointer of this process told its loop to stop on SIGTERM or
  preemption (None if none did): the run ends with `rpt_jax.errors.EXIT_PREEMPTED`."""
  return _stopped_at[0] if _stopped_at else None


def _describe(error: BaseException, limit: int = 400) -> str:
  """One short line: tensorstore errors embed kilobytes of JSON spec."""
  text = f"{type(error).__name__}: {error}".splitlines()[0]
  return text if len(text) <= limit else text[:limit] + " ..."


def _max_over_processes(value: int) -> int:
  """The largest `value` over processes (no communication in a single-process run)."""
  if jax.process_count() == 1:
    return value
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return int(np.max(multihost_utils.process_allgather(np.int32(value))))
