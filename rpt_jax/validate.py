"""Config validation before anything is built or compiled: every error names the field and the fix.

`validate_config(config, num_devices, num_processes)` checks what can be known from the config
and the device count alone; checks that need the model (prompt + response within its positions,
tokenizer vocab within its embedding) run right after the model's config is read
(`validate_against_model`).
"""

from __future__ import annotations

import math
import os

import ml_collections

from rpt_jax import errors
from rpt_jax import mesh as mesh_lib
from rpt_jax.data import filtering
from rpt_jax.rl import advantages, loss, prompts, reward

MODES = ("all", "prepare", "pretrain", "train", "eval", "export", "compile_check")


class ConfigError(errors.UserError, ValueError):
  """A config value that cannot work; the message names the field and the fix."""


def _require(condition: bool, message: str) -> None:
  if not condition:
    raise ConfigError(message)


def batch_axis_size(config: ml_collections.ConfigDict, num_devices: int) -> int:
  """How many ways the batch is split: the product of the mesh axes the 'batch' rule uses."""
  shape = dict(zip(mesh_lib.MESH_AXES,
                   mesh_lib.MeshConfig(**config.mesh.to_dict()).shape(num_devices)))
  rules = mesh_lib.ShardingRules.from_config(config.get("sharding_rules"))
  return math.prod(shape[a] for a in mesh_lib._as_tuple(rules.mesh_axes("batch")))


def validate_config(config: ml_collections.ConfigDict, *, mode: str, num_devices: int,
                    num_processes: int = 1) -> None:
  """Raises ConfigError for the first config value that cannot work on this device layout."""
  _require(mode in MODES, f"--mode={mode!r} is unknown; choose one of {MODES}.")
  try:
    ways = batch_axis_size(config, num_devices)
  except ValueError as e:
    raise ConfigError(f"config.mesh: {e}") from e
  rl, data = config.rl, config.data
  _require(rl.num_generations >= 2,
           f"rl.num_generations={rl.num_generations}: GRPO compares rollouts within a group; "
           "use at least 2 (the paper uses 8).")
  for name in ("batch_contexts", "rollout_micro_batch", "train_micro_batch"):
    value = rl[name]
    _require(value >= 1, f"rl.{name}={value} must be >= 1.")
  _require(rl.batch_contexts % ways == 0,
           f"rl.batch_contexts={rl.batch_contexts} is not divisible by the {ways}-way batch "
           f"split of the mesh (data x fsdp); use a multiple of {ways}.")
  _require(rl.batch_contexts % num_processes == 0,
           f"rl.batch_contexts={rl.batch_contexts} is not divisible by the {num_processes} "
           "processes; each process feeds an equal share.")
  for name in ("rollout_micro_batch", "train_micro_batch"):
    micro = min(rl[name], rl.batch_contexts)
    # The train step shards rollout rows (micro x G); prompts are replicated when there are
    # fewer contexts than batch shards.
    rows = micro * rl.num_generations if name == "train_micro_batch" else micro
    _require(rl.batch_contexts % micro == 0 and rows % ways == 0,
             f"rl.{name}={rl[name]} must divide rl.batch_contexts={rl.batch_contexts} and "
             f"{'times rl.num_generations ' if name == 'train_micro_batch' else ''}be a "
             f"multiple of the {ways}-way batch split.")
  _require(rl.temperature >= 0, f"rl.temperature={rl.temperature} must be >= 0.")
  _require(0 < rl.top_p <= 1.0, f"rl.top_p={rl.top_p} must be in (0, 1].")
  _require(rl.max_new_tokens >= 1, f"rl.max_new_tokens={rl.max_new_tokens} must be >= 1.")
  _require(rl.advantage in advantages.ADVANTAGE_ESTIMATORS,
           f"rl.advantage={rl.advantage!r} is unknown; choose one of "
           f"{sorted(advantages.ADVANTAGE_ESTIMATORS)}.")
  for field, check in (("rl.reward", lambda: reward.get_reward(rl.reward)),
                       ("data.template", lambda: prompts.get_template(data.template)),
                       ("data.filter", lambda: filtering.get_filter(data.filter))):
    try:
      check()
    except ValueError as e:
      raise ConfigError(f"{field}: {e}") from e
  try:
    loss.LossConfig(eps_low=rl.eps_low, eps_high=rl.eps_high, aggregation=rl.aggregation,
                    beta=rl.beta, kl_estimator=rl.kl_estimator, entropy_coef=rl.entropy_coef,
                    max_response_length=rl.max_new_tokens)
  except ValueError as e:  # Its fields are the config's rl.* fields of the same names.
    raise ConfigError(str(e).replace("LossConfig.", "rl.")) from e
  if mode in ("all", "train"):
    # The loop scores rollouts on the host without the policy's first-token probabilities and
    # builds no reference-policy log-probs: say so now rather than after compiling step 0.
    _require(not reward.get_reward(rl.reward).needs_first_token_prob,
             f"rl.reward={rl.reward!r} needs the policy's probability of the true first token, "
             "which the RPT loop does not compute; use 'prefix_match' or 'first_token'.")
    _require(rl.beta == 0,
             f"rl.beta={rl.beta}: a KL penalty needs reference-policy log-probs, which the RPT "
             "loop does not compute; use rl.beta=0 (as the paper does).")
  buckets = tuple(data.prompt_buckets)
  _require(len(buckets) > 0 and all(b > a for a, b in zip(buckets, buckets[1:])),
           f"data.prompt_buckets={buckets} must be increasing lengths.")
  _require(config.optim.learning_rate > 0,
           f"optim.learning_rate={config.optim.learning_rate} must be > 0.")
  _require(config.train.steps >= 0, f"train.steps={config.train.steps} must be >= 0.")
  if config.model.hf_path and not config.model.hf_path.startswith("gs://"):
    _require(os.path.isdir(config.model.hf_path),
             f"model.hf_path={config.model.hf_path!r} is not a directory; point it at a "
             "Hugging Face checkpoint folder (config.json + *.safetensors).")
  if config.tokenizer.path and not config.tokenizer.path.startswith("gs://"):
    _require(os.path.exists(config.tokenizer.path),
             f"tokenizer.path={config.tokenizer.path!r} does not exist; give a SentencePiece "
             ".model file or an HF tokenizer folder, or leave it empty.")
  if data.proxy_hf_path and not data.proxy_hf_path.startswith("gs://"):
    _require(os.path.isdir(data.proxy_hf_path),
             f"data.proxy_hf_path={data.proxy_hf_path!r} is not a directory; point it at a "
             "Hugging Face checkpoint folder, or leave it empty to score with the policy.")
  src = data.source
  if src.kind in ("text", "jsonl", "parquet"):
    _require(bool(src.path) and os.path.exists(src.path),
             f"data.source.path={src.path!r} does not exist; point it at the corpus file or "
             "folder.")
  if mode in ("all", "pretrain"):
    pt = config.pretrain
    _require(pt.steps >= 0 and pt.batch_size % ways == 0,
             f"pretrain.batch_size={pt.batch_size} must be a multiple of the {ways}-way batch "
             "split.")


def validate_against_model(config: ml_collections.ConfigDict, max_positions: int,
                           prompt_len: int | None = None) -> None:
  """Prompt + response must fit the model's positions (and the cache it implies)."""
  prompt_len = prompt_len or max(config.data.prompt_buckets)
  total = prompt_len + config.rl.max_new_tokens
  _require(total <= max_positions,
           f"the longest prompt bucket ({prompt_len}) + rl.max_new_tokens "
           f"({config.rl.max_new_tokens}) = {total} exceeds the model's "
           f"max_position_embeddings={max_positions}; lower data.prompt_buckets or "
           "rl.max_new_tokens.")
