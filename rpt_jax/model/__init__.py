"""The policy model: architecture config, the NNX transformer, and HF checkpoint I/O."""
from rpt_jax.model.config import ModelConfig
from rpt_jax.model.hf_io import load_hf, save_hf
from rpt_jax.model.transformer import KVCache, Transformer, init_model

__all__ = ["ModelConfig", "KVCache", "Transformer", "init_model", "load_hf", "save_hf"]
