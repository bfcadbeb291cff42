r"""rpt_jax entry point: `python -m rpt_jax.main --config=configs/local.py --workdir=/tmp/rpt`.

Modes (`--mode`):
  all            (default) the whole pipeline: tokenizer -> pretrain (if pretrain.steps > 0) ->
                 prepare -> eval -> RPT train -> eval, printing accuracy before and after RPT.
                 Every stage resumes from what the workdir already holds.
  prepare        score and filter positions into <workdir>/records.
  pretrain       plain next-token pretraining (+ formatted reasoning examples).
  train          the RPT loop (resumes from the latest checkpoint).
  eval           next-token accuracy by difficulty of the latest policy -> <workdir>/eval.
  export         the latest policy as HF safetensors -> <workdir>/export (or --export_dir).
  compile_check  lower and compile the sampler and train step for the config's mesh and read
                 per-device memory (no training).
  study          `all`, with evaluations along RPT and the scaling-law fit, then the same RL
                 budget with each position filter -> <workdir>/study/report.md (rpt_jax.study).

Config values are overridden on the command line: `--config.rl.num_generations=4`.

The terminal shows progress bars, stage lines and the result; the full log (library INFO
included) is in <workdir>/logs/run.log. A mistake in the inputs prints one line,
`rpt_jax: <what> <file or field>: <fix>`, and exits 2 (`--traceback` shows where it was raised);
a run stopped by SIGTERM/preemption exits 75 after saving a checkpoint (rpt_jax.errors).
"""

from __future__ import annotations

import json
import os
import sys

from rpt_jax import console

console.quiet_accelerator_probe()  # Before JAX is imported.

import jax  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from rpt_jax import errors, run_dir, validate  # noqa: E402
from rpt_jax import spec as spec_lib  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Run config (a configs/*.py file).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (local path or gs://); "
                               "defaults to the config's `workdir`.")
_MODE = flags.DEFINE_enum("mode", "all", list(validate.MODES), "What to run.")
_EXPORT_DIR = flags.DEFINE_string("export_dir", None, "Where --mode=export writes.")
_TRACEBACK = flags.DEFINE_bool("traceback", False, "Show the traceback of a user error too.")


def initialize_distributed(config) -> None:
  """Multi-host start-up: automatic on TPU pods, explicit coordinator flags elsewhere."""
  d = config.distributed
  if d.coordinator_address:
    if os.environ.get("JAX_PLATFORMS", "").startswith("cpu"):
      # Cross-process collectives on CPU need gloo (the default CPU backend has none).
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
      jax.distributed.initialize(coordinator_address=d.coordinator_address,
                                 num_processes=d.num_processes, process_id=d.process_id)
    except (RuntimeError, ValueError) as e:  # The coordinator given cannot be reached or used.
      raise errors.InputError(
          f"distributed start-up with config.distributed (coordinator_address="
          f"{d.coordinator_address!r}, num_processes={d.num_processes}, process_id="
          f"{d.process_id}) failed ({errors.one_line(e, 300)}): check those three fields on "
          "every process.") from e
  elif os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0 or os.environ.get(
      "MEGASCALE_COORDINATOR_ADDRESS"):
    jax.distributed.initialize()  # Multi-host TPU slice: JAX discovers its peers itself.


def _user_error_exit(error: BaseException, show_traceback: bool) -> None:
  """Prints `rpt_jax: <one line>` (after the traceback when asked) and exits 2."""
  if console.log_file():  # The log file (not the terminal) keeps the traceback.
    logging.info("user error", exc_info=error)
  if show_traceback:
    import traceback  # pylint: disable=g-import-not-at-top
    traceback.print_exception(error, file=sys.stderr)
  sys.stderr.flush()
  print(f"rpt_jax: {errors.one_line(error)}", file=sys.stderr, flush=True)
  sys.exit(errors.EXIT_USER_ERROR)


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a bad flag, config file or override answered in one line."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    error = e
  except Exception as e:  # pylint: disable=broad-except
    error = _config_error(e)
  _user_error_exit(error, "--traceback" in argv)
  return []


def _config_error(error: Exception) -> errors.UserError:
  """The config file is Python run while flags are parsed: any error in it is the user's."""
  text = errors.one_line(error)
  if isinstance(error, (AttributeError, KeyError)):  # ml_collections: an unknown field
    text = text.replace("\\n", " ").replace("\\'", "").replace("'", "")
    return errors.UserError(f"a --config.* override names no config field ({text}): fix its "
                            "name.")
  return errors.UserError(f"--config file cannot be loaded ({type(error).__name__}: {text}): "
                          "fix the file or the path.")


def _load_config():
  try:
    config = _CONFIG.value
    if config is not None:
      config.get("workdir")  # The file loads on first use.
    return config
  except Exception as e:  # pylint: disable=broad-except
    raise _config_error(e) from e


def _hf_off_values(config) -> None:
  """HF's spelling of a disabled sampling filter (None) -> ours (top_k 0, top_p 1.0)."""
  if config.rl.top_k is None:
    config.rl.top_k = 0
  if config.rl.top_p is None:
    config.rl.top_p = 1.0


def check_workdir(workdir: str) -> None:
  """A local workdir must be a folder this process can create and write."""
  if workdir.startswith(run_dir.GCS_PREFIX):
    return
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise errors.InputError(f"workdir {workdir!r} is a file: pass --workdir=<a folder> (it is "
                            "created when missing).")
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise errors.InputError(f"workdir {workdir!r} cannot be created ({e.strerror}): pass "
                            "--workdir=<a folder you can write>.") from e
  if not os.access(workdir, os.W_OK | os.X_OK):
    raise errors.InputError(f"workdir {workdir!r} is not writable: pass --workdir=<a folder "
                            "you can write>.")


def main(argv) -> None:
  try:
    _main(argv)
  except errors.UserError as e:
    _user_error_exit(e, _TRACEBACK.value)
  except errors.Preempted as e:
    logging.warning("%s", e)
    sys.exit(errors.EXIT_PREEMPTED)


def _main(argv) -> None:
  if len(argv) > 1:
    raise errors.UserError(f"unexpected arguments {argv[1:]}: flags are --name=value.")
  config = _load_config()
  if config is None:
    raise errors.UserError("--config is required: e.g. --config=configs/local.py.")
  workdir = _WORKDIR.value or config.workdir
  if not workdir:
    raise errors.UserError("--workdir is required: pass --workdir=<folder or gs://BUCKET/DIR> "
                           "(or set the config's `workdir`).")
  _hf_off_values(config)
  if _MODE.value == "compile_check":
    # Compiles for the config's TARGET devices (a described TPU slice), not this machine's, so
    # this machine's device count must not be validated against the config's mesh.
    from rpt_jax import compile_check
    report = compile_check.check_run_config(spec_lib.RunSpec.from_config(config))
    print(json.dumps(report, indent=2, default=str))
    return
  initialize_distributed(config)
  config = run_dir.localize_inputs(config)  # gs:// inputs through their bucket's gcsfuse mount
  # Checked on the config alone, before anything (the workdir included) is created.
  spec = spec_lib.RunSpec.from_config(config)
  validate.validate_run(spec, mode=_MODE.value, num_devices=jax.device_count(),
                        num_processes=jax.process_count())
  check_workdir(workdir)
  console.setup(run_dir.files_dir(workdir), jax.process_index())
  _run(spec, workdir, _MODE.value)
  from rpt_jax import checkpoint  # pylint: disable=g-import-not-at-top
  if checkpoint.stopped_at() is not None:  # The trainer saved and returned early on SIGTERM.
    raise errors.Preempted(checkpoint.stopped_at())


def _run(spec: spec_lib.RunSpec, workdir: str, mode: str) -> None:
  from rpt_jax import pipeline  # After validation: imports the heavy machinery.

  run = pipeline.Run(spec, workdir)
  result = {
      "all": run.run_all,
      "prepare": run.prepare,
      "pretrain": run.pretrain,
      "train": run.train,
      "eval": run.evaluate,
      "study": run.study,
      "export": lambda: run.export(_EXPORT_DIR.value),
  }[mode]()
  if result is not None and jax.process_index() == 0:
    print(result if isinstance(result, str) else json.dumps(result, indent=2, default=str))
  sys.stdout.flush()


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
