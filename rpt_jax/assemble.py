"""Turns a run config into the concrete pieces a run needs: mesh, tokenizer, policy, data configs.

The loops (`pretrain`, `train`, `evaluate`) take these objects, never the config, so each stays
testable alone. Workdir layout (everything a run writes lives under `--workdir`; for a gs://
workdir, Orbax writes the checkpoints to the bucket directly and the rest goes through the
bucket's gcsfuse mount, see rpt_jax.run_dir):

    tokenizer/spm.model      SentencePiece model trained on the corpus (offline default only)
    pretrain/checkpoints/    policy after `pretrain` mode (Orbax)
    records/                 prepared position records (rpt_jax.data.prepare)
    checkpoints/             RPT train state (Orbax), resumed automatically
    metrics.jsonl, tb/       per-step metrics (JSON lines, TensorBoard)
    eval/                    evaluation reports and plots
    export/                  the trained policy as HF safetensors
"""

from __future__ import annotations

import itertools
import os
from typing import Any

import jax
import ml_collections
from absl import logging

from rpt_jax import mesh as mesh_lib
from rpt_jax import tokenizer as tokenizer_lib
from rpt_jax.data.prepare import PrepareConfig
from rpt_jax.data.sources import SourceConfig, iter_documents
from rpt_jax.data.synthetic import SyntheticConfig
from rpt_jax.model import hf_io
from rpt_jax.model.config import ModelConfig
from rpt_jax.model.transformer import Transformer, init_model
from rpt_jax.rl import prompts

TOKENIZER_DOCS = 2000  # documents the offline SentencePiece model is trained on
TEMPLATE_REPEATS = 200  # copies of the prompt template / answer format in its training text


def workdir_path(workdir: str, *parts: str) -> str:
  return os.path.join(workdir, *parts)


def make_run_mesh(config: ml_collections.ConfigDict) -> tuple[jax.sharding.Mesh,
                                                              mesh_lib.ShardingRules]:
  mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(**config.mesh.to_dict()))
  return mesh, mesh_lib.ShardingRules.from_config(config.get("sharding_rules"))


def source_config(config: ml_collections.ConfigDict) -> SourceConfig:
  s = config.data.source
  return SourceConfig(
      kind=s.kind, path=s.path or None, field=s.field, name=s.name or None,
      data_dir=s.data_dir or None, split=s.split, max_documents=s.get("max_documents") or None,
      synthetic=SyntheticConfig(num_documents=s.synthetic_documents, seed=config.seed))


def prepare_config(config: ml_collections.ConfigDict) -> PrepareConfig:
  d = config.data
  return PrepareConfig(
      source=source_config(config), filter=d.filter, entropy_threshold=d.entropy_threshold,
      bucket_thresholds=tuple(d.difficulty_thresholds), min_context_tokens=d.min_context_tokens,
      max_prompt_tokens=d.max_prompt_tokens, completion_tokens=d.completion_tokens,
      max_positions_per_document=d.max_positions_per_document or None,
      score_seq_len=d.score_seq_len, score_overlap=d.score_overlap,
      score_batch_size=d.score_batch_size, eval_fraction=d.eval_fraction, seed=config.seed,
      docs_per_shard=d.get("docs_per_shard", 256),
      tokenizer_id=config.tokenizer.path or config.model.hf_path or "trained-sentencepiece",
      proxy_id=d.proxy_hf_path or config.model.hf_path or "policy")


def records_dir(config: ml_collections.ConfigDict, workdir: str) -> str:
  return config.data.records_dir or workdir_path(workdir, "records")


def load_or_train_tokenizer(config: ml_collections.ConfigDict,
                            workdir: str) -> tokenizer_lib.Tokenizer:
  """The configured tokenizer, the HF model's own, or (offline) one trained on the corpus."""
  path = config.tokenizer.path or config.model.hf_path
  if path:
    return tokenizer_lib.load_tokenizer(path)
  spm_path = workdir_path(workdir, "tokenizer", "spm.model")
  if os.path.exists(spm_path):
    return tokenizer_lib.load_tokenizer(spm_path)
  docs = list(itertools.islice(iter_documents(source_config(config)), TOKENIZER_DOCS))
  # The prompt template and answer format are in every RPT sequence: giving them to the tokenizer
  # makes their words single pieces instead of ~2 tokens per character.
  template_text = prompts.format_prompt("", config.data.template)
  answer_text = prompts.format_response(config.pretrain.thought, "0")
  docs += [template_text, answer_text] * TEMPLATE_REPEATS
  logging.info("Training a %d-piece SentencePiece tokenizer -> %s",
               config.tokenizer.train_vocab_size, spm_path)
  return tokenizer_lib.train_sentencepiece(docs, config.tokenizer.train_vocab_size, spm_path)


def scratch_model_config(config: ml_collections.ConfigDict,
                         tokenizer: tokenizer_lib.Tokenizer) -> ModelConfig:
  """The from-scratch architecture; vocab 0 means 'the tokenizer's size'.

  A scratch Qwen2 has q/k/v biases as every Qwen2 does (unless `model.scratch.attention_bias`
  says otherwise), so that `--mode=export` writes a checkpoint `transformers` can load.
  """
  fields: dict[str, Any] = config.model.scratch.to_dict()
  if not fields.get("vocab_size"):
    fields["vocab_size"] = tokenizer.vocab_size
  fields.setdefault("attention_bias", fields.get("family") == "qwen2")
  return ModelConfig(
      **fields, param_dtype=config.model.param_dtype, compute_dtype=config.model.compute_dtype,
      remat=config.model.remat, eos_token_ids=tuple(tokenizer.stop_ids),
      pad_token_id=tokenizer.pad_id, bos_token_id=tokenizer.bos_id)


def policy_config(config: ml_collections.ConfigDict,
                  tokenizer: tokenizer_lib.Tokenizer) -> ModelConfig:
  """The policy's architecture without building it: `model.hf_path`'s config.json, or scratch."""
  if config.model.hf_path:
    return ModelConfig.from_hf(config.model.hf_path)
  return scratch_model_config(config, tokenizer)


def build_policy(config: ml_collections.ConfigDict, tokenizer: tokenizer_lib.Tokenizer,
                 mesh: jax.sharding.Mesh | None,
                 rules: mesh_lib.ShardingRules | None) -> tuple[Transformer, ModelConfig]:
  """The policy: loaded from `model.hf_path`, else freshly initialised from `model.scratch`."""
  if config.model.hf_path:
    model, model_config = hf_io.load_hf(
        config.model.hf_path, mesh=mesh, rules=rules, dtype=config.model.param_dtype,
        compute_dtype=config.model.compute_dtype, remat=config.model.remat)
  else:
    model_config = scratch_model_config(config, tokenizer)
    model = init_model(model_config, seed=config.seed, mesh=mesh, rules=rules)
  tokenizer_lib.check_vocab_fits(tokenizer, model_config.vocab_size)
  return model, model_config


def load_proxy(config: ml_collections.ConfigDict, policy: Transformer,
               mesh: jax.sharding.Mesh | None,
               rules: mesh_lib.ShardingRules | None) -> Transformer:
  """The position-scoring proxy: `data.proxy_hf_path`, else the policy itself."""
  if config.data.proxy_hf_path:
    proxy, _ = hf_io.load_hf(config.data.proxy_hf_path, mesh=mesh, rules=rules,
                             dtype=config.model.param_dtype,
                             compute_dtype=config.model.compute_dtype)
    return proxy
  return policy
