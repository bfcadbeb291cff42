# Over ~400 lines: every implementation shares one Mask; the kernels live in attention_kernels.py.
"""Attention by name: softmax(q k^T / sqrt(Dh)) v for grouped-query heads, one function per way.

`attend(q, k, v, mask, implementation)` with `implementation` (the run config's
`model.attention`) one of:
  xla      dense scores [B, N, L, S] in float32, as XLA fuses them (XLA:CPU gets row chunks and a
           multiply-reduce decode step); memory quadratic in the length.
  chunked  pure JAX, an online softmax over key blocks with a hand-written backward pass
           (FlashAttention-2's recurrences): memory linear in the length on every platform, and
           key blocks past each row's live length are never read.
  splash   the TPU Pallas kernel (`jax.experimental.pallas.ops.tpu.splash_attention`), padding
           as segment ids; runs in interpret mode on CPU (tests). In `attention_kernels`.
  cudnn    cuDNN flash attention (`jax.nn.dot_product_attention(implementation='cudnn')`), bf16.
           In `attention_kernels`.
  auto     per platform: tpu -> splash, gpu -> cudnn (bf16/fp16, head_dim % 8 == 0) else chunked,
           cpu -> xla (2.2x faster than chunked for a train step at the CPU config's shapes,
           64 rows x 192 tokens; chunked is the one whose memory stays linear).
Decode steps (one query per row against a KV cache) take the `chunked` path under every name but
`xla`: its loop bound is the live length, so a step costs what the rows have generated so far,
not the cache's capacity (on CPU, 10% of a 4k cache: 8x faster than xla; the full cache: equal).
On CPU, in float32 on one device, a C++ kernel (`cpu_decode_kernel`) runs it instead, reading
each row's live keys once; without it, a cache of at most two key blocks is read in one dense
pass (faster there than the loop).

Which keys a query reads is a `Mask` of positions, never a dense [L, S] array (that alone would
be quadratic): key s is readable by query l iff kv_valid[b, s] and kv_positions[b, s] <=
q_positions[b, l]. Rows with no readable key (padding queries) get finite, unspecified outputs.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import Iterator

import flax.struct
import jax
import jax.numpy as jnp

from rpt_jax import mesh as mesh_lib
from rpt_jax.model import attention_kernels, cpu_decode_kernel

Array = jax.Array
IMPLEMENTATIONS = ("auto", "xla", "chunked", "splash", "cudnn")
# Finite "minus infinity": a row with every key masked (a padding query) gets a uniform softmax
# instead of NaN, which would otherwise leak into gradients.
_MASKED = -1e30
# Keys per block of the online softmax; scores live as [B, KVH, G, L, block] fp32 per step.
KEY_BLOCK = 512
# A ragged decode step gathers its (row, block) pairs' keys first: 1.5x the time of a batch
# step on XLA:CPU (16 rows, 4k cache), so it runs only where it saves more steps than that.
_RAGGED_STEP_COST = 1.5
# The platform the attention code is traced for; None: this process's default backend.
_TRACE_PLATFORM: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "rpt_jax_trace_platform", default=None)


@contextlib.contextmanager
def tracing_for_platform(platform: str) -> Iterator[None]:
  """Traces model code for `platform` ('cpu', 'tpu', 'gpu') instead of the default backend.

  `auto` (and XLA:CPU's row chunks) pick by platform; a program compiled ahead of time for a
  TPU from a CPU host (`rpt_jax.compile_check`) must be traced as the TPU will run it, or its
  memory figures are those of the CPU formulation. JAX caches traces by function and argument
  shapes, not by this setting: trace functions made inside the block. Matmuls are traced at the
  default precision, as a run on `platform` has them (the tests' process-wide 'highest' asks
  Mosaic for fp32 contraction of bf16 operands, which it refuses to compile).
  """
  token = _TRACE_PLATFORM.set(platform)
  try:
    with jax.default_matmul_precision("default"):
      yield
  finally:
    _TRACE_PLATFORM.reset(token)


def trace_platform() -> str:
  """The platform model code is being traced for (see `tracing_for_platform`)."""
  return _TRACE_PLATFORM.get() or jax.default_backend()


@flax.struct.dataclass
class Mask:
  """Which keys each query reads, from positions: [B, L] queries, [B, S] keys.

  Contract of both layouts: the real tokens of a row have increasing positions along the row
  (the splash and cudnn kernels mask by index order, which then equals position order).
  """

  q_positions_BL: Array
  kv_positions_BS: Array
  kv_valid_BS: Array
  # Keys are KV-cache slots (kv_positions == slot index, all valid); static under jit.
  in_cache: bool = flax.struct.field(pytree_node=False, default=False)

  @classmethod
  def causal(cls, positions_BL: Array, valid_BL: Array) -> "Mask":
    """Self-attention over the same L tokens: causal on positions, never onto padding keys."""
    return cls(positions_BL, positions_BL, valid_BL.astype(bool))

  @classmethod
  def cache(cls, positions_BL: Array, slots: int) -> "Mask":
    """Queries reading a KV cache whose slot s holds position s: every slot <= the position.
    For splash, a row's queries must sit at consecutive positions (a decode step, a prefill,
    or G completions after a shared context), for cudnn at distinct ones."""
    b = positions_BL.shape[0]
    slots_BS = jnp.broadcast_to(jnp.arange(slots, dtype=jnp.int32), (b, slots))
    return cls(positions_BL, slots_BS, jnp.ones((b, slots), bool), in_cache=True)

  def dense(self) -> Array:
    """allowed_BLS: bool [B, L, S] (quadratic: the xla path and tests only)."""
    return (self.kv_valid_BS[:, None, :]
            & (self.kv_positions_BS[:, None, :] <= self.q_positions_BL[:, :, None]))

  def live_lengths(self) -> Array:
    """live_B: int32 [B], 1 + the last key index any query of the row may read (0: none).

    Keys from live_B on are never read, so a loop over key blocks stops there. In a KV cache
    this is the row's last query position + 1: what it has prefilled and generated so far.
    """
    last_q_B = jnp.max(self.q_positions_BL, axis=1)
    readable_BS = self.kv_valid_BS & (self.kv_positions_BS <= last_q_B[:, None])
    index_BS = jnp.arange(1, readable_BS.shape[1] + 1, dtype=jnp.int32)
    return jnp.max(jnp.where(readable_BS, index_BS, 0), axis=1)


def resolve(implementation: str, *, platform: str | None = None, dtype=None,
            head_dim: int | None = None, decode: bool = False) -> str:
  """The concrete implementation `implementation` stands for on `platform` (default: the one
  being traced for); `decode`: one query per row against a KV cache."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"model.attention={implementation!r} is not an attention implementation; "
                     f"use one of {IMPLEMENTATIONS}.")
  if implementation == "xla":
    return "xla"
  if decode:  # the kernels are for prefill and training; a decode step reads live blocks only
    return "chunked"
  if implementation != "auto":
    return implementation
  platform = platform or trace_platform()
  if platform == "tpu":
    return "splash"
  if platform == "gpu":
    half = dtype is not None and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
    return "cudnn" if half and head_dim is not None and head_dim % 8 == 0 else "chunked"
  return "xla"


def attend(q_BLNH: Array, k_BKSH: Array, v_BKSH: Array, mask: Mask, implementation: str = "auto",
           *, mesh: jax.sharding.Mesh | None = None,
           rules: mesh_lib.ShardingRules | None = None) -> Array:
  """out_BLNH: attention of L queries over S keys; scores and softmax in float32.

  Query head n reads KV head n // G (G = N / KVH query heads per KV head). Returns q's shape in
  v's dtype. `mesh`/`rules` (the model's) let the Pallas kernel run per shard (shard_map).
  """
  decode = mask.in_cache and q_BLNH.shape[1] == 1
  name = resolve(implementation, dtype=q_BLNH.dtype, head_dim=q_BLNH.shape[-1], decode=decode)
  if name == "xla":
    return dense(q_BLNH, k_BKSH, v_BKSH, mask.dense()[:, None, None])
  if name == "chunked":
    if decode and cpu_decode_kernel.applies(q_BLNH, k_BKSH, v_BKSH, mesh, trace_platform()):
      return cpu_decode_kernel.decode_step(chunked, q_BLNH, k_BKSH, v_BKSH, mask)
    return chunked(q_BLNH, k_BKSH, v_BKSH, mask)
  if name == "splash":
    return attention_kernels.splash(q_BLNH, k_BKSH, v_BKSH, mask, mesh=mesh, rules=rules,
                                    interpret=trace_platform() != "tpu")
  return attention_kernels.cudnn(q_BLNH, k_BKSH, v_BKSH, mask)


# ----------------------------------------------------------------------------------------------
# chunked: online softmax over key blocks.
# ----------------------------------------------------------------------------------------------


def chunked(q_BLNH: Array, k_BKSH: Array, v_BKSH: Array, mask: Mask,
            block: int | None = None) -> Array:
  """Online-softmax attention over key blocks of `block` (default KEY_BLOCK) keys; no block
  past a row's live length (`Mask.live_lengths`, traced values) is ever read.

  Many queries per row (training, prefill): one loop over key blocks for the whole batch, up to
  the longest row's live length. One query per row (a decode step) whose rows' live lengths
  differ enough (`_RAGGED_STEP_COST`): a ragged schedule over the (row, live block) pairs, B
  pairs per step, so the step costs the rows' summed live lengths, not B x the longest; a TPU
  ragged paged-attention kernel (`pallas.ops.tpu.ragged_paged_attention`) is the fused form of
  that schedule. Gradients of both: FlashAttention-2's backward over the longest row's blocks.
  """
  b, l, n, h = q_BLNH.shape
  kvh, s = k_BKSH.shape[1], k_BKSH.shape[2]
  if l == 1 and s <= 2 * KEY_BLOCK and trace_platform() == "cpu":
    # XLA:CPU, a cache of at most two blocks: one dense multiply-and-reduce pass beats a loop
    # over key blocks (30 vs 80 ms, 128 rows, 640 keys) and the ragged schedule (43-47 ms).
    # The rollout engine bounds the keys there, decoding each chunk on the cache prefix its
    # live rows need.
    return dense(q_BLNH, k_BKSH, v_BKSH, mask.dense()[:, None, None])
  block = min(block or KEY_BLOCK, s)
  q_BKGLH = q_BLNH.reshape(b, l, kvh, n // kvh, h).transpose(0, 2, 3, 1, 4)
  out = _flash(block, l == 1, q_BKGLH, k_BKSH, v_BKSH, mask.q_positions_BL,
               mask.kv_positions_BS, mask.kv_valid_BS, mask.live_lengths())
  return out.transpose(0, 3, 1, 2, 4).reshape(b, l, n, h)


def _key_block(j, block, k_BKSH, v_BKSH, qpos_BL, kpos_BS, kvalid_BS):
  """Block j's (start, k, v, allowed_B11LS); the last block is shifted back to end at S, its
  keys already covered by block j - 1 masked off."""
  s = k_BKSH.shape[2]
  start = jnp.minimum(j * block, s - block)
  take = lambda x, axis: jax.lax.dynamic_slice_in_dim(x, start, block, axis)  # noqa: E731
  fresh_S = start + jnp.arange(block) >= j * block
  allowed_BLS = ((take(kvalid_BS, 1) & fresh_S)[:, None, :]
                 & (take(kpos_BS, 1)[:, None, :] <= qpos_BL[:, :, None]))
  return start, take(k_BKSH, 2), take(v_BKSH, 2), allowed_BLS[:, None, None]


def _qk(q_BKGLH, kb_BKSH):
  """Raw scores [B, KVH, G, L, S] fp32 (B may be the pairs of a ragged schedule)."""
  return jnp.einsum("BKGLH,BKSH->BKGLS", q_BKGLH, kb_BKSH, preferred_element_type=jnp.float32)


def _pv(p_BKGLS, vb_BKSH):
  """Probabilities x values [B, KVH, G, L, Dh] fp32."""
  return jnp.einsum("BKGLS,BKSH->BKGLH", p_BKGLS.astype(vb_BKSH.dtype), vb_BKSH,
                    preferred_element_type=jnp.float32)


def _scores(q_BKGLH, kb_BKSH, allowed):
  return jnp.where(allowed, _qk(q_BKGLH, kb_BKSH) * q_BKGLH.shape[-1] ** -0.5, _MASKED)


def _num_blocks(live_B: Array, block: int) -> Array:
  return (jnp.max(live_B) + block - 1) // block


def _flash_forward(block, q_BKGLH, k_BKSH, v_BKSH, qpos_BL, kpos_BS, kvalid_BS, live_B):
  """(out_BKGLH in v's dtype, logsumexp_BKGL fp32): one loop over the batch's key blocks."""
  f32 = jnp.float32

  def body(j, carry):
    m, total, acc = carry
    _, kb, vb, allowed = _key_block(j, block, k_BKSH, v_BKSH, qpos_BL, kpos_BS, kvalid_BS)
    scores = _scores(q_BKGLH, kb, allowed)
    m_new = jnp.maximum(m, jnp.max(scores, axis=-1))
    p = jnp.exp(scores - m_new[..., None])
    rescale = jnp.exp(m - m_new)
    acc = acc * rescale[..., None] + _pv(p, vb)
    return m_new, total * rescale + jnp.sum(p, axis=-1), acc

  shape = q_BKGLH.shape[:-1]
  init = (jnp.full(shape, _MASKED, f32), jnp.zeros(shape, f32),
          jnp.zeros(q_BKGLH.shape[:-1] + v_BKSH.shape[-1:], f32))
  m, total, acc = jax.lax.fori_loop(0, _num_blocks(live_B, block), body, init)
  return _normalise(m, total, acc, v_BKSH.dtype)


def _normalise(m, total, acc, dtype):
  total = jnp.maximum(total, 1e-30)  # zero only when the row read no block at all
  return (acc / total[..., None]).astype(dtype), m + jnp.log(total)


def _ragged_forward(block, q_BKGLH, k_BKSH, v_BKSH, qpos_BL, kpos_BS, kvalid_BS, live_B):
  """`_flash_forward` scheduled over (row, block) pairs: pair i of the list (row 0's live
  blocks, then row 1's, ...) is computed at step i // B, and each step's partial softmaxes are
  merged into their rows' running (max, sum, output).

  Each pair's keys are one contiguous slice of its row (a gather of whole blocks, not of single
  keys), and the merge is a [B, I] one-hot product (a matmul: no scatter, which serialises on
  CPU and TPU alike)."""
  f32 = jnp.float32
  b, kvh, s, h = k_BKSH.shape
  blocks_B = (live_B + block - 1) // block
  first_B = jnp.cumsum(blocks_B) - blocks_B  # index of each row's first pair
  total_pairs = jnp.sum(blocks_B)
  scale = q_BKGLH.shape[-1] ** -0.5
  rows_B = jnp.arange(b)

  def body(step, carry):
    m_B, sum_B, acc_B = carry
    pair_I = step * b + jnp.arange(b)
    row_I = jnp.clip(jnp.searchsorted(first_B, pair_I, side="right") - 1, 0, b - 1)
    j_I = pair_I - first_B[row_I]
    start_I = jnp.minimum(j_I * block, s - block)
    take = lambda x: jax.vmap(  # noqa: E731  [I, block] from [B, S]
        lambda r, st: jax.lax.dynamic_slice(x, (r, st), (1, block))[0])(row_I, start_I)
    take_kv = lambda x: jax.vmap(  # noqa: E731  [I, KVH, block, H] from [B, KVH, S, H]
        lambda r, st: jax.lax.dynamic_slice(x, (r, 0, st, 0), (1, kvh, block, h))[0])(
            row_I, start_I)
    index_IS = start_I[:, None] + jnp.arange(block)
    allowed_IS = (take(kvalid_BS) & (index_IS >= (j_I * block)[:, None])
                  & (pair_I < total_pairs)[:, None])
    allowed_ILS = allowed_IS[:, None, :] & (take(kpos_BS)[:, None, :]
                                            <= qpos_BL[row_I][:, :, None])
    kb, vb = take_kv(k_BKSH), take_kv(v_BKSH)
    scores = jnp.where(allowed_ILS[:, None, None], _qk(q_BKGLH[row_I], kb) * scale, _MASKED)
    m_I = jnp.max(scores, axis=-1)
    p = jnp.exp(scores - m_I[..., None])
    # Pair i feeds row row_I[i]; pairs past the list feed no row.
    mine_BI = (row_I[None, :] == rows_B[:, None]) & (pair_I < total_pairs)[None, :]
    m_new = jnp.maximum(m_B, jnp.max(jnp.where(mine_BI[:, :, None, None, None], m_I[None],
                                               _MASKED), axis=1))
    weight_I = jnp.exp(m_I - m_new[row_I])
    rescale = jnp.exp(m_B - m_new)
    mine = mine_BI.astype(f32)
    sum_B = sum_B * rescale + jnp.einsum("BI,IKGL->BKGL", mine, jnp.sum(p, -1) * weight_I)
    acc_B = acc_B * rescale[..., None] + jnp.einsum("BI,IKGLH->BKGLH", mine,
                                                    _pv(p, vb) * weight_I[..., None])
    return m_new, sum_B, acc_B

  shape = q_BKGLH.shape[:-1]
  init = (jnp.full(shape, _MASKED, f32), jnp.zeros(shape, f32),
          jnp.zeros(shape + v_BKSH.shape[-1:], f32))
  m, total, acc = jax.lax.fori_loop(0, (total_pairs + b - 1) // b, body, init)
  return _normalise(m, total, acc, v_BKSH.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _flash(block, ragged, q_BKGLH, k_BKSH, v_BKSH, qpos_BL, kpos_BS, kvalid_BS, live_B):
  return _flash_fwd(block, ragged, q_BKGLH, k_BKSH, v_BKSH, qpos_BL, kpos_BS, kvalid_BS,
                    live_B)[0]


def _flash_fwd(block, ragged, q_BKGLH, k_BKSH, v_BKSH, qpos_BL, kpos_BS, kvalid_BS, live_B):
  args = (q_BKGLH, k_BKSH, v_BKSH, qpos_BL, kpos_BS, kvalid_BS, live_B)
  if ragged:  # the cheaper schedule for these live lengths, chosen on device
    b = live_B.shape[0]
    ragged_steps = (jnp.sum((live_B + block - 1) // block) + b - 1) // b
    out, lse = jax.lax.cond(ragged_steps * _RAGGED_STEP_COST < _num_blocks(live_B, block),
                            functools.partial(_ragged_forward, block),
                            functools.partial(_flash_forward, block), *args)
  else:
    out, lse = _flash_forward(block, *args)
  return out, (*args, out, lse)


def _flash_bwd(block, ragged, residuals, dout_BKGLH):
  """FlashAttention-2's backward: per key block, recompute the probabilities from logsumexp;
  dq accumulates over blocks, dk/dv are written block by block (nothing [L, S] is kept)."""
  del ragged  # one loop over the longest row's blocks serves both forward schedules
  q, k_BKSH, v_BKSH, qpos_BL, kpos_BS, kvalid_BS, live_B, out, lse = residuals
  f32 = jnp.float32
  dout = dout_BKGLH.astype(f32)
  delta_BKGL = jnp.sum(dout * out.astype(f32), axis=-1)
  scale = q.shape[-1] ** -0.5

  def body(j, carry):
    dq, dk, dv = carry
    start, kb, vb, allowed = _key_block(j, block, k_BKSH, v_BKSH, qpos_BL, kpos_BS, kvalid_BS)
    p = jnp.exp(_scores(q, kb, allowed) - lse[..., None])
    dp = jnp.einsum("BKGLH,BKSH->BKGLS", dout, vb.astype(f32))
    ds = jnp.where(allowed, p * (dp - delta_BKGL[..., None]), 0.0) * scale
    dq = dq + jnp.einsum("BKGLS,BKSH->BKGLH", ds, kb.astype(f32))
    add = lambda acc, x: jax.lax.dynamic_update_slice_in_dim(  # noqa: E731
        acc, jax.lax.dynamic_slice_in_dim(acc, start, block, 2) + x, start, 2)
    dk = add(dk, jnp.einsum("BKGLS,BKGLH->BKSH", ds, q.astype(f32)))
    dv = add(dv, jnp.einsum("BKGLS,BKGLH->BKSH", p, dout))
    return dq, dk, dv

  init = (jnp.zeros(q.shape, f32), jnp.zeros(k_BKSH.shape, f32), jnp.zeros(v_BKSH.shape, f32))
  dq, dk, dv = jax.lax.fori_loop(0, _num_blocks(live_B, block), body, init)
  return (dq.astype(q.dtype), dk.astype(k_BKSH.dtype), dv.astype(v_BKSH.dtype),
          None, None, None, None)


_flash.defvjp(_flash_fwd, _flash_bwd)


# ----------------------------------------------------------------------------------------------
# xla: dense scores.
# ----------------------------------------------------------------------------------------------


def dense(q_BLNH: Array, k_BKSH: Array, v_BKSH: Array, allowed: Array) -> Array:
  """Dense attention; `allowed`: bool, broadcastable to [B, KVH, G, L, S]. On XLA:CPU, decode
  steps multiply-reduce and large batches run in row chunks (both measured faster there)."""
  b, l, n, h = q_BLNH.shape
  if trace_platform() == "cpu":
    if l == 1:
      kvh = k_BKSH.shape[1]
      return _dense_one_query(q_BLNH.reshape(b, kvh, n // kvh, h), k_BKSH, v_BKSH,
                              allowed[:, :, :, 0]).reshape(b, 1, n, h)
    rows = _rows_per_chunk(b, n * l * k_BKSH.shape[2] * 4)
    if rows < b:
      return _dense_in_row_chunks(q_BLNH, k_BKSH, v_BKSH, allowed, rows)
  return _dense(q_BLNH, k_BKSH, v_BKSH, allowed)


def _dense(q_BLNH: Array, k_BKSH: Array, v_BKSH: Array, allowed: Array) -> Array:
  """`dense` over the whole batch: two batched matmuls over (B, KVH)."""
  b, l, n, h = q_BLNH.shape
  kvh = k_BKSH.shape[1]
  # Queries laid out [B, KVH, G, L, Dh] like the keys (a copy of q, not of the [.., L, S]
  # scores): both products are then plain batched matmuls whose outputs XLA keeps in place.
  q_BKGLH = q_BLNH.reshape(b, l, kvh, n // kvh, h).transpose(0, 2, 3, 1, 4)
  scores = _scores(q_BKGLH, k_BKSH, allowed)
  # Softmax normalised after the value product: [.., L, Dh] divides instead of [.., L, S].
  shift = jax.lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True))
  weights = jnp.exp(scores - shift)
  out = jnp.einsum("BKGLS,BKSH->BKGLH", weights.astype(v_BKSH.dtype), v_BKSH,
                   preferred_element_type=jnp.float32)
  out = out / jnp.sum(weights, axis=-1, keepdims=True)
  return out.astype(v_BKSH.dtype).transpose(0, 3, 1, 2, 4).reshape(b, l, n, h)


# XLA:CPU runs attention op by op over whole tensors, so once the fp32 scores of all rows
# outgrow the caches every pass over them streams from memory: 128 rows x 256 tokens ran
# 3.5x slower per row than chunks of <= this many bytes of scores.
_CPU_SCORE_CHUNK_BYTES = 8 * 2 ** 20


def _rows_per_chunk(rows: int, score_bytes_per_row: int) -> int:
  """The largest divisor of `rows` whose scores fit _CPU_SCORE_CHUNK_BYTES (at least 1)."""
  fit = max(1, _CPU_SCORE_CHUNK_BYTES // score_bytes_per_row)
  return max(d for d in range(1, min(fit, rows) + 1) if rows % d == 0)


def _dense_in_row_chunks(q_BLNH: Array, k_BKSH: Array, v_BKSH: Array, allowed: Array,
                         rows: int) -> Array:
  """`_dense` on `rows` rows at a time (CPU only), each chunk recomputed in the backward pass.

  Chunk m holds rows m, m + M, m + 2M, ... (M chunks): a batch sharded in contiguous blocks
  keeps its sharding on the rows within a chunk, so the loop never slices across devices.
  """
  b = q_BLNH.shape[0]
  chunks = b // rows
  allowed = jnp.broadcast_to(allowed, (b,) + allowed.shape[1:])
  split = lambda x: x.reshape(rows, chunks, *x.shape[1:]).swapaxes(0, 1)  # noqa: E731
  body = jax.checkpoint(lambda xs: _dense(*xs), prevent_cse=False)
  out = jax.lax.map(body, tuple(split(x) for x in (q_BLNH, k_BKSH, v_BKSH, allowed)))
  return out.swapaxes(0, 1).reshape(q_BLNH.shape)


def _dense_one_query(q_BKGH: Array, k_BKSH: Array, v_BKSH: Array, allowed: Array) -> Array:
  """One query per row (a decode step) as multiply-and-reduce: on XLA:CPU the batched dot over
  (B, KVH) with only G rows per matrix is 1.2-1.5x slower per decode step than one fused pass
  over the cache. `allowed` broadcasts to [B, KVH, G, S]. Returns [B, KVH, G, Dh]."""
  f32 = jnp.float32
  scores_BKGS = jnp.sum(q_BKGH[:, :, :, None, :].astype(f32) * k_BKSH[:, :, None].astype(f32),
                        axis=-1)
  scores_BKGS = jnp.where(allowed, scores_BKGS * q_BKGH.shape[-1] ** -0.5, _MASKED)
  probs_BKGS = jax.nn.softmax(scores_BKGS, axis=-1)
  out = jnp.sum(probs_BKGS[..., None] * v_BKSH[:, :, None].astype(f32), axis=3)
  return out.astype(v_BKSH.dtype)
