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

Config values are overridden on the command line: `--config.rl.num_generations=4`.
"""

from __future__ import annotations

import json
import os
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from rpt_jax import run_dir, validate
from rpt_jax import spec as spec_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "Run config (a configs/*.py file).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (local path or gs://); "
                               "defaults to the config's `workdir`.")
_MODE = flags.DEFINE_enum("mode", "all", list(validate.MODES), "What to run.")
_EXPORT_DIR = flags.DEFINE_string("export_dir", None, "Where --mode=export writes.")


def initialize_distributed(config) -> None:
  """Multi-host start-up: automatic on TPU pods, explicit coordinator flags elsewhere."""
  d = config.distributed
  if d.coordinator_address:
    if os.environ.get("JAX_PLATFORMS", "").startswith("cpu"):
      # Cross-process collectives on CPU need gloo (the default CPU backend has none).
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=d.coordinator_address,
                               num_processes=d.num_processes, process_id=d.process_id)
  elif os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0 or os.environ.get(
      "MEGASCALE_COORDINATOR_ADDRESS"):
    jax.distributed.initialize()  # Multi-host TPU slice: JAX discovers its peers itself.


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  if config is None:
    raise app.UsageError("--config is required, e.g. --config=configs/local.py")
  workdir = _WORKDIR.value or config.workdir
  if not workdir:
    raise app.UsageError("--workdir is required (or set the config's `workdir`).")
  try:
    if _MODE.value == "compile_check":
      # Compiles for the config's TARGET devices (a described TPU slice), not this machine's,
      # so this machine's device count must not be validated against the config's mesh.
      from rpt_jax import compile_check
      report = compile_check.check_run_config(spec_lib.RunSpec.from_config(config))
      print(json.dumps(report, indent=2, default=str))
      return
    initialize_distributed(config)
    _run(config, workdir, _MODE.value)
  except (validate.ConfigError, run_dir.NotMountedError) as e:  # One line: the field and fix.
    sys.exit(f"rpt_jax: config error: {e}")


def _run(config, workdir: str, mode: str) -> None:
  config = run_dir.localize_inputs(config)  # gs:// inputs through their bucket's gcsfuse mount
  run_dir.files_dir(workdir)  # A gs:// workdir's bucket must be mounted: say so before work.
  spec = spec_lib.RunSpec.from_config(config)
  validate.validate_run(spec, mode=mode, num_devices=jax.device_count(),
                        num_processes=jax.process_count())
  from rpt_jax import pipeline  # After validation: imports the heavy machinery.

  run = pipeline.Run(spec, workdir)
  result = {
      "all": run.run_all,
      "prepare": run.prepare,
      "pretrain": run.pretrain,
      "train": run.train,
      "eval": run.evaluate,
      "export": lambda: run.export(_EXPORT_DIR.value),
  }[mode]()
  if result is not None and jax.process_index() == 0:
    print(result if isinstance(result, str) else json.dumps(result, indent=2, default=str))
  sys.stdout.flush()


if __name__ == "__main__":
  logging.set_verbosity(logging.INFO)
  app.run(main)
