"""Checks of a run spec that need more than the spec: the device layout, the paths, the model.

Each section's own values are validated where its dataclass is built (`rpt_jax.spec.RunSpec`);
here: `validate_run(spec, mode, num_devices, num_processes)` before anything is built (mesh vs
batch sizes, what the RPT loop can compute, input paths), and `validate_against_model` right
after the model's config is read (prompt + response within its positions). Every error names the
config field and the fix.
"""

from __future__ import annotations

import math
import os

from rpt_jax import errors
from rpt_jax import mesh as mesh_lib

MODES = ("all", "prepare", "pretrain", "train", "eval", "export", "compile_check", "study")


class ConfigError(errors.UserError, ValueError):
  """A config value that cannot work; the message names the field and the fix."""


def _require(condition: bool, message: str) -> None:
  if not condition:
    raise ConfigError(message)


def batch_axis_size(spec, num_devices: int) -> int:
  """How many ways the batch is split: the product of the mesh axes the 'batch' rule uses."""
  try:
    shape = dict(zip(mesh_lib.MESH_AXES, spec.mesh.shape(num_devices)))
  except ValueError as e:
    raise ConfigError(f"config.mesh: {e}") from e
  return math.prod(shape[a] for a in mesh_lib.as_tuple(spec.rules.mesh_axes("batch")))


def _check_path(value: str, field: str, what: str, *, folder: bool) -> None:
  if not value or value.startswith("gs://"):  # gs:// inputs are read through their mount.
    return
  ok = os.path.isdir(value) if folder else os.path.exists(value)
  _require(ok, f"{field}={value!r} {'is not a directory' if folder else 'does not exist'}; "
           f"{what}")


def validate_run(spec, *, mode: str, num_devices: int, num_processes: int = 1) -> None:
  """Raises ConfigError for the first setting that cannot work on this device layout."""
  _require(mode in MODES, f"--mode={mode!r} is unknown; choose one of {MODES}.")
  ways = batch_axis_size(spec, num_devices)
  rpt = spec.rpt
  _require(rpt.batch_contexts % ways == 0,
           f"rl.batch_contexts={rpt.batch_contexts} is not divisible by the {ways}-way batch "
           f"split of the mesh (data x fsdp); use a multiple of {ways}.")
  _require(rpt.batch_contexts % num_processes == 0,
           f"rl.batch_contexts={rpt.batch_contexts} is not divisible by the {num_processes} "
           "processes; each process feeds an equal share.")
  # The engine shards slots, the static sampler contexts; the train step rollout rows.
  _require(rpt.slots % ways == 0,
           f"rl.decode_slots={rpt.decode_slots} gives {rpt.slots} decode slots, not a multiple "
           f"of the {ways}-way batch split (data x fsdp); choose one that is.")
  _require(rpt.prefill_contexts == 1 or rpt.prefill_contexts % ways == 0,
           f"rl.prefill_contexts={rpt.prefill_contexts} is not a multiple of the {ways}-way "
           f"batch split (data x fsdp); use 1 or a multiple of {ways}.")
  for field, rows in (("rollout_micro_batch", rpt.rollout_micro_contexts),
                      ("train_micro_batch", rpt.train_micro_contexts * rpt.num_generations)):
    _require(rows % ways == 0,
             f"rl.{field}={getattr(rpt, field)} gives {rows} rows per micro-batch, not a "
             f"multiple of the {ways}-way batch split (data x fsdp); choose one that is.")
  if mode in ("all", "pretrain", "study") and spec.pretrain is not None:
    _require(spec.pretrain.batch_size % ways == 0,
             f"pretrain.batch_size={spec.pretrain.batch_size} must be a multiple of the "
             f"{ways}-way batch split.")
  _check_path(spec.model.hf_path, "model.hf_path", "point it at a Hugging Face checkpoint "
              "folder (config.json + *.safetensors).", folder=True)
  _check_path(spec.tokenizer_path, "tokenizer.path", "give a SentencePiece .model file or an "
              "HF tokenizer folder, or leave it empty.", folder=False)
  if rpt.loss.beta > 0:
    _check_path(rpt.objective.kl.reference, "rl.reference", "point it at a Hugging Face "
                "checkpoint folder of the KL reference, or leave it empty to anchor to the "
                "starting policy.", folder=True)
  _check_path(spec.proxy_hf_path, "data.proxy_hf_path", "point it at a Hugging Face checkpoint "
              "folder, or leave it empty to score with the policy.", folder=True)
  if spec.source.kind in ("text", "jsonl", "parquet"):
    _require(bool(spec.source.path) and os.path.exists(spec.source.path),
             f"data.source.path={spec.source.path!r} does not exist; point it at the corpus "
             "file or folder.")


def validate_against_model(spec, max_positions: int, prompt_len: int | None = None) -> None:
  """Prompt + response must fit the model's positions (and the cache it implies)."""
  prompt_len = prompt_len or max(spec.loader.prompt_buckets)
  new_tokens = spec.rpt.max_new_tokens
  total = prompt_len + new_tokens
  _require(total <= max_positions,
           f"the longest prompt bucket ({prompt_len}) + rl.max_new_tokens ({new_tokens}) = "
           f"{total} exceeds the model's max_position_embeddings={max_positions}; lower "
           "data.prompt_buckets or rl.max_new_tokens.")
