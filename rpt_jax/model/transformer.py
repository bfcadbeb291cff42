"""The policy network: a Flax NNX decoder-only transformer (Qwen2/2.5, R1-Distill-Qwen, Llama 2/3,
Qwen3, Mistral) with a static-shape KV cache.

Owns the numerics of one forward pass: RMSNorm, rotary embeddings (HF's half-split convention,
llama3 scaling), grouped-query attention projections (the attention itself is
`rpt_jax.model.attention`, chosen by `ModelConfig.attention`) with causal + padding masks or a KV
cache, SwiGLU MLP, tied/untied unembedding. Every parameter carries `logical_axes` metadata for `rpt_jax.mesh`.

Cache semantics: each token is written to cache slot == its position (a per-row scatter, so rows
of different lengths never share a write index); a query at position p attends to slots <= p.
Callers keep each row's tokens contiguous from position 0 (prompts right-padded), so slots < p
hold that row's real tokens. Masked (padding) tokens are not written. The cache path is
differentiable, so a context prefilled once can receive gradients from G completions.
"""

from __future__ import annotations

from typing import Any, ClassVar

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rpt_jax import mesh as mesh_lib
from rpt_jax.model import attention as attention_lib
from rpt_jax.model.config import ModelConfig

Array = jax.Array
_REMAT_POLICIES = {"full": None, "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
  """Inverse rotary frequencies [head_dim // 2] (float32), with HF's `linear`/`llama3` scaling."""
  dim = config.head_dim
  inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
  scaling = config.rope_scaling or {}
  if scaling.get("rope_type") == "linear":
    inv_freq = inv_freq / scaling["factor"]
  elif scaling.get("rope_type") == "llama3":
    factor, old_len = scaling["factor"], scaling["original_max_position_embeddings"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    wavelen = 2 * np.pi / inv_freq
    # Long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
    scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    inv_freq = np.where(medium, smoothed, scaled)
  return inv_freq.astype(np.float32)


def rope_tables(positions_BL: Array, inv_freq: np.ndarray) -> tuple[Array, Array]:
  """(sin_BLH, cos_BLH) in float32, frequencies repeated over both halves as HF does."""
  freqs = positions_BL[..., None].astype(jnp.float32) * jnp.asarray(inv_freq)
  freqs = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.sin(freqs), jnp.cos(freqs)


def apply_rope(x_BLNH: Array, sin_BLH: Array, cos_BLH: Array) -> Array:
  """Rotates pairs (i, i + H/2) (HF `rotate_half`) in float32; returns x's dtype."""
  x = x_BLNH.astype(jnp.float32)
  x1, x2 = jnp.split(x, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  out = x * cos_BLH[:, :, None, :] + rotated * sin_BLH[:, :, None, :]
  return out.astype(x_BLNH.dtype)


@flax.struct.dataclass
class KVCache:
  """Per-layer keys and values, each [B, KVH, S, Dh]; slot s holds the token at position s.

  Heads before slots: attention's two products are batched over (B, KVH) and contract or keep
  S and Dh, so they read this layout in place (a [B, S, KVH, Dh] cache was copied into this
  order on every decode step by XLA:CPU). Find axes by name (`LOGICAL_AXES.index`), not position.
  """

  k: tuple[Array, ...]
  v: tuple[Array, ...]
  LOGICAL_AXES: ClassVar[tuple[str, ...]] = ("batch", "kv_heads", "cache_length", "head_dim")

  @staticmethod
  def shape(config: ModelConfig, batch: int, length: int) -> tuple[int, ...]:
    """The shape of one layer's keys (or values), in LOGICAL_AXES order."""
    sizes = {"batch": batch, "kv_heads": config.num_kv_heads, "cache_length": length,
             "head_dim": config.head_dim}
    return tuple(sizes[axis] for axis in KVCache.LOGICAL_AXES)

  @staticmethod
  def init(config: ModelConfig, batch: int, length: int, dtype: Any = None) -> "KVCache":
    """A zero cache for `batch` rows of `length` slots (dtype: default the compute dtype)."""
    shape = KVCache.shape(config, batch, length)
    dtype = dtype or config.compute_dtype
    zeros = tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers))
    return KVCache(k=zeros, v=tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers)))

  @property
  def length(self) -> int:
    return self.k[0].shape[self.LOGICAL_AXES.index("cache_length")]

  def repeat(self, n: int) -> "KVCache":
    """Each row repeated n times consecutively (row b -> rows b*n .. b*n+n-1), for G rollouts
    sharing one prefilled context."""
    return jax.tree.map(lambda x: jnp.repeat(x, n, axis=0), self)

  def shardings(self, mesh: jax.sharding.Mesh, rules: mesh_lib.ShardingRules | None = None):
    """A KVCache of NamedShardings (for jit in/out_shardings) from LOGICAL_AXES."""
    rules = rules or mesh_lib.ShardingRules()
    return jax.tree.map(lambda x: rules.sharding(mesh, self.LOGICAL_AXES, x.shape), self)


def _param(rngs: nnx.Rngs | None, shape, axes, dtype, init: str = "normal") -> nnx.Param:
  if init == "normal":
    value = 0.02 * jax.random.normal(rngs.params(), shape, jnp.float32)
  else:
    value = jnp.ones(shape) if init == "ones" else jnp.zeros(shape)
  return nnx.Param(value.astype(dtype), logical_axes=axes)


class RMSNorm(nnx.Module):
  """x / rms(x) in float32, cast back to x's dtype, times a learned scale (HF order)."""

  def __init__(self, dim: int, eps: float, dtype: str):
    self.scale = _param(None, (dim,), ("norm",), dtype, init="ones")
    self.eps = eps

  def __call__(self, x: Array) -> Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return y.astype(x.dtype) * self.scale.value.astype(x.dtype)


class Attention(nnx.Module):
  """Grouped-query self-attention; query head n reads KV head n // (N / KVH)."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, mesh=None, rules=None):
    d, n, k, h, dt = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.param_dtype
    self.q = _param(rngs, (d, n, h), ("embed", "heads", "head_dim"), dt)
    self.k = _param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), dt)
    self.v = _param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), dt)
    self.o = _param(rngs, (n, h, d), ("heads", "head_dim", "embed"), dt)
    if cfg.attention_bias:
      self.q_bias = _param(None, (n, h), ("heads", "head_dim"), dt, init="zeros")
      self.k_bias = _param(None, (k, h), ("kv_heads", "head_dim"), dt, init="zeros")
      self.v_bias = _param(None, (k, h), ("kv_heads", "head_dim"), dt, init="zeros")
    if cfg.o_bias:
      self.o_bias = _param(None, (d,), ("embed",), dt, init="zeros")
    if cfg.qk_norm:
      self.q_norm = RMSNorm(h, cfg.rms_norm_eps, dt)
      self.k_norm = RMSNorm(h, cfg.rms_norm_eps, dt)
    self.cfg, self.mesh, self.rules = cfg, mesh, rules

  def _shard(self, x: Array, axes) -> Array:
    return mesh_lib.shard_activation(x, axes, self.mesh, self.rules)

  def __call__(self, x_BLD: Array, sin_BLH: Array, cos_BLH: Array, positions_BL: Array,
               mask_BL: Array, kv: tuple[Array, Array] | None):
    """Returns (output_BLD, updated (k_BKSH, v_BKSH) or None)."""
    cfg, cd = self.cfg, x_BLD.dtype
    q = jnp.einsum("BLD,DNH->BLNH", x_BLD, self.q.value.astype(cd))
    k = jnp.einsum("BLD,DKH->BLKH", x_BLD, self.k.value.astype(cd))
    v = jnp.einsum("BLD,DKH->BLKH", x_BLD, self.v.value.astype(cd))
    if cfg.attention_bias:
      q, k, v = (q + self.q_bias.value.astype(cd), k + self.k_bias.value.astype(cd),
                 v + self.v_bias.value.astype(cd))
    if cfg.qk_norm:
      q, k = self.q_norm(q), self.k_norm(k)
    q = self._shard(apply_rope(q, sin_BLH, cos_BLH), ("batch", "length", "heads", "head_dim"))
    k = self._shard(apply_rope(k, sin_BLH, cos_BLH), ("batch", "length", "kv_heads", "head_dim"))
    v = self._shard(v, ("batch", "length", "kv_heads", "head_dim"))
    if kv is None:
      new_kv = None
      keys, values = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)  # [B, KVH, S=L, Dh]
      mask = attention_lib.Mask.causal(positions_BL, mask_BL)
    else:
      cache_k, cache_v = kv
      slots = cache_k.shape[2]
      slot_BL = jnp.where(mask_BL, positions_BL, slots)  # padding goes out of bounds: dropped
      rows_B1 = jnp.arange(x_BLD.shape[0])[:, None]
      # Advanced indices around a slice: the update is indexed [B, L, KVH, Dh], i.e. k as is.
      cache_k = cache_k.at[rows_B1, :, slot_BL].set(k.astype(cache_k.dtype), mode="drop")
      cache_v = cache_v.at[rows_B1, :, slot_BL].set(v.astype(cache_v.dtype), mode="drop")
      axes = KVCache.LOGICAL_AXES
      new_kv = (self._shard(cache_k, axes), self._shard(cache_v, axes))
      keys, values = new_kv[0].astype(cd), new_kv[1].astype(cd)
      mask = attention_lib.Mask.cache(positions_BL, slots)
    out = attention_lib.attend(q, keys, values, mask, cfg.attention, mesh=self.mesh,
                               rules=self.rules)
    out = jnp.einsum("BLNH,NHD->BLD", out, self.o.value.astype(cd))
    if cfg.o_bias:
      out = out + self.o_bias.value.astype(cd)
    return out, new_kv


class MLP(nnx.Module):
  """SwiGLU: down(silu(x gate) * (x up))."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, mesh=None, rules=None):
    d, f, dt = cfg.hidden_size, cfg.intermediate_size, cfg.param_dtype
    self.gate = _param(rngs, (d, f), ("embed", "mlp"), dt)
    self.up = _param(rngs, (d, f), ("embed", "mlp"), dt)
    self.down = _param(rngs, (f, d), ("mlp", "embed"), dt)
    self.mesh, self.rules = mesh, rules

  def __call__(self, x_BLD: Array) -> Array:
    cd = x_BLD.dtype
    gate = jnp.einsum("BLD,DF->BLF", x_BLD, self.gate.value.astype(cd))
    up = jnp.einsum("BLD,DF->BLF", x_BLD, self.up.value.astype(cd))
    hidden = mesh_lib.shard_activation(jax.nn.silu(gate) * up, ("batch", "length", "mlp"),
                                       self.mesh, self.rules)
    return jnp.einsum("BLF,FD->BLD", hidden, self.down.value.astype(cd))


class Block(nnx.Module):
  """Pre-norm decoder layer: x + attn(norm(x)), then + mlp(norm(x))."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, mesh=None, rules=None):
    self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.param_dtype)
    self.attn = Attention(cfg, rngs, mesh, rules)
    self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.param_dtype)
    self.mlp = MLP(cfg, rngs, mesh, rules)
    self.mesh, self.rules = mesh, rules

  def __call__(self, x_BLD, sin_BLH, cos_BLH, positions_BL, mask_BL, kv):
    h, kv = self.attn(self.input_norm(x_BLD), sin_BLH, cos_BLH, positions_BL, mask_BL, kv)
    x_BLD = x_BLD + h
    x_BLD = x_BLD + self.mlp(self.post_attn_norm(x_BLD))
    return mesh_lib.shard_activation(x_BLD, ("batch", "length", None), self.mesh, self.rules), kv


def _run_block(block: Block, *args):
  return block(*args)


class Transformer(nnx.Module):
  """Decoder-only LM. `mesh`/`rules` (optional) add activation sharding constraints under jit."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs,
               mesh: jax.sharding.Mesh | None = None,
               rules: mesh_lib.ShardingRules | None = None):
    self.config, self.mesh, self.rules = config, mesh, rules
    v, d, dt = config.vocab_size, config.hidden_size, config.param_dtype
    self.embed = _param(rngs, (v, d), ("vocab", "embed"), dt)
    self.layers = nnx.List([Block(config, rngs, mesh, rules) for _ in range(config.num_layers)])
    self.final_norm = RMSNorm(d, config.rms_norm_eps, dt)
    if not config.tie_word_embeddings:
      self.lm_head = _param(rngs, (d, v), ("embed", "vocab"), dt)

  def __call__(self, tokens_BL: Array, positions_BL: Array | None = None,
               attention_mask_BL: Array | None = None) -> Array:
    """Logits [B, L, V] in float32 (causal + key-padding attention, no cache)."""
    hidden_BLD, _ = self.hidden_states(tokens_BL, positions_BL, attention_mask_BL)
    return self.logits(hidden_BLD)

  def hidden_states(self, tokens_BL: Array, positions_BL: Array | None = None,
                    attention_mask_BL: Array | None = None, cache: KVCache | None = None
                    ) -> tuple[Array, KVCache | None]:
    """(hidden_BLD after the final norm in the compute dtype, updated cache or None).

    tokens_BL: int ids. positions_BL: int positions (default arange(L) per row).
    attention_mask_BL: 1 for real tokens, 0 for padding (default all ones). With `cache`, the
    tokens are written at their positions and attend to cache slots <= their position.

    `config.scan_layers`: where more than one token per row passes (training, prefill), the
    layers run as one `lax.scan` over their stacked weights (and stacked cache layers): one
    compiled layer body, whose per-layer temporaries a scheduler cannot keep alive across
    layers. Decode steps (one token) keep the unrolled loop: stacking the cache every step
    would copy it.
    """
    cfg = self.config
    b, l = tokens_BL.shape
    cfg.check_context_length(l if cache is None else cache.length)
    if positions_BL is None:
      positions_BL = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l))
    mask_BL = (jnp.ones((b, l), bool) if attention_mask_BL is None
               else attention_mask_BL.astype(bool))
    cd = jnp.dtype(cfg.compute_dtype)
    x = self._embed(tokens_BL).astype(cd)
    sin, cos = rope_tables(positions_BL, rope_inv_freq(cfg))
    if cfg.scan_layers and l > 1 and len(self.layers) > 1:
      x, new_cache = self._scanned_layers(x, sin, cos, positions_BL, mask_BL, cache)
      return self.final_norm(x), new_cache
    run = _run_block
    if cfg.remat != "none":
      run = nnx.remat(_run_block, policy=_REMAT_POLICIES[cfg.remat])
    new_k, new_v = [], []
    for i, block in enumerate(self.layers):
      kv = None if cache is None else (cache.k[i], cache.v[i])
      x, kv = run(block, x, sin, cos, positions_BL, mask_BL, kv)
      if kv is not None:
        new_k.append(kv[0])
        new_v.append(kv[1])
    new_cache = None if cache is None else KVCache(k=tuple(new_k), v=tuple(new_v))
    return self.final_norm(x), new_cache

  def _scanned_layers(self, x_BLD, sin, cos, positions_BL, mask_BL, cache: KVCache | None):
    """The layer stack as `lax.scan` over per-layer weights stacked on a leading axis (and the
    cache's layers, stacked the same way); returns (x_BLD, new cache or None)."""
    graphdef, _ = nnx.split(self.layers[0])
    stack = lambda *xs: jnp.stack(xs)  # noqa: E731
    weights = jax.tree.map(stack, *[nnx.split(layer)[1] for layer in self.layers])
    kv = None if cache is None else (jnp.stack(cache.k), jnp.stack(cache.v))

    def body(x, layer):
      state, kv = layer
      return nnx.merge(graphdef, state)(x, sin, cos, positions_BL, mask_BL, kv)

    if self.config.remat != "none":  # Each layer's internals recomputed in the backward pass.
      body = jax.checkpoint(body, policy=_REMAT_POLICIES[self.config.remat], prevent_cse=False)
    x_BLD, new_kv = jax.lax.scan(body, x_BLD, (weights, kv))
    if cache is None:
      return x_BLD, None
    return x_BLD, KVCache(k=tuple(new_kv[0]), v=tuple(new_kv[1]))

  def _embed(self, tokens_BL: Array) -> Array:
    """Embedding rows [B, L, D] (param dtype), split over the mesh like activations."""
    table_VD = self.embed.value
    x_BLD = jnp.take(table_VD, tokens_BL, axis=0)
    if self.mesh is not None:
      # Rows looked up from a table split along D (embed -> fsdp) come out split along D. XLA
      # cannot move that split onto the batch in one step (it replicates the rows whole:
      # "involuntary full rematerialization"), so pin it first, with the rows over the batch
      # axes D does not use; the batch constraint below is then one all-to-all per D axis.
      rules = self.rules or mesh_lib.ShardingRules()
      d_axes = mesh_lib.as_tuple(rules.spec(("embed",), table_VD.shape[1:], self.mesh)[0])
      if d_axes:
        b_axes = tuple(a for a in mesh_lib.as_tuple(rules.spec(("batch",), x_BLD.shape[:1],
                                                         self.mesh)[0]) if a not in d_axes)
        x_BLD = jax.lax.with_sharding_constraint(x_BLD, jax.sharding.NamedSharding(
            self.mesh, jax.sharding.PartitionSpec(b_axes or None, None, d_axes)))
    return mesh_lib.shard_activation(x_BLD, ("batch", "length", None), self.mesh, self.rules)

  def unembedding(self) -> Array:
    """The output projection W_DV (tied: the embedding transposed), in the param dtype."""
    if self.config.tie_word_embeddings:
      return self.embed.value.T
    return self.lm_head.value

  def logits(self, hidden_BLD: Array) -> Array:
    """hidden_BLD @ W_DV in the compute dtype, accumulated and returned in float32."""
    cd = jnp.dtype(self.config.compute_dtype)
    logits = jnp.einsum("BLD,DV->BLV", hidden_BLD.astype(cd), self.unembedding().astype(cd),
                        preferred_element_type=jnp.float32)
    return mesh_lib.shard_activation(logits, ("batch", "length", "vocab"), self.mesh, self.rules)


def init_model(config: ModelConfig, *, seed: int = 0, mesh: jax.sharding.Mesh | None = None,
               rules: mesh_lib.ShardingRules | None = None) -> Transformer:
  """A randomly initialised Transformer; with a mesh, each parameter is created directly in its
  sharded layout (jit with out_shardings), so no device ever holds the whole model."""
  make = lambda: Transformer(config, rngs=nnx.Rngs(seed), mesh=mesh, rules=rules)
  if mesh is None:
    return make()
  graphdef, abstract_state = nnx.split(nnx.eval_shape(make))
  shardings = mesh_lib.state_shardings(abstract_state, mesh, rules)
  state = jax.jit(lambda: nnx.split(make())[1], out_shardings=shardings)()
  return nnx.merge(graphdef, state)
