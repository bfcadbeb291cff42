"""Fixtures for the data-stage tests: a SentencePiece tokenizer trained here, a tiny Transformer."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rpt_jax.data import synthetic
from rpt_jax.model.config import ModelConfig
from rpt_jax.model.transformer import Transformer
from rpt_jax.tokenizer import train_sentencepiece


def tiny_proxy(vocab_size: int, *, seed: int = 0, logit_scale: float = 25.0) -> Transformer:
  """A 2-layer Qwen2-style Transformer with a sharpened lm_head, so entropies spread widely.

  Weights are drawn with numpy into the abstract model (eager jax.random init compiles one
  program per parameter shape: ~10 s on a loaded 2-core machine). Random init gives near-uniform
  logits (entropy ~ log 16 everywhere), hence the sharpening of the lm_head.
  """
  config = ModelConfig(family="qwen2", vocab_size=vocab_size, hidden_size=32,
                       intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                       head_dim=8, max_position_embeddings=256, tie_word_embeddings=False,
                       attention_bias=True)
  graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0))))
  rng = np.random.default_rng(seed)

  def init(path, x):
    name = jax.tree_util.keystr(path)
    if "norm" in name:
      return jnp.ones(x.shape, x.dtype)
    scale = 0.02 * (logit_scale if "lm_head" in name else 1.0)
    return jnp.asarray(rng.normal(size=x.shape) * scale, x.dtype)

  return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(init, state))


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
  docs = synthetic.synthetic_documents(synthetic.SyntheticConfig(num_documents=300, seed=99))
  return train_sentencepiece(docs, 400, str(tmp_path_factory.mktemp("sp") / "tok.model"))


@pytest.fixture(scope="session")
def proxy(tokenizer):
  return tiny_proxy(tokenizer.vocab_size)


def causal_forward(model):
  """Jitted model(tokens) for one fixed shape (the reference pads: causal rows are unaffected)."""
  graphdef, state = nnx.split(model)
  return jax.jit(lambda s, t: nnx.merge(graphdef, s)(t)), state


@pytest.fixture(scope="session")
def reference_forward(proxy):
  fn, state = causal_forward(proxy)
  return lambda tokens_BL: np.asarray(fn(state, jnp.asarray(tokens_BL, jnp.int32)))
