"""The run spec: a config turned, once, into every typed setting a run's stages take.

`RunSpec.from_config(config)` is the ONE place a `ml_collections` config becomes dataclasses:
the corpus (`SourceConfig`), preparation (`PrepareConfig`), pretraining (`PretrainConfig`), the
RPT loop (`RPTConfig`), evaluation (`EvalConfig`), the loader's settings and the policy's
architecture (`ModelSpec`). Each dataclass's `__post_init__` is the validation of its section;
a failure becomes one `ConfigError` naming the section. What needs devices, paths or the built
model is checked by `rpt_jax.validate`. The pipeline, trainer, evaluation and `compile_check`
take the spec (or its parts), never the config.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Callable, Mapping, TypeVar

import ml_collections

from rpt_jax import mesh as mesh_lib
from rpt_jax.data.prepare import PrepareConfig
from rpt_jax.data.sources import SourceConfig
from rpt_jax.data.synthetic import SyntheticConfig
from rpt_jax.evaluate import EvalConfig
from rpt_jax.model.config import ModelConfig
from rpt_jax.pretrain import PretrainConfig
from rpt_jax.rl import optim, prompts
from rpt_jax.rl import objectives
from rpt_jax.rl.loss import LossConfig
from rpt_jax.rl.rpt_config import RPTConfig
from rpt_jax.study import StudyConfig
from rpt_jax.validate import ConfigError

T = TypeVar("T")


_SECTIONS = ("mesh", "sharding_rules", "model", "tokenizer", "data", "rl", "optim", "train",
             "pretrain", "eval", "compile_check", "study")
# How the dataclasses name themselves in their messages, dropped before the config field is put.
_OWN_NAMES = ("optimizer ", "LossConfig.", "eval ")


def _field_message(section: str, message: str) -> str:
  """A dataclass's validation message as one naming the config field: messages that already
  start with a config path stay; 'name=value ...' becomes 'section.name=value ...'."""
  for own in _OWN_NAMES:
    if message.startswith(own):
      message = message[len(own):]
  head = message.split(".", 1)[0]
  if head in _SECTIONS and "." in message.split(" ", 1)[0]:
    return message
  if re.match(r"[a-z_]+(=|: )", message):
    return f"{section.split('.')[0]}.{message}"
  return f"{section}: {message}"


def _section(name: str, build: Callable[[], T]) -> T:
  """Builds one section's dataclass; its validation error becomes one line naming the field."""
  try:
    return build()
  except (ValueError, TypeError) as e:
    raise ConfigError(_field_message(name, str(e))) from e


def _thought_budget(value, length_reward_coef: float) -> objectives.ThoughtBudget:
  value = tuple(value or ())
  if len(value) not in (0, 3):
    raise ValueError(f"thought_budget={value} must be (start, floor, decay), e.g. "
                     "(512, 64, 0.5), or () for no budget.")
  start, floor, decay = value or (0, 1, 1.0)
  return objectives.ThoughtBudget(int(start), int(floor), float(decay),
                                  float(length_reward_coef))


@dataclasses.dataclass(frozen=True)
class VocabFacts:
  """What the policy's architecture takes from the tokenizer: its size and special ids."""

  vocab_size: int
  eos_token_ids: tuple[int, ...] = ()
  pad_token_id: int | None = None
  bos_token_id: int | None = None

  @classmethod
  def of(cls, tokenizer) -> "VocabFacts":
    return cls(tokenizer.vocab_size, tuple(tokenizer.stop_ids), tokenizer.pad_id,
               tokenizer.bos_id)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """How the policy's architecture is found, without reading weights.

  hf_path: an HF checkpoint folder (its config.json); empty: build `scratch`.
  scratch: ModelConfig fields of the from-scratch architecture (vocab_size 0 = the tokenizer's).
  hf_config: a config.json as a dict, for checking a run whose weights are elsewhere
    (`compile_check.hf_config`); used when `hf_path` has no readable config.json here.
  param_dtype, compute_dtype, remat, attention, scan_layers: the run's precision,
    rematerialisation, attention implementation (`rpt_jax.model.attention`) and whether the
    layer stack runs as a scan (`ModelConfig.scan_layers`).
  """

  hf_path: str = ""
  scratch: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  hf_config: Mapping[str, Any] | None = None
  param_dtype: str = "float32"
  compute_dtype: str = "bfloat16"
  remat: str = "full"
  attention: str = "auto"
  scan_layers: bool = False

  def run_fields(self) -> dict[str, Any]:
    """The ModelConfig fields the run sets whatever the architecture's source."""
    return dict(param_dtype=self.param_dtype, compute_dtype=self.compute_dtype,
                remat=self.remat, attention=self.attention, scan_layers=self.scan_layers)

  def model_config(self, vocab: VocabFacts) -> ModelConfig:
    """The policy's ModelConfig: the HF config.json's architecture, else `scratch` sized to
    `vocab`. A scratch Qwen2 has q/k/v biases as every Qwen2 does (unless `scratch` says
    otherwise), so that `--mode=export` writes a checkpoint `transformers` can load."""
    if self.hf_path and os.path.isfile(os.path.join(self.hf_path, "config.json")):
      return ModelConfig.from_hf(self.hf_path, **self.run_fields())
    if self.hf_config:
      return ModelConfig.from_hf(dict(self.hf_config), **self.run_fields())
    if self.hf_path:
      raise ConfigError(
          f"model.hf_path={self.hf_path!r} has no readable config.json here; point it at a "
          "Hugging Face checkpoint folder (or set compile_check.hf_config to its config.json "
          "contents to check a config without the weights).")
    fields = dict(self.scratch)
    if not fields.get("vocab_size"):
      fields["vocab_size"] = vocab.vocab_size
    fields.setdefault("attention_bias", fields.get("family") == "qwen2")
    fields.setdefault("eos_token_ids", tuple(vocab.eos_token_ids))
    fields.setdefault("pad_token_id", vocab.pad_token_id)
    fields.setdefault("bos_token_id", vocab.bos_token_id)
    return ModelConfig(**fields, **self.run_fields())


@dataclasses.dataclass(frozen=True)
class LoaderSpec:
  """The RPT prompt loader's settings (`rpt_jax.data.pipeline.PromptLoader`)."""

  template: str
  prompt_buckets: tuple[int, ...]
  batch_contexts: int
  worker_count: int
  seed: int

  def __post_init__(self):
    b = tuple(self.prompt_buckets)
    object.__setattr__(self, "prompt_buckets", b)
    if not b or b[0] < 1 or any(y <= x for x, y in zip(b, b[1:])):
      raise ValueError(f"prompt_buckets={b} must be increasing positive lengths.")
    if self.worker_count < 0:
      raise ValueError(f"worker_count={self.worker_count} must be >= 0.")
    try:
      prompts.get_template(self.template)
    except ValueError as e:
      raise ValueError(f"template: {e}") from None


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """Every typed setting of one run; see the module docstring.

  pretrain is None when `pretrain.steps` is 0 (no pretraining stage). tokenizer_path: an HF
  folder or SentencePiece file ('' = the model's own, or one trained on the corpus, of
  `train_vocab_size` pieces). target: the `compile_check` section as a dict.
  """

  seed: int
  mesh: mesh_lib.MeshConfig
  rules: mesh_lib.ShardingRules
  model: ModelSpec
  tokenizer_path: str
  train_vocab_size: int
  proxy_hf_path: str
  prepare: PrepareConfig
  records_dir: str
  loader: LoaderSpec
  pretrain: PretrainConfig | None
  rpt: RPTConfig
  eval: EvalConfig
  keep_checkpoints: int
  target: Mapping[str, Any]
  study: StudyConfig = StudyConfig()

  @property
  def source(self) -> SourceConfig:
    return self.prepare.source

  def untrained_vocab(self) -> VocabFacts:
    """Vocab facts before any tokenizer exists (compile_check): the HF model's own config, or
    the size of the SentencePiece model the offline run will train."""
    return VocabFacts(self.train_vocab_size)

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> "RunSpec":
    c = config
    d, rl, m = c.data, c.rl, c.model
    mesh = _section("mesh", lambda: mesh_lib.MeshConfig(**c.mesh.to_dict()))
    rules = _section("sharding_rules",
                     lambda: mesh_lib.ShardingRules.from_config(c.get("sharding_rules")))
    source = _section("data.source", lambda: SourceConfig(
        kind=d.source.kind, path=d.source.path or None, field=d.source.field,
        name=d.source.name or None, data_dir=d.source.data_dir or None, split=d.source.split,
        max_documents=d.source.get("max_documents") or None,
        max_document_chars=d.source.get("max_document_chars", 8000) or None,
        synthetic=SyntheticConfig(num_documents=d.source.synthetic_documents, seed=c.seed)))
    prepare = _section("data", lambda: PrepareConfig(
        source=source, filter=d.filter, entropy_threshold=d.entropy_threshold,
        bucket_thresholds=tuple(d.difficulty_thresholds), min_context_tokens=d.min_context_tokens,
        max_prompt_tokens=d.max_prompt_tokens, completion_tokens=d.completion_tokens,
        max_positions_per_document=d.max_positions_per_document or None,
        score_seq_len=d.score_seq_len, score_overlap=d.score_overlap,
        score_batch_size=d.score_batch_size, eval_fraction=d.eval_fraction, seed=c.seed,
        docs_per_shard=d.get("docs_per_shard", 256),
        tokenizer_id=c.tokenizer.path or m.hf_path or "trained-sentencepiece",
        proxy_id=d.proxy_hf_path or m.hf_path or "policy"))
    loader = _section("data", lambda: LoaderSpec(
        template=d.template, prompt_buckets=tuple(d.prompt_buckets),
        batch_contexts=rl.batch_contexts, worker_count=d.worker_count, seed=c.seed))
    pt = c.pretrain
    pretrain = None if pt.steps <= 0 else _section("pretrain", lambda: PretrainConfig(
        steps=pt.steps, batch_size=pt.batch_size, seq_len=pt.seq_len,
        learning_rate=pt.learning_rate, warmup_steps=pt.warmup_steps,
        reasoning_example_fraction=pt.reasoning_example_fraction,
        skill_example_fraction=pt.skill_example_fraction, thought=pt.thought,
        template=d.template, max_context_tokens=pt.max_context_tokens,
        min_context_tokens=pt.min_context_tokens, seed=c.seed, log_every=pt.log_every))
    loss = _section("rl", lambda: LossConfig(
        eps_low=rl.eps_low, eps_high=rl.eps_high, aggregation=rl.aggregation, beta=rl.beta,
        kl_estimator=rl.kl_estimator, entropy_coef=rl.entropy_coef,
        max_response_length=rl.max_new_tokens, ntp_coef=rl.ntp_coef))
    objective = _section("rl", lambda: objectives.ObjectiveConfig.build(
        rl.reward, {"ema_decay": rl.ema_decay}, kl=objectives.KLConfig(rl.reference),
        budget=_thought_budget(rl.thought_budget, rl.length_reward_coef)))
    rpt = _section("rl", lambda: RPTConfig(
        steps=c.train.steps, batch_contexts=rl.batch_contexts,
        num_generations=rl.num_generations, temperature=rl.temperature, top_k=rl.top_k,
        top_p=rl.top_p, max_new_tokens=rl.max_new_tokens, reward=rl.reward,
        advantage=rl.advantage, loss=loss, objective=objective, template=d.template,
        dynamic_sampling_from_step=rl.dynamic_sampling_from_step,
        dynamic_sampling_max_tries=rl.dynamic_sampling_max_tries,
        rollout_micro_batch=rl.rollout_micro_batch, train_micro_batch=rl.train_micro_batch,
        decode_slots=rl.get("decode_slots", 0), prefill_contexts=rl.get("prefill_contexts", 1),
        oversample_contexts=rl.get("oversample_contexts", 0),
        partial_rollouts=rl.get("partial_rollouts", False),
        prompt_width=max(d.prompt_buckets),
        shared_prefix=rl.shared_prefix,
        optimizer=dict(c.optim.to_dict(), total_steps=max(c.train.steps, 1)),
        log_every=c.train.log_every, checkpoint_every=c.train.checkpoint_every,
        max_consecutive_nonfinite=c.train.max_consecutive_nonfinite, seed=c.seed))
    _section("optim", lambda: optim.make_optimizer(**rpt.optimizer))
    e = c.eval
    evaluation = _section("eval", lambda: EvalConfig(
        max_positions=e.max_positions or None, num_samples=e.num_samples,
        pass_k=tuple(e.pass_k), temperature=e.temperature, max_new_tokens=rl.max_new_tokens,
        template=d.template,
        # Dense and RLP need model scores; accuracy is the prefix match they refine.
        reward=("prefix_match" if objective.objective.answer_score is not None
                else rl.reward),
        batch_size=e.batch_contexts, prompt_buckets=tuple(d.prompt_buckets), seed=c.seed))
    st = c.get("study") or {}
    study = _section("study", lambda: StudyConfig(
        eval_points=st.get("eval_points", 6),
        filters=tuple(st.get("filters", StudyConfig.filters)),
        eval_samples=st.get("eval_samples", StudyConfig.eval_samples)))
    target = c.get("compile_check")
    target = dict(target.to_dict() if isinstance(target, ml_collections.ConfigDict)
                  else (target or {}))
    # compile_check.model: a whole ModelConfig's fields instead of model.scratch (tests).
    scratch = dict(target.pop("model", None) or m.scratch.to_dict())
    model = ModelSpec(hf_path=m.hf_path, scratch=scratch, hf_config=target.get("hf_config"),
                      param_dtype=m.param_dtype, compute_dtype=m.compute_dtype, remat=m.remat,
                      attention=m.get("attention", "auto"),
                      scan_layers=bool(m.get("scan_layers", False)))
    return cls(seed=c.seed, mesh=mesh, rules=rules, model=model,
               tokenizer_path=c.tokenizer.path, train_vocab_size=c.tokenizer.train_vocab_size,
               proxy_hf_path=d.proxy_hf_path, prepare=prepare, records_dir=d.records_dir,
               loader=loader, pretrain=pretrain, rpt=rpt, eval=evaluation,
               keep_checkpoints=c.train.keep_checkpoints, target=target, study=study)
