"""Rollout generation: one prefill per context, G sampled completions decoded from a static cache.

`Sampler.generate` runs, per micro-batch of contexts, two jitted programs:

  prefill  [B, L] right-padded prompts -> a KV cache of L slots and each row's next-token logits
           (taken at position len - 1; only those B rows are unembedded);
  decode   repeat the cache G times along batch (row b -> rows b*G .. b*G+G-1), pad it to L + N
           slots, sample the first token from the prefill logits, then ONE `jax.lax.while_loop`
           that feeds the last token at its row's own position, samples the next, and exits when
           every row has emitted an EOS id or reached its token budget (N, or its own value of a
           per-row `max_new_tokens`).

Shapes never depend on data: one compile per (micro-batch B, L, N, G, sampling method, EOS ids),
N being the largest budget;
fresh parameters every call (`params=`) reuse the compiled programs. The cache is born and dies
inside the decode program, and the per-step scatter of the new keys/values updates the loop
carry in place; the cache is stored [B, KVH, S, Dh], the order attention reads it in, so no
step copies it. Weights are cast to the compute dtype once, before the loop.

Randomness: the token drawn at step t for global row r uses fold_in(fold_in(rng, t), r) (see
`sampling.row_uniforms`), so results do not depend on the micro-batch size or the mesh.

Sharding (with a mesh): the batch over ('data', 'fsdp'), params by their logical axes under
`rules`, the cache by KVCache.LOGICAL_AXES (kv_heads over 'tensor').
Keep micro_batch (prefill rows) and micro_batch * G (decode rows) multiples of data * fsdp, or
those programs run replicated over the batch axes. XLA hoists the fsdp all-gathers of the
weights out of the decode loop: during decode each device holds params / tensor, not
params / (fsdp * tensor). Passing the Sampler other `rules` (e.g. no 'fsdp' on 'embed') reshards
the trainer's params once per `generate` call instead.

KV-cache memory per micro-batch: 2 (k and v) * layers * B*G * (L + N) * KVH * Dh * bytes.
R1-Distill-Qwen-14B (48 layers, 8 KV heads, Dh 128, bf16): 2 * 48 * 8 * 128 * 2 B = 192 KiB per
token, so ONE context with G=8 rollouts of 4,096 + 8,192 slots holds 98,304 tokens = 18 GiB, and
256 contexts need 4.5 TiB: choose `micro_batch` so that
micro_batch * 18 GiB / (data * fsdp * min(tensor, KVH)) fits beside the weights on each device.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from typing import Any, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rpt_jax import mesh as mesh_lib
from rpt_jax.model.transformer import KVCache, Transformer
from rpt_jax.rl.sampling import Sampling, row_uniforms, sample_tokens

Array = jax.Array


@flax.struct.dataclass
class SampleOutput:
  """G rollouts per context; rows of context i are i*G .. i*G+G-1.

  tokens:    [B*G, N] int32, pad_id after the EOS token.
  logprobs:  [B*G, N] fp32, log softmax(logits / T) at each token (T = 1 when greedy); 0 after EOS.
  lengths:   [B*G] int32, generated tokens including the EOS token (the row's budget when no EOS
             came).
  done:      [B*G] bool, whether the row emitted an EOS id.
  num_steps: [] int32, token positions the decode loop ran (max over micro-batches; the slot
             engine reports max(lengths)); below N when every row finished early.
  """

  tokens: Array
  logprobs: Array
  lengths: Array
  done: Array
  num_steps: Array


class Sampler:
  """Generates G completions per prompt with an NNX `Transformer`.

  model: split once into (graphdef, params) here. mesh/rules: shard the batch over the mesh's
  batch rule ('data', 'fsdp'), params by their logical axes, the cache by
  KVCache.LOGICAL_AXES; None runs unsharded.
  pad_id: written after EOS (and into dummy rows of the last micro-batch).
  """

  def __init__(self, model: Transformer, *, mesh: Mesh | None = None,
               rules: mesh_lib.ShardingRules | None = None, pad_id: int = 0,
               micro_batch: int | None = None):
    self.graphdef, self.params = nnx.split(model)
    if model.config.remat != "none":
      # Generation never differentiates, and remat inside the decode while_loop fails to trace
      # ("Cannot mutate Param from a different trace level"): same params, remat-free structure.
      plain = dataclasses.replace(model.config, remat="none")
      self.graphdef = nnx.graphdef(nnx.eval_shape(lambda: Transformer(
          plain, rngs=nnx.Rngs(0), mesh=model.mesh, rules=model.rules)))
    self.config = model.config
    self.mesh, self.rules, self.pad_id = mesh, rules or mesh_lib.ShardingRules(), int(pad_id)
    self.micro_batch = micro_batch  # `generate`'s default: contexts per sequential chunk
    self._fns: dict[tuple, Any] = {}
    # Incremented while tracing: how many times each program was (re)compiled.
    self.trace_counts: collections.Counter = collections.Counter()

  # ---- public --------------------------------------------------------------------------------

  def generate(self, prompt_tokens: Array | np.ndarray, prompt_lengths: Array | np.ndarray, *,
               num_samples: int, max_new_tokens: int | Sequence[int] | np.ndarray,
               temperature: float, top_k: int = 0,
               top_p: float = 1.0, eos_ids: Sequence[int] = (), rng: Array,
               params: Any = None, micro_batch: int | None = None,
               shared_prefill: bool = True, cache_tokens: int | None = None) -> SampleOutput:
    """Samples `num_samples` (G) completions of up to `max_new_tokens` per prompt.

    prompt_tokens: [B, L] int, right-padded (L is the static bucket length).
    prompt_lengths: [B] int in [1, L].
    max_new_tokens: one budget for every row, or one per row [B*G] (row i*G+g: sample g of
      context i); the cache holds N = the largest, and a row stops after its own budget.
    temperature: 0 is greedy; top_k (0 off) / top_p (1.0 off) truncate the sampling distribution
      (log-probs stay those of the untruncated softmax(logits / T); see `rpt_jax.rl.sampling`).
    rng: a JAX key; callers fold in their step so no two calls share draws.
    params: an NNX state like `nnx.state(model)` (e.g. the trainer's latest weights); None uses
      the weights given at construction.
    micro_batch: contexts per sequential chunk (the last one is padded with dummy rows); None
      runs all B at once.
    shared_prefill: False prefills every one of the B*G rows separately (a baseline for tests
      and benchmarks; identical results up to float rounding).
    cache_tokens: N, the response positions the cache holds (default: the largest budget);
      fixing it keeps one compile while per-row budgets change (e.g. a decaying thought budget).
    """
    b, l = self._check(prompt_tokens, prompt_lengths, num_samples, micro_batch)
    method = Sampling(float(temperature), int(top_k), float(top_p))
    g = int(num_samples)
    budgets_R, n = self.row_budgets(max_new_tokens, b * g, l, cache_tokens)
    mb = min(micro_batch or self.micro_batch or b, b)
    eos = tuple(sorted({int(e) for e in eos_ids}))
    params = self._place_params(self.params if params is None else params)
    tokens_BL = jnp.asarray(prompt_tokens, jnp.int32)
    lengths_B = jnp.asarray(prompt_lengths, jnp.int32)
    chunks = math.ceil(b / mb)
    if chunks * mb != b:  # Dummy contexts: one pad token each; their rows are dropped below.
      extra = chunks * mb - b
      tokens_BL = jnp.pad(tokens_BL, ((0, extra), (0, 0)), constant_values=self.pad_id)
      lengths_B = jnp.pad(lengths_B, (0, extra), constant_values=1)
      budgets_R = np.pad(budgets_R, (0, extra * g), constant_values=1)
    repeat = g if shared_prefill else 1
    prefill_rows = mb if shared_prefill else mb * g
    prefill = self._prefill_fn(prefill_rows, l)
    decode = self._decode_fn(prefill_rows, l, repeat, n, method, eos)
    outs = []
    for i in range(chunks):
      tok, lens = tokens_BL[i * mb:(i + 1) * mb], lengths_B[i * mb:(i + 1) * mb]
      if self.mesh is not None and chunks > 1:  # A slice of a sharded array is not batch-sharded.
        tok = jax.device_put(tok, self._sharding(("batch", "length"), tok.shape))
        lens = jax.device_put(lens, self._sharding(("batch",), lens.shape))
      if not shared_prefill:
        tok, lens = jnp.repeat(tok, g, axis=0), jnp.repeat(lens, g, axis=0)
      budget = budgets_R[i * mb * g:(i + 1) * mb * g]
      if self.mesh is not None:
        budget = jax.device_put(budget, self._sharding(("batch",), budget.shape))
      logits_BV, cache = prefill(params, tok, lens)
      outs.append(decode(params, logits_BV, cache, lens, budget, jnp.int32(i * mb * g), rng))
    if len(outs) == 1:
      return outs[0]
    rows = b * g
    cat = lambda name: jnp.concatenate([getattr(o, name) for o in outs])[:rows]
    return SampleOutput(tokens=cat("tokens"), logprobs=cat("logprobs"), lengths=cat("lengths"),
                        done=cat("done"), num_steps=jnp.max(jnp.stack([o.num_steps for o in outs])))

  def prefill(self, prompt_tokens, prompt_lengths, params: Any = None) -> tuple[Array, KVCache]:
    """The prefill program alone: (next-token logits [B, V] fp32, KVCache of L slots)."""
    b, l = np.shape(prompt_tokens)
    params = self._place_params(self.params if params is None else params)
    return self._prefill_fn(b, l)(params, jnp.asarray(prompt_tokens, jnp.int32),
                                  jnp.asarray(prompt_lengths, jnp.int32))

  def lower(self, contexts: int, prompt_len: int, *, num_samples: int, max_new_tokens: int,
            temperature: float, top_k: int = 0, top_p: float = 1.0,
            eos_ids: Sequence[int] = ()) -> dict[str, jax.stages.Lowered]:
    """{'prefill', 'decode'}: the two programs of one `generate` call on `contexts` prompts of
    `prompt_len` tokens, lowered from abstract inputs (placed like `generate` places them) for
    `.compile().memory_analysis()`; nothing is computed. `self.params` may be abstract."""
    i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)  # noqa: E731
    params = self.params
    if self.mesh is not None:
      params = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                            params, self._param_shardings(params))
    prefill = self._prefill_fn(contexts, prompt_len)
    logits, cache = jax.eval_shape(prefill, params, i32(contexts, prompt_len), i32(contexts))
    decode = self._decode_fn(contexts, prompt_len, int(num_samples), int(max_new_tokens),
                             Sampling(float(temperature), int(top_k), float(top_p)),
                             tuple(sorted({int(e) for e in eos_ids})) or (0,))
    key = jax.eval_shape(lambda: jax.random.key(0))
    return {"prefill": prefill.lower(params, i32(contexts, prompt_len), i32(contexts)),
            "decode": decode.lower(params, logits, cache, i32(contexts),
                                   i32(contexts * int(num_samples)), i32(), key)}

  # ---- programs ------------------------------------------------------------------------------

  def _sharding(self, axes, shape) -> NamedSharding | None:
    return None if self.mesh is None else self.rules.sharding(self.mesh, axes, shape)

  def _cache_sharding(self, rows: int, length: int):
    cfg = self.config
    sizes = {"batch": rows, "cache_length": length, "kv_heads": cfg.num_kv_heads,
             "head_dim": cfg.head_dim}
    shape = tuple(sizes[axis] for axis in KVCache.LOGICAL_AXES)
    one = self._sharding(KVCache.LOGICAL_AXES, shape)
    return KVCache(k=(one,) * cfg.num_layers, v=(one,) * cfg.num_layers)

  def _param_shardings(self, params):
    return mesh_lib.state_shardings(params, self.mesh, self.rules)

  def _place_params(self, params):
    if self.mesh is None:
      return params
    return jax.device_put(params, self._param_shardings(params))  # No-op when already placed.

  def _jit(self, fn, in_shardings, out_shardings):
    if self.mesh is None:
      return jax.jit(fn)
    return jax.jit(fn, in_shardings=in_shardings, out_shardings=out_shardings)

  def _compute_params(self, params):
    """Floating weights cast to the compute dtype once (not per layer per decode step)."""
    cd = jnp.dtype(self.config.compute_dtype)
    return jax.tree.map(lambda x: x.astype(cd) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                        params)

  def _prefill_fn(self, b: int, l: int):
    key = ("prefill", b, l)
    if key in self._fns:
      return self._fns[key]
    cfg = self.config

    def prefill(params, tokens_BL, lengths_B):
      self.trace_counts["prefill"] += 1
      model = nnx.merge(self.graphdef, self._compute_params(params))
      positions_BL = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l))
      mask_BL = positions_BL < lengths_B[:, None]
      cache = KVCache.init(cfg, b, l)
      hidden_BLD, cache = model.hidden_states(tokens_BL, positions_BL, mask_BL, cache=cache)
      last_BD = jnp.take_along_axis(hidden_BLD, (lengths_B - 1)[:, None, None], axis=1)[:, 0]
      return model.logits(last_BD[:, None])[:, 0], cache  # Unembed only the B last positions.

    shardings = None
    if self.mesh is not None:
      shardings = (
          (self._param_shardings(self.params), self._sharding(("batch", "length"), (b, l)),
           self._sharding(("batch",), (b,))),
          (self._sharding(("batch", "vocab"), (b, cfg.vocab_size)), self._cache_sharding(b, l)))
    fn = self._jit(prefill, *(shardings or (None, None)))
    self._fns[key] = fn
    return fn

  def _decode_fn(self, b: int, l: int, repeat: int, n: int, method: Sampling, eos: tuple):
    key = ("decode", b, l, repeat, n, method, eos)
    if key in self._fns:
      return self._fns[key]
    cfg, pad_id, rows = self.config, self.pad_id, b * repeat
    eos_E = np.asarray(eos, np.int32)
    cache_shardings = self._cache_sharding(rows, l + n)
    batch_axis = KVCache.LOGICAL_AXES.index("batch")
    length_axis = KVCache.LOGICAL_AXES.index("cache_length")

    def is_eos(tokens_R):
      if not eos:
        return jnp.zeros(tokens_R.shape, bool)
      return jnp.any(tokens_R[:, None] == eos_E[None, :], axis=-1)

    def decode(params, logits_BV, cache, prompt_lengths_B, budgets_R, row_offset, rng):
      self.trace_counts["decode"] += 1
      model = nnx.merge(self.graphdef, self._compute_params(params))
      # Row b of the prefill becomes rows b*repeat .. b*repeat+repeat-1, with N empty slots after
      # (axes found by name, so the sampler follows the cache's layout).
      grow = lambda x: jnp.pad(jnp.repeat(x, repeat, axis=batch_axis),
                               [(0, n if i == length_axis else 0) for i in range(x.ndim)])
      cache = jax.tree.map(grow, cache)
      if self.mesh is not None:
        cache = jax.lax.with_sharding_constraint(cache, cache_shardings)
      plen_R = jnp.repeat(prompt_lengths_B, repeat)
      row_ids_R = row_offset + jnp.arange(rows, dtype=jnp.int32)
      tok_R, logp_R = sample_tokens(jnp.repeat(logits_BV, repeat, axis=0),
                                    row_uniforms(rng, 0, row_ids_R), method)
      tokens_RN = jnp.full((rows, n), pad_id, jnp.int32).at[:, 0].set(tok_R)
      logprobs_RN = jnp.zeros((rows, n), jnp.float32).at[:, 0].set(logp_R)
      eos_R = is_eos(tok_R)
      carry = (jnp.int32(1), tok_R, eos_R, eos_R | (budgets_R <= 1), jnp.ones((rows,), jnp.int32),
               tokens_RN, logprobs_RN, cache)

      def cond(carry):
        t, _, _, stop_R, *_ = carry
        return (t < n) & ~jnp.all(stop_R)

      def body(carry):
        t, tok_R, eos_R, stop_R, lengths_R, tokens_RN, logprobs_RN, cache = carry
        # Feed token t-1, which sits at position len + t - 1 of its row.
        positions_R1 = (plen_R + t - 1)[:, None]
        hidden, cache = model.hidden_states(tok_R[:, None], positions_R1, None, cache=cache)
        new_R, logp_R = sample_tokens(model.logits(hidden)[:, 0], row_uniforms(rng, t, row_ids_R),
                                      method)
        new_R = jnp.where(stop_R, pad_id, new_R)
        logp_R = jnp.where(stop_R, 0.0, logp_R)
        tokens_RN = jax.lax.dynamic_update_slice(tokens_RN, new_R[:, None], (0, t))
        logprobs_RN = jax.lax.dynamic_update_slice(logprobs_RN, logp_R[:, None], (0, t))
        lengths_R = lengths_R + (~stop_R).astype(jnp.int32)
        eos_R = eos_R | is_eos(new_R)
        stop_R = stop_R | eos_R | (lengths_R >= budgets_R)
        return t + 1, new_R, eos_R, stop_R, lengths_R, tokens_RN, logprobs_RN, cache

      t, _, eos_R, _, lengths_R, tokens_RN, logprobs_RN, _ = jax.lax.while_loop(cond, body, carry)
      return SampleOutput(tokens=tokens_RN, logprobs=logprobs_RN, lengths=lengths_R, done=eos_R,
                          num_steps=t)

    shardings = None
    if self.mesh is not None:
      row = self._sharding(("batch",), (rows,))
      row_n = self._sharding(("batch", None), (rows, n))
      replicated = NamedSharding(self.mesh, PartitionSpec())
      shardings = (
          (self._param_shardings(self.params),
           self._sharding(("batch", "vocab"), (b, cfg.vocab_size)), self._cache_sharding(b, l),
           self._sharding(("batch",), (b,)), row, replicated, replicated),
          SampleOutput(tokens=row_n, logprobs=row_n, lengths=row, done=row,
                       num_steps=replicated))
    fn = self._jit(decode, *(shardings or (None, None)))
    self._fns[key] = fn
    return fn

  # ---- checks --------------------------------------------------------------------------------

  def row_budgets(self, max_new_tokens, rows: int, prompt_len: int,
                  cache_tokens: int | None = None) -> tuple[np.ndarray, int]:
    """(`max_new_tokens` (one int, or one per row) as [rows] int32, the cache's response
    positions N), checked against the model's context length."""
    budgets = np.asarray(max_new_tokens)
    if budgets.ndim == 0:
      budgets = np.full((rows,), budgets)
    if budgets.shape != (rows,) or not np.issubdtype(budgets.dtype, np.integer):
      raise ValueError(f"max_new_tokens has shape {budgets.shape}, dtype {budgets.dtype}; pass one "
                       f"int or one int per row (shape ({rows},) = contexts x num_samples).")
    if budgets.min() < 1:
      raise ValueError(f"max_new_tokens={budgets.min()} must be >= 1.")
    n = int(budgets.max()) if cache_tokens is None else int(cache_tokens)
    if n < budgets.max():
      raise ValueError(f"cache_tokens={cache_tokens} is below the largest max_new_tokens "
                       f"({budgets.max()}); raise it or leave it None.")
    self.config.check_context_length(prompt_len + n)
    return budgets.astype(np.int32), n

  def _check(self, prompt_tokens, prompt_lengths, num_samples, micro_batch):
    shape = np.shape(prompt_tokens)
    if len(shape) != 2:
      raise ValueError(f"prompt_tokens has shape {shape}; pass a [batch, length] array of ids.")
    b, l = shape
    if np.shape(prompt_lengths) != (b,):
      raise ValueError(f"prompt_lengths has shape {np.shape(prompt_lengths)}; it needs one length "
                       f"per prompt, shape ({b},).")
    if isinstance(prompt_lengths, (np.ndarray, list, tuple)):
      lengths = np.asarray(prompt_lengths)
      if lengths.size and (lengths.min() < 1 or lengths.max() > l):
        raise ValueError(f"prompt_lengths must lie in [1, {l}] (the padded length); got min "
                         f"{lengths.min()}, max {lengths.max()}.")
    if int(num_samples) < 1:
      raise ValueError(f"num_samples={num_samples} must be >= 1.")
    if micro_batch is not None and int(micro_batch) < 1:
      raise ValueError(f"micro_batch={micro_batch} must be >= 1 (or None for one batch).")
    return b, l
