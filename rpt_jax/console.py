"""What a run shows on the terminal, and the full log in `<workdir>/logs/run.log`.

The terminal gets progress bars (tqdm, on stderr), one line per stage (`stage`), warnings and
errors that rpt_jax itself logs or warns, and the result (stdout). Every log record, library
INFO included (absl, Orbax, JAX), goes to the log file.
"""

from __future__ import annotations

import glob
import logging
import os
import sys

LOG_DIR = "logs"
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
_FILE_FORMAT = "%(asctime)s %(levelname).1s %(name)s %(filename)s:%(lineno)d] %(message)s"
_log_file: list[str] = []  # set by `setup`


def quiet_accelerator_probe() -> None:
  """On a machine with no TPU and no GPU, runs JAX on the CPU only (`JAX_PLATFORMS=cpu`).

  Otherwise JAX starts libtpu when it is installed (the [tpu]/[test] extras), and libtpu's probe
  of TPU metadata prints INVALID_ARGUMENT errors about worker hostnames from C++, out of reach of
  any Python logging. Must run before JAX is imported; a JAX_PLATFORMS the user set wins.
  """
  if "JAX_PLATFORMS" in os.environ:
    return
  # TPU VMs expose /dev/accel* (v2-v5e) or /dev/vfio/* (v5p, v6e); GPUs /dev/nvidia* or /dev/kfd.
  accelerators = (glob.glob("/dev/accel*") + glob.glob("/dev/vfio/*")
                  + glob.glob("/dev/nvidia[0-9]*") + glob.glob("/dev/kfd"))
  if not accelerators:
    os.environ["JAX_PLATFORMS"] = "cpu"


class _OwnWarnings(logging.Filter):
  """Passes WARNING+ records that rpt_jax's own code logged or warned."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno < logging.WARNING:
      return False
    if record.name == "py.warnings":  # `warnings.warn`: the message starts with the file name.
      return _PACKAGE_DIR in record.getMessage()
    return record.pathname.startswith(_PACKAGE_DIR)


class _Terminal(logging.Formatter):

  def format(self, record: logging.LogRecord) -> str:
    message = record.getMessage()
    if record.name == "py.warnings":  # "<file>:<line>: <Category>: <text>\n  <source line>"
      message = message.splitlines()[0].split(": ", 2)[-1]
    return f"rpt_jax: {record.levelname.lower()}: {message}"


def setup(files_dir: str, process_index: int = 0) -> str:
  """Sends every log record to `<files_dir>/logs/run.log` (`run-process<i>.log` for process
  i > 0) and only rpt_jax's warnings to the terminal; returns the log file's path."""
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top

  log_dir = os.path.join(files_dir, LOG_DIR)
  os.makedirs(log_dir, exist_ok=True)
  path = os.path.join(log_dir, "run.log" if process_index == 0 else
                      f"run-process{process_index}.log")
  to_file = logging.FileHandler(path)
  to_file.setFormatter(logging.Formatter(_FILE_FORMAT))
  terminal = logging.StreamHandler(sys.stderr)
  terminal.addFilter(_OwnWarnings())
  terminal.setFormatter(_Terminal())
  root = logging.getLogger()
  for handler in list(root.handlers):  # absl's handler writes every INFO line to stderr.
    root.removeHandler(handler)
  root.addHandler(to_file)
  root.addHandler(terminal)
  root.setLevel(logging.INFO)
  absl_logging.set_verbosity(absl_logging.INFO)
  logging.captureWarnings(True)
  logging.getLogger(__name__).info("rpt_jax: %s", " ".join(sys.argv))
  _log_file[:] = [path]
  return path


def log_file() -> str | None:
  """The run's log file once `setup` has run, else None."""
  return _log_file[0] if _log_file else None


def stage(message: str) -> None:
  """One terminal line for a stage of the run (process 0 only), also written to the log."""
  logging.getLogger(__name__).info("stage: %s", message)
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_index() == 0:
    print(f"rpt_jax: {message}", file=sys.stderr, flush=True)
