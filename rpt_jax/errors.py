"""What a user can fix vs what is a bug, and the exit codes a job runner reads.

`UserError` and its subclasses are mistakes in the run's inputs (a config value, a corpus, the
weights, the tokenizer, the workdir, a checkpoint, the devices). Each message is one line that
names the field or file and the fix: `<what> <which file or field>: <fix>`. `rpt_jax.main`
prints it as `rpt_jax: <message>` and exits with `EXIT_USER_ERROR`, without a traceback
(`--traceback` shows it). Any other exception is a bug and keeps its traceback.

The subclasses also derive from the builtin a caller would catch (`ValueError`,
`FileNotFoundError`), so `except ValueError` around a library call keeps working.

Exit codes of `python -m rpt_jax.main`:
  0   finished
  1   an internal error (a traceback is printed)
  2   a user error (one line)
  75  stopped on SIGTERM / preemption after saving a checkpoint (EX_TEMPFAIL in sysexits.h:
      "try again"); running the same command again resumes. tpu_scripts restarts on it.
"""

from __future__ import annotations

EXIT_USER_ERROR = 2
EXIT_PREEMPTED = 75


class UserError(Exception):
  """A mistake the user can fix; the message names the field or file and the fix."""


class InputError(UserError, ValueError):
  """A file or value the user gave exists but cannot be used (corrupt, wrong kind, mismatch)."""


class MissingInputError(UserError, FileNotFoundError):
  """A path the user gave does not exist."""


class Preempted(Exception):
  """The run stopped at a step boundary on SIGTERM / preemption, after saving a checkpoint."""

  def __init__(self, step: int):
    super().__init__(f"stopped at step {step} on SIGTERM/preemption after saving a checkpoint; "
                     "run the same command again to resume.")
    self.step = step


class OtherProcessError(UserError):
  """Another process of a multi-host run stopped on a user error; this one stops with it."""


def raise_together(error: BaseException | None) -> None:
  """Every process of a run calls this at the same point with the error it hit there (or None):
  all raise, or none does, so no process is left waiting in the next collective.

  A process that failed raises its own error; the others raise `OtherProcessError` (the failure
  was a UserError: each exits 2) or RuntimeError (it was a bug), naming the failed processes.
  One `process_allgather` of an int; nothing in a single-process run.
  """
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_count() == 1:
    if error is not None:
      raise error
    return
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  code = 0 if error is None else 1 if isinstance(error, UserError) else 2
  codes = np.asarray(multihost_utils.process_allgather(np.int32(code))).reshape(-1)
  if error is not None:
    raise error
  failed = [int(i) for i in np.flatnonzero(codes)]
  if not failed:
    return
  if codes.max() == 1:
    raise OtherProcessError(f"process(es) {failed} stopped on a user error (the line is in "
                            "their output and logs): fix that input; every process stops.")
  raise RuntimeError(f"process(es) {failed} failed (see their traceback); every process stops.")


def one_line(error: BaseException, limit: int = 1000) -> str:
  """The error's message on one line (newlines folded), at most `limit` characters."""
  text = " ".join(str(error).split()) or type(error).__name__
  return text if len(text) <= limit else text[:limit] + " ..."
