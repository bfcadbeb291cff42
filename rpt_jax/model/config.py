"""The policy model's architecture: one frozen `ModelConfig` for every supported decoder family.

Owns the mapping between Hugging Face `config.json` files and our fields (`from_hf`/`to_hf_dict`),
architecture validation with clear errors, and the parameter and FLOP counts used for MFU.
Families: `qwen2` (QKV bias; Qwen2.5, DeepSeek-R1-Distill-Qwen), `llama` (Llama 2/3, incl.
`llama3` rope scaling), `qwen3` (per-head q/k RMSNorm, explicit head_dim), `mistral`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

from rpt_jax.errors import InputError, MissingInputError
from rpt_jax.model.attention import IMPLEMENTATIONS as ATTENTION_IMPLEMENTATIONS

SUPPORTED_FAMILIES = ("qwen2", "llama", "qwen3", "mistral")
_ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM",
                  "qwen3": "Qwen3ForCausalLM", "mistral": "MistralForCausalLM"}
_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16"}
REMAT_POLICIES = ("none", "full", "dots")
ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Decoder architecture plus run options (param/compute dtype, remat policy, attention
  implementation: a name in `rpt_jax.model.attention.IMPLEMENTATIONS`; scan_layers: run the
  layer stack as one `lax.scan` where many tokens pass, see `Transformer.hidden_states`).

  `rope_scaling` is None or a dict with `rope_type` in ROPE_TYPES (HF's names and fields).
  `sliding_window` is None (full attention) or the window in tokens; we do not implement windowed
  attention, so `check_context_length` refuses runs whose context exceeds it.
  """

  family: str
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_scaling: dict | None = None
  max_position_embeddings: int = 32768
  tie_word_embeddings: bool = False
  attention_bias: bool = False
  qk_norm: bool = False
  sliding_window: int | None = None
  bos_token_id: int | None = None
  eos_token_ids: tuple[int, ...] = ()
  pad_token_id: int | None = None
  param_dtype: str = "float32"
  compute_dtype: str = "float32"
  remat: str = "none"
  attention: str = "auto"
  scan_layers: bool = False

  def __post_init__(self):
    if self.family not in SUPPORTED_FAMILIES:
      raise ValueError(f"model family {self.family!r} is not supported; supported families are "
                       f"{SUPPORTED_FAMILIES}.")
    for name in ("param_dtype", "compute_dtype"):
      value = getattr(self, name)
      if value not in _DTYPES:
        raise ValueError(f"{name}={value!r} is not supported; use 'float32' or 'bfloat16'.")
      object.__setattr__(self, name, _DTYPES[value])
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"remat={self.remat!r} is not a remat policy; use one of {REMAT_POLICIES}.")
    if self.attention not in ATTENTION_IMPLEMENTATIONS:
      raise ValueError(f"model.attention={self.attention!r} is not an attention implementation; "
                       f"use one of {ATTENTION_IMPLEMENTATIONS}.")
    if self.num_kv_heads <= 0 or self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads="
                       f"{self.num_kv_heads}; grouped-query attention needs whole groups.")
    eos = self.eos_token_ids
    object.__setattr__(self, "eos_token_ids",
                       () if eos is None else (int(eos),) if isinstance(eos, int) else
                       tuple(int(e) for e in eos))
    if self.rope_scaling is not None:
      scaling = dict(self.rope_scaling)
      rope_type = scaling.get("rope_type", scaling.get("type", "default"))
      if rope_type not in ROPE_TYPES:
        raise ValueError(f"rope scaling type {rope_type!r} is not supported; supported types are "
                         f"{ROPE_TYPES}.")
      scaling.pop("type", None)
      scaling.pop("rope_theta", None)
      scaling["rope_type"] = rope_type
      object.__setattr__(self, "rope_scaling", None if rope_type == "default" else scaling)

  def __hash__(self):  # The dict field is hashed by value so the config can be static in jit.
    fields = dataclasses.astuple(dataclasses.replace(self, rope_scaling=None))
    return hash((fields, tuple(sorted((self.rope_scaling or {}).items()))))

  @property
  def o_bias(self) -> bool:
    """Whether o_proj has a bias: HF Llama/Qwen3 bias all four projections, Qwen2 only q/k/v."""
    return self.attention_bias and self.family in ("llama", "qwen3")

  # ---- Hugging Face config.json ----------------------------------------------------------------

  @classmethod
  def from_hf(cls, path_or_dict: str | os.PathLike | Mapping[str, Any],
              **overrides: Any) -> "ModelConfig":
    """Reads an HF `config.json` (a dict, the file, or the directory holding it).

    `overrides` set fields not stored by HF (param_dtype, compute_dtype, remat, attention,
    scan_layers)
    or replace any.
    Accepts both the transformers 4 (`rope_theta` + `rope_scaling`) and 5 (`rope_parameters`)
    spellings of rotary settings.
    """
    if isinstance(path_or_dict, Mapping):
      hf = dict(path_or_dict)
    else:
      path = os.fspath(path_or_dict)
      file = os.path.join(path, "config.json") if os.path.isdir(path) else path
      if not os.path.isfile(file):
        raise MissingInputError(f"no config.json at {path!r} (model.hf_path): point it at a "
                                "Hugging Face model folder (config.json + *.safetensors).")
      with open(file) as f:
        try:
          hf = json.load(f)
        except json.JSONDecodeError as e:
          raise InputError(f"model config {file!r} is not valid JSON ({e.msg}, line "
                           f"{e.lineno}): copy it again from the original checkpoint.") from e
    family = hf.get("model_type")
    if family not in SUPPORTED_FAMILIES:
      where = "" if isinstance(path_or_dict, Mapping) else f" in {file!r}"
      raise InputError(f"model_type {family!r}{where} is not supported: use a checkpoint of "
                       f"one of {SUPPORTED_FAMILIES}.")
    if hf.get("hidden_act", "silu") != "silu":
      raise ValueError(f"hidden_act={hf['hidden_act']!r} is not supported; only 'silu' (SwiGLU).")
    if hf.get("mlp_bias"):
      raise ValueError("mlp_bias=True is not supported; only bias-free MLPs.")
    rope = dict(hf.get("rope_parameters") or {})
    rope_theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
    scaling = rope or hf.get("rope_scaling")
    sliding = hf.get("sliding_window")
    if family in ("qwen2", "qwen3") and not hf.get("use_sliding_window", False):
      sliding = None  # Qwen configs carry a window that is only used when switched on.
    if family == "llama":
      sliding = None
    heads = hf["num_attention_heads"]
    kwargs = dict(
        family=family,
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=float(rope_theta),
        rope_scaling=scaling,
        max_position_embeddings=hf.get("max_position_embeddings", 32768),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=True if family == "qwen2" else bool(hf.get("attention_bias", False)),
        qk_norm=family == "qwen3",
        sliding_window=sliding,
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=hf.get("eos_token_id"),
        pad_token_id=hf.get("pad_token_id"),
    )
    kwargs.update(overrides)
    return cls(**kwargs)

  def to_hf_dict(self, dtype: str | None = None) -> dict[str, Any]:
    """An HF `config.json` dict that transformers loads as the matching *ForCausalLM."""
    if self.family == "qwen2" and not self.attention_bias:
      raise ValueError("qwen2 always has q/k/v biases; attention_bias=False cannot be exported.")
    if self.family != "qwen3" and self.qk_norm:
      raise ValueError(f"qk_norm is only part of the qwen3 family, not {self.family!r}.")
    eos = list(self.eos_token_ids)
    hf = {
        "architectures": [_ARCHITECTURES[self.family]],
        "model_type": self.family,
        "vocab_size": self.vocab_size,
        "hidden_size": self.hidden_size,
        "intermediate_size": self.intermediate_size,
        "num_hidden_layers": self.num_layers,
        "num_attention_heads": self.num_heads,
        "num_key_value_heads": self.num_kv_heads,
        "head_dim": self.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": self.rms_norm_eps,
        "rope_theta": self.rope_theta,
        "rope_scaling": dict(self.rope_scaling) if self.rope_scaling else None,
        "max_position_embeddings": self.max_position_embeddings,
        "tie_word_embeddings": self.tie_word_embeddings,
        "bos_token_id": self.bos_token_id,
        "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
        "pad_token_id": self.pad_token_id,
        "torch_dtype": dtype or self.param_dtype,
        "use_cache": True,
    }
    if self.family in ("llama", "qwen3"):
      hf["attention_bias"] = self.attention_bias
    if self.family == "llama":
      hf["mlp_bias"] = False
    if self.family == "mistral":
      hf["sliding_window"] = self.sliding_window
    if self.family in ("qwen2", "qwen3"):
      hf["use_sliding_window"] = self.sliding_window is not None
      hf["sliding_window"] = self.sliding_window
      hf["max_window_layers"] = 0 if self.sliding_window is not None else self.num_layers
    return hf

  # ---- checks and counts -----------------------------------------------------------------------

  def check_context_length(self, length: int) -> None:
    """Raises if a run's context (prompt + response tokens) exceeds what we compute exactly."""
    if length > self.max_position_embeddings:
      raise ValueError(
          f"context length {length} exceeds max_position_embeddings="
          f"{self.max_position_embeddings} of this {self.family} model; shorten the prompt or "
          "response length so their sum is at most that.")
    if self.sliding_window is not None and length > self.sliding_window:
      raise ValueError(
          f"context length {length} exceeds the model's sliding_window={self.sliding_window}; "
          "windowed attention is not implemented, so keep prompt + response length <= "
          f"{self.sliding_window}.")

  def num_params(self) -> int:
    """Total parameter count (the tied embedding counted once)."""
    d, f, h = self.hidden_size, self.intermediate_size, self.head_dim
    n, k = self.num_heads, self.num_kv_heads
    attn = d * n * h + 2 * d * k * h + n * h * d
    attn += (n + 2 * k) * h if self.attention_bias else 0
    attn += d if self.o_bias else 0
    attn += 2 * h if self.qk_norm else 0
    layer = attn + 3 * d * f + 2 * d
    embed = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
    return embed + self.num_layers * layer + d

  def flops_per_token(self, seq_len: int) -> float:
    """Forward FLOPs per token: 2 per matmul weight (incl. lm_head, not the embedding lookup)
    plus attention scores and weighted values, 4 * layers * heads * head_dim * seq_len (the
    PaLM convention: the full seq_len, matching what a masked dense attention computes)."""
    d, f, h = self.hidden_size, self.intermediate_size, self.head_dim
    n, k = self.num_heads, self.num_kv_heads
    matmul = self.num_layers * (2 * d * n * h + 2 * d * k * h + 3 * d * f) + d * self.vocab_size
    return 2.0 * matmul + 4.0 * self.num_layers * n * h * seq_len
