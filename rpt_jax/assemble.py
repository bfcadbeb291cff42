"""Turns a run spec into the concrete pieces a run needs: mesh, tokenizer, policy, proxy.

The loops (`pretrain`, `train`, `evaluate`) take these objects and the spec's parts, so each
stays testable alone. Workdir layout (everything a run writes lives under `--workdir`; for a gs://
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

import jax
from absl import logging

from rpt_jax import mesh as mesh_lib
from rpt_jax import tokenizer as tokenizer_lib
from rpt_jax.data.sources import iter_documents
from rpt_jax.model import hf_io
from rpt_jax.model.config import ModelConfig
from rpt_jax.model.transformer import Transformer, init_model
from rpt_jax.pretrain import PretrainConfig
from rpt_jax.rl import prompts
from rpt_jax.spec import RunSpec, VocabFacts

TOKENIZER_DOCS = 2000  # documents the offline SentencePiece model is trained on
TEMPLATE_REPEATS = 200  # copies of the prompt template / answer format in its training text


def workdir_path(workdir: str, *parts: str) -> str:
  return os.path.join(workdir, *parts)


def make_run_mesh(spec: RunSpec) -> tuple[jax.sharding.Mesh, mesh_lib.ShardingRules]:
  return mesh_lib.make_mesh(spec.mesh), spec.rules


def records_dir(spec: RunSpec, workdir: str) -> str:
  return spec.records_dir or workdir_path(workdir, "records")


def load_or_train_tokenizer(spec: RunSpec, workdir: str) -> tokenizer_lib.Tokenizer:
  """The configured tokenizer, the HF model's own, or (offline) one trained on the corpus."""
  path = spec.tokenizer_path or spec.model.hf_path
  if path:
    return tokenizer_lib.load_tokenizer(path)
  spm_path = workdir_path(workdir, "tokenizer", "spm.model")
  if os.path.exists(spm_path):
    return tokenizer_lib.load_tokenizer(spm_path)
  docs = list(itertools.islice(iter_documents(spec.source), TOKENIZER_DOCS))
  # The prompt template and answer format are in every RPT sequence: giving them to the tokenizer
  # makes their words single pieces instead of ~2 tokens per character.
  thought = (spec.pretrain or PretrainConfig).thought
  template_text = prompts.format_prompt("", spec.loader.template)
  answer_text = prompts.format_response(thought, "0")
  docs += [template_text, answer_text] * TEMPLATE_REPEATS
  logging.info("Training a %d-piece SentencePiece tokenizer -> %s", spec.train_vocab_size,
               spm_path)
  return tokenizer_lib.train_sentencepiece(docs, spec.train_vocab_size, spm_path)


def build_policy(spec: RunSpec, tokenizer: tokenizer_lib.Tokenizer,
                 mesh: jax.sharding.Mesh | None,
                 rules: mesh_lib.ShardingRules | None) -> tuple[Transformer, ModelConfig]:
  """The policy: loaded from `model.hf_path`, else freshly initialised from `model.scratch`."""
  m = spec.model
  if m.hf_path:
    fields = m.run_fields()
    model, model_config = hf_io.load_hf(m.hf_path, mesh=mesh, rules=rules,
                                        dtype=fields.pop("param_dtype"), **fields)
  else:
    model_config = m.model_config(VocabFacts.of(tokenizer))
    model = init_model(model_config, seed=spec.seed, mesh=mesh, rules=rules)
  tokenizer_lib.check_vocab_fits(tokenizer, model_config.vocab_size)
  return model, model_config


def load_proxy(spec: RunSpec, policy: Transformer, mesh: jax.sharding.Mesh | None,
               rules: mesh_lib.ShardingRules | None) -> Transformer:
  """The position-scoring proxy: `data.proxy_hf_path`, else the policy itself."""
  if spec.proxy_hf_path:
    proxy, _ = hf_io.load_hf(spec.proxy_hf_path, mesh=mesh, rules=rules,
                             dtype=spec.model.param_dtype,
                             compute_dtype=spec.model.compute_dtype,
                             attention=spec.model.attention)
    return proxy
  return policy
