"""Config validation (rpt_jax/validate.py): each rule raises ConfigError naming the field, and
`python -m rpt_jax.main` with a bad override exits non-zero with that message before building
anything.

The valid starting point is configs/local.py on the 8 simulated devices of tests/conftest.py
(mesh data=1 x fsdp=8: an 8-way batch split).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import micro_run
from rpt_jax import validate
from rpt_jax.spec import RunSpec

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from configs import base, local  # noqa: E402  pylint: disable=g-import-not-at-top

DEVICES = 8


def _config(**overrides):
  """configs/local.py with dotted overrides ('rl__top_p' -> rl.top_p)."""
  return micro_run.apply_overrides(
      local.get_config(), {name.replace("__", "."): value for name, value in overrides.items()})


def _check(config, mode="all", num_devices=DEVICES, num_processes=1):
  """The two checks a run makes before building anything: the spec, then the device layout."""
  validate.validate_run(RunSpec.from_config(config), mode=mode, num_devices=num_devices,
                        num_processes=num_processes)


def test_shipped_configs_are_valid():
  _check(local.get_config())
  _check(base.get_config())  # 256 contexts, micro-batches 64 / 8 on 8 devices
  # local.py's own model: its longest prompt bucket (192) + 24 response tokens <= 512 positions.
  validate.validate_against_model(RunSpec.from_config(local.get_config()), 512)


# (override, the text the error must contain: the field and its bad value)
BAD = [
    (dict(rl__num_generations=1), "rl.num_generations=1"),
    (dict(rl__batch_contexts=0), "rl.batch_contexts=0"),
    (dict(rl__batch_contexts=12, rl__rollout_micro_batch=12, rl__train_micro_batch=12),
     "rl.batch_contexts=12 is not divisible by the 8-way batch split"),
    (dict(rl__rollout_micro_batch=12), "rl.rollout_micro_batch=12 must divide"),  # 16 % 12
    # 1 context x G=4 rows cannot split 8 ways (2 contexts x 4 rows can: prompts replicate).
    (dict(rl__num_generations=4, rl__train_micro_batch=1),
     "rl.train_micro_batch=1 gives 4 rows per micro-batch"),
    (dict(rl__temperature=-0.1), "rl.temperature=-0.1"),
    # GRPO needs G different rollouts, and the update scores them at the sampling temperature.
    (dict(rl__temperature=0.0), "rl.temperature=0.0 must be > 0"),
    (dict(rl__top_p=0.0), "rl.top_p=0.0"),
    (dict(rl__top_p=1.5), "rl.top_p=1.5"),
    (dict(rl__max_new_tokens=0), "rl.max_new_tokens=0"),
    (dict(rl__oversample_contexts=-1), "rl.oversample_contexts=-1 must be >= 0"),
    (dict(rl__partial_rollouts=True), "rl.partial_rollouts=True carries rows that over-sampling"),
    (dict(rl__advantage="ppo"), "rl.advantage='ppo'"),
    (dict(rl__reward="exact"), "rl.reward='exact': unknown reward 'exact'"),
    (dict(data__template="v9"), "data.template: unknown prompt template 'v9'"),
    (dict(data__filter="loss"), "data.filter: unknown position filter 'loss'"),
    (dict(rl__aggregation="sum"), "rl.aggregation='sum'"),
    (dict(rl__kl_estimator="k2"), "rl.kl_estimator='k2'"),
    (dict(rl__eps_low=1.0), "rl.eps_low=1.0"),
    (dict(rl__beta=-0.01), "rl.beta=-0.01"),
    (dict(rl__reward="rlp", rl__ema_decay=1.0), "rl.ema_decay=1.0"),
    (dict(rl__ntp_coef=-1.0), "rl.ntp_coef=-1.0"),
    (dict(rl__thought_budget=(64, 8)), "rl.thought_budget=(64, 8)"),
    (dict(rl__thought_budget=(8, 64, 0.5)), "rl.thought_budget=(8, 64, 0.5)"),
    (dict(rl__length_reward_coef=0.1), "rl: length_reward_coef > 0 needs a thought budget"),
    (dict(rl__beta=0.01, rl__reference="/nonexistent/ref"), "rl.reference='/nonexistent/ref'"),
    (dict(data__prompt_buckets=(192, 128)), "data.prompt_buckets=(192, 128)"),
    (dict(data__prompt_buckets=()), "data.prompt_buckets=()"),
    (dict(optim__learning_rate=0.0), "optim.learning_rate=0.0"),
    (dict(train__steps=-1), "train.steps=-1"),
    (dict(pretrain__batch_size=12), "pretrain.batch_size=12"),
    (dict(mesh__data=3), "config.mesh"),  # 3 does not divide 8 devices
    (dict(model__hf_path="/nonexistent/model"), "model.hf_path='/nonexistent/model'"),
    (dict(tokenizer__path="/nonexistent/spm.model"), "tokenizer.path='/nonexistent/spm.model'"),
    (dict(data__proxy_hf_path="/nonexistent/proxy"), "data.proxy_hf_path='/nonexistent/proxy'"),
    (dict(data__source__kind="jsonl", data__source__path="/nonexistent/c.jsonl"),
     "data.source.path='/nonexistent/c.jsonl'"),
    (dict(data__source__kind="text", data__source__path=""),
     "data.source.path is empty"),
]


@pytest.mark.parametrize("overrides,message", BAD, ids=[m for _, m in BAD])
def test_bad_value_names_the_field(overrides, message):
  with pytest.raises(validate.ConfigError) as info:
    _check(_config(**overrides))
  assert message in str(info.value)


def test_batch_split_follows_the_mesh_and_processes():
  # data=2 x fsdp=4: both axes split the batch (8 ways); 4 contexts cannot feed 8 devices.
  with pytest.raises(validate.ConfigError, match="8-way batch split"):
    _check(_config(mesh__data=2, mesh__fsdp=4, rl__batch_contexts=4,
                   rl__rollout_micro_batch=4, rl__train_micro_batch=4))
  # With the batch on 'data' only (fsdp shards weights, not rows) 4 contexts split 2 ways.
  assert validate.batch_axis_size(RunSpec.from_config(_config(
      mesh__data=2, mesh__fsdp=4, sharding_rules=(("batch", "data"),))), DEVICES) == 2
  with pytest.raises(validate.ConfigError, match="not divisible by the 3 processes"):
    _check(_config(), num_processes=3)  # 16 contexts


def test_rules_that_only_some_modes_need():
  # Pretraining batch and the train-only limits do not stop an eval or an export.
  for mode in ("eval", "export", "prepare"):
    _check(_config(pretrain__batch_size=12), mode=mode)
  with pytest.raises(validate.ConfigError, match="--mode='fly' is unknown"):
    _check(_config(), mode="fly")


def test_every_objective_is_accepted_for_training():
  for overrides in (dict(rl__reward="dense"), dict(rl__beta=0.01), dict(rl__reward="rlp"),
                    dict(rl__ntp_coef=0.1),
                    dict(rl__thought_budget=(64, 8, 0.5), rl__length_reward_coef=0.1)):
    _check(_config(**overrides), mode="train")


def test_prompt_plus_response_must_fit_the_model():
  c = _config(rl__max_new_tokens=400)  # 192 + 400 > 512
  with pytest.raises(validate.ConfigError, match=r"192\) \+ rl.max_new_tokens \(400\) = 592"
                     r" exceeds the model's max_position_embeddings=512"):
    validate.validate_against_model(RunSpec.from_config(c), 512)
  validate.validate_against_model(RunSpec.from_config(c), 592)  # exactly full is fine


def _main(tmp_path, *flags: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_PLATFORMS="cpu", TOKENIZERS_PARALLELISM="false",
             PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  return subprocess.run(
      [sys.executable, "-m", "rpt_jax.main", "--config=configs/local.py",
       f"--workdir={tmp_path / 'run'}", *flags],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)


def test_main_rejects_a_bad_override_before_building_anything(tmp_path):
  proc = _main(tmp_path, "--config.rl.num_generations=1")
  assert proc.returncode != 0
  assert "rpt_jax: rl.num_generations=1" in proc.stderr
  assert "Traceback" not in proc.stderr
  assert not (tmp_path / "run").exists()  # no tokenizer, no checkpoint: nothing was built


def test_main_checks_the_model_positions_before_initialising_it(tmp_path):
  # The tokenizer is trained first (the scratch vocabulary is its size); then the check fails
  # before the policy is initialised (compiled) or any stage runs.
  proc = _main(tmp_path, "--config.rl.max_new_tokens=1000",
               "--config.data.source.synthetic_documents=50",
               "--config.tokenizer.train_vocab_size=384")
  assert proc.returncode != 0
  assert "exceeds the model's max_position_embeddings=512" in proc.stderr
  assert "Traceback" not in proc.stderr
  assert sorted(os.listdir(tmp_path / "run")) == ["logs", "tokenizer"]  # logs: the run log
