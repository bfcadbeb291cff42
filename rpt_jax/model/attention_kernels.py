"""The fused attention kernels behind `rpt_jax.model.attention`: splash (TPU, Pallas) and cuDNN
flash attention (GPU), each fed an `attention.Mask` of positions turned into what the kernel
takes (a static causal mask with segment ids, or per-row lengths).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from rpt_jax import mesh as mesh_lib

if TYPE_CHECKING:  # attention imports this module
  from rpt_jax.model.attention import Mask

Array = jax.Array


def _pad_axis(x: Array, axis: int, size: int, value=0) -> Array:
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, widths, constant_values=value)


def _tile(n: int) -> int:
  """The largest of 512/256/128 dividing n (n a multiple of 128)."""
  return next(t for t in (512, 256, 128) if n % t == 0)


def _rolled_cache(k_BKSH: Array, v_BKSH: Array, mask: Mask) -> tuple[Array, Array, Array]:
  """Cache rows rolled right by S - L - first_position, so that query l of every row reads the
  rolled keys <= S - L + l (one static causal mask, offset S - L) and the slots past the row's
  queries, wrapped to the front, are marked invalid. Returns (k, v, kv_valid_BS)."""
  l, s = mask.q_positions_BL.shape[1], k_BKSH.shape[2]
  shift_B = s - l - mask.q_positions_BL[:, 0]
  source_BS = (jnp.arange(s)[None, :] - shift_B[:, None]) % s
  roll = lambda x: jnp.take_along_axis(x, source_BS[:, None, :, None], axis=2)  # noqa: E731
  return roll(k_BKSH), roll(v_BKSH), jnp.arange(s)[None, :] >= shift_B[:, None]


def splash(q_BLNH: Array, k_BKSH: Array, v_BKSH: Array, mask: Mask, *,
           mesh: jax.sharding.Mesh | None = None, rules: mesh_lib.ShardingRules | None = None,
           interpret: bool = False) -> Array:
  """Splash attention (TPU Pallas): a causal mask on indices plus segment ids for padding.

  Self-attention: segment id = kv_valid (padding reads only padding). Cache: the rows are
  rolled (`_rolled_cache`) so one static causal mask with offset S - L serves every row's
  query positions. Lengths are padded to multiples of 128 (the kernel's tile). With a mesh the
  kernel runs per shard of (batch, heads) under shard_map: a Pallas call is not partitioned
  by XLA.
  """
  from jax.experimental.pallas.ops.tpu import splash_attention as sa
  b, l, n, h = q_BLNH.shape
  kvh, s = k_BKSH.shape[1], k_BKSH.shape[2]
  if mask.in_cache:
    k_BKSH, v_BKSH, kv_segment_BS = _rolled_cache(k_BKSH, v_BKSH, mask)
    q_segment_BL, offset = jnp.ones((b, l), bool), s - l
  else:
    q_segment_BL = kv_segment_BS = mask.kv_valid_BS
    offset = 0
  lp, sp = -(-l // 128) * 128, -(-s // 128) * 128
  # Padded queries read the padded keys (segment 2) at and before their index: never empty.
  q_seg = _pad_axis(q_segment_BL.astype(jnp.int32), 1, lp, 2)
  kv_seg = _pad_axis(kv_segment_BS.astype(jnp.int32), 1, sp, 2)
  q_BKGLH = _pad_axis(q_BLNH, 1, lp).reshape(b, lp, kvh, n // kvh, h).transpose(0, 2, 3, 1, 4)
  k_BKSH, v_BKSH = _pad_axis(k_BKSH, 2, sp), _pad_axis(v_BKSH, 2, sp)
  bq, bkv = _tile(lp), _tile(sp)
  blocks = sa.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq,
                         block_kv_dkv=bkv, block_kv_dkv_compute=bkv, block_q_dq=bq,
                         block_kv_dq=bkv)
  g = n // kvh
  kernel = sa.make_splash_mqa_single_device(
      sa.MultiHeadMask([sa.CausalMask((lp, sp), offset=offset)] * g), block_sizes=blocks,
      interpret=interpret)

  def run(q, k, v, q_seg, kv_seg):  # [b, K, G, Lp, H], [b, K, Sp, H] x2, [b, Lp], [b, Sp]
    scaled = q * jnp.asarray(h ** -0.5, q.dtype)  # the kernel does not scale
    one_head = lambda qh, kh, vh, seg: kernel(qh, kh, vh, seg)  # noqa: E731
    per_row = lambda qb, kb, vb, qs, ks: jax.vmap(  # noqa: E731
        one_head, in_axes=(0, 0, 0, None))(qb, kb, vb, sa.SegmentIds(q=qs, kv=ks))
    return jax.vmap(per_row)(scaled, k, v, q_seg, kv_seg)

  if mesh is not None:
    rules = rules or mesh_lib.ShardingRules()
    spec = lambda axes, shape: rules.spec(axes, shape, mesh)  # noqa: E731
    q_spec = spec(("batch", "kv_heads", None, "length", "head_dim"), q_BKGLH.shape)
    kv_spec = spec(("batch", "kv_heads", "cache_length", "head_dim"), k_BKSH.shape)
    seg_spec = P(q_spec[0], None)
    run = jax.shard_map(run, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, seg_spec, seg_spec),
                        out_specs=q_spec, check_vma=False)
  out = run(q_BKGLH, k_BKSH, v_BKSH, q_seg, kv_seg)
  return out[:, :, :, :l].transpose(0, 3, 1, 2, 4).reshape(b, l, n, h).astype(v_BKSH.dtype)


def cudnn(q_BLNH: Array, k_BKSH: Array, v_BKSH: Array, mask: Mask,
          backend: str = "cudnn") -> Array:
  """cuDNN flash attention through `jax.nn.dot_product_attention` (bf16/fp16 on a GPU; XLA
  partitions it over batch and heads). `backend='xla'` runs the same arrangement on any
  platform (tests).

  Self-attention: each row's real tokens are moved to the front (a stable sort keeps their
  order), so a top-left causal mask with per-row lengths is the whole mask. Cache: each query
  is placed at its own slot of an [S]-long query block (causal over the cache, lengths = live
  lengths) and read back; rows whose queries are few pay for S queries.
  """
  b, l, n, h = q_BLNH.shape
  if backend == "cudnn" and q_BLNH.dtype not in (jnp.bfloat16, jnp.float16):
    raise ValueError(f"model.attention='cudnn' needs model.compute_dtype='bfloat16' (got "
                     f"{q_BLNH.dtype}); use 'chunked' or 'auto' for float32.")
  k_BSKH, v_BSKH = jnp.swapaxes(k_BKSH, 1, 2), jnp.swapaxes(v_BKSH, 1, 2)
  rows_B1 = jnp.arange(b)[:, None]
  if mask.in_cache:
    s = k_BKSH.shape[2]
    live_B = mask.live_lengths()
    slot_BL = jnp.minimum(mask.q_positions_BL, s - 1)
    q_BSNH = jnp.zeros((b, s, n, h), q_BLNH.dtype).at[rows_B1, slot_BL].set(q_BLNH)
    out = jax.nn.dot_product_attention(q_BSNH, k_BSKH, v_BSKH, is_causal=True,
                                       query_seq_lengths=live_B, key_value_seq_lengths=live_B,
                                       implementation=backend)
    return out[rows_B1, slot_BL]
  order_BL = jnp.argsort(~mask.kv_valid_BS, axis=1, stable=True)
  count_B = jnp.sum(mask.kv_valid_BS, axis=1).astype(jnp.int32)
  gather = lambda x: x[rows_B1, order_BL]  # noqa: E731
  out = jax.nn.dot_product_attention(gather(q_BLNH), gather(k_BSKH), gather(v_BSKH),
                                     is_causal=True, query_seq_lengths=count_B,
                                     key_value_seq_lengths=count_B, implementation=backend)
  return jnp.zeros_like(out).at[rows_B1, order_BL].set(out)
