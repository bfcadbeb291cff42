"""compile_check's estimate counts the objective's weight copies: the KL reference (rl.beta > 0)
and RLP's EMA teacher, each one device's parameter shards (hand count of test_compile_check)."""

from rpt_jax import compile_check
from rpt_jax.spec import RunSpec
from tests.test_compile_check import params_per_device_by_hand, small_config


def _estimate(**rl):
  config = small_config()
  config.rl.update(**rl)
  spec = RunSpec.from_config(config)
  model = spec.model.model_config(spec.untrained_vocab())
  return compile_check.estimate_memory(spec, model, dict(data=1, fsdp=2, tensor=2))


def test_reference_and_teacher_bytes():
  params = params_per_device_by_hand()
  plain = _estimate()
  assert plain["reference"] == plain["teacher"] == 0
  kl = _estimate(beta=0.01)
  assert kl["reference"] == params and kl["teacher"] == 0
  rlp = _estimate(reward="rlp", beta=0.01)
  assert rlp["reference"] == rlp["teacher"] == params
