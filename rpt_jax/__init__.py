"""rpt_jax: Reinforcement Pre-Training (Dong et al., 2025) in JAX/Flax."""

__version__ = "0.1.0"
