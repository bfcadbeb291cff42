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


def one_line(error: BaseException, limit: int = 1000) -> str:
  """The error's message on one line (newlines folded), at most `limit` characters."""
  text = " ".join(str(error).split()) or type(error).__name__
  return text if len(text) <= limit else text[:limit] + " ..."
