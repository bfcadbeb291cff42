"""The slot engine's device programs: a fixed set of S decode slots and the two jitted programs
that fill and advance them (`rpt_jax.rl.engine` schedules them from the host).

  admit  prefill P contexts [P, L] once each, sample each context's G first tokens from its
         prefill logits, and scatter its cache into G free slots (row b -> slots slot_R[b*G..]);
         dummy rows carry slot index S and are dropped by the scatter.
  chunk  up to K decode steps on all S slots in one `jax.lax.while_loop`: feed each slot's last
         token at its own position, sample its next token, retire it on EOS or at its budget.
         The loop also exits as soon as `min_free` slots are free, so the host can refill them.

The host reads only replicated outputs (chunk tokens [K, S], count_S, live_S; admit's first
tokens): on several processes every process reads the same values and schedules alike.

Both take the SlotState donated: the cache [S, KVH, C, Dh] per layer is updated in place (C =
L + the largest budget, or less: `resize` shortens or lengthens it between chunks to what the
live rows can reach, see `SlotEngine.live_prefix`). A slot's cache entries past its prompt are
stale from an earlier occupant until the slot's own decode steps overwrite them; a query at
position p only reads slots <= p, all written by then. Idle slots still run every step (static
shapes); their writes land in their own stale slots, or past C, where they are dropped.

Randomness: slot s draws token t of global row r with fold_in(fold_in(key_s, t), r), key_s
being the rng of the call that admitted the row: the same numbers as the static sampler's, so
a row's tokens do not depend on its slot, its neighbours or when it was admitted.

Compiles: admit once per (S, C, P, L, G, sampling, EOS ids), chunk once per (S, C, K, sampling,
EOS ids), resize once per (S, C from, C to); new data, weights, refill orders and min_free
values reuse them.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from rpt_jax.model.transformer import KVCache
from rpt_jax.rl.sampling import Sampling, row_uniforms, sample_tokens

Array = jax.Array


@flax.struct.dataclass
class SlotState:
  """Device state of S decode slots.

  cache:        KVCache, each layer [S, KVH, C, Dh].
  token_S:      int32, the slot's last sampled token (fed at its next step).
  count_S:      int32, tokens its row has generated so far (the next token's index).
  prompt_len_S: int32, its row's prompt length (token t sits at position prompt_len + t).
  budget_S:     int32, its row's max new tokens.
  row_S:        int32, its row's global id in the admitting call (its random stream).
  live_S:       bool, still decoding (False: free, or finished and not yet refilled).
  key_S2:       uint32 [S, 2], key data of the admitting call's rng.
  """

  cache: KVCache
  token_S: Array
  count_S: Array
  prompt_len_S: Array
  budget_S: Array
  row_S: Array
  live_S: Array
  key_S2: Array


def _eos_mask(tokens: Array, eos: tuple[int, ...]) -> Array:
  if not eos:
    return jnp.zeros(tokens.shape, bool)
  return jnp.any(tokens[..., None] == np.asarray(eos, np.int32), axis=-1)


class SlotPrograms:
  """Builds (and caches) the slot programs for one `Sampler`-like owner: its graphdef, config,
  mesh, rules, pad id, `_compute_params`, `_sharding`, `_cache_sharding`, `_param_shardings`,
  `_fns` and `trace_counts` (the SlotEngine passes itself)."""

  def __init__(self, owner):
    self.o = owner

  def state_shardings(self, slots: int, cache_len: int) -> SlotState | None:
    o = self.o
    if o.mesh is None:
      return None
    one = o._sharding(("batch",), (slots,))
    return SlotState(cache=o._cache_sharding(slots, cache_len), token_S=one, count_S=one,
                     prompt_len_S=one, budget_S=one, row_S=one, live_S=one,
                     key_S2=o._sharding(("batch", None), (slots, 2)))

  def _empty(self, slots: int, cache_len: int, key_shape: tuple[int, ...]) -> SlotState:
    """S free slots of `cache_len` positions (traced by `init` and `abstract`)."""
    zeros = jnp.zeros((slots,), jnp.int32)
    return SlotState(cache=KVCache.init(self.o.config, slots, cache_len),
                     token_S=zeros + self.o.pad_id, count_S=zeros + 1, prompt_len_S=zeros + 1,
                     budget_S=zeros + 1, row_S=zeros, live_S=jnp.zeros((slots,), bool),
                     key_S2=jnp.zeros((slots,) + key_shape, jnp.uint32))

  def init(self, slots: int, cache_len: int, key_shape: tuple[int, ...]) -> SlotState:
    """S empty slots (all free) of `cache_len` positions."""
    o = self.o
    key = ("init", slots, cache_len, key_shape)
    if key not in o._fns:
      # Explicit out_shardings even without a mesh: a zero-argument jit's outputs are otherwise
      # uncommitted on its first call only, and the programs fed them would compile twice.
      shardings = (self.state_shardings(slots, cache_len)
                   or jax.sharding.SingleDeviceSharding(jax.devices()[0]))
      o._fns[key] = jax.jit(lambda: self._empty(slots, cache_len, key_shape),
                            out_shardings=shardings)
    return o._fns[key]()

  def abstract(self, slots: int, cache_len: int, key_shape: tuple[int, ...]) -> SlotState:
    """`init`'s result as ShapeDtypeStructs placed like it (for lowering; nothing allocated)."""
    shapes = jax.eval_shape(lambda: self._empty(slots, cache_len, key_shape))
    shardings = self.state_shardings(slots, cache_len)
    if shardings is None:
      return shapes
    return jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                        shapes, shardings)

  def _replicated(self):
    return None if self.o.mesh is None else NamedSharding(self.o.mesh, PartitionSpec())

  def admit(self, slots: int, cache_len: int, contexts: int, prompt_len: int, g: int,
            method: Sampling, eos: tuple[int, ...]):
    """fn(params, state, tokens_PL, lengths_P, slot_R, row_R, budget_R, rng) ->
    (state, first tokens [R], their log-probs [R]), R = P * G; state donated."""
    o = self.o
    key = ("admit", slots, cache_len, contexts, prompt_len, g, method, eos)
    if key in o._fns:
      return o._fns[key]
    cfg, p, l, rows = o.config, contexts, prompt_len, contexts * g

    def admit(params, state, tokens_PL, lengths_P, slot_R, row_R, budget_R, rng):
      o.trace_counts["admit"] += 1
      model = nnx.merge(o.graphdef, o._compute_params(params))
      positions_PL = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (p, l))
      cache = KVCache.init(cfg, p, l)
      hidden_PLD, cache = model.hidden_states(tokens_PL, positions_PL,
                                              positions_PL < lengths_P[:, None], cache=cache)
      last_PD = jnp.take_along_axis(hidden_PLD, (lengths_P - 1)[:, None, None], axis=1)[:, 0]
      logits_PV = model.logits(last_PD[:, None])[:, 0]
      first_R, logp_R = sample_tokens(jnp.repeat(logits_PV, g, axis=0),
                                      row_uniforms(rng, 0, row_R), method)
      put = lambda x, v: x.at[slot_R].set(v, mode="drop")  # noqa: E731  (slot S: dummy row)
      # Each context's L prefilled positions go to its G slots; positions >= L stay stale.
      insert = lambda x, c: x.at[slot_R, :, :l].set(  # noqa: E731
          jnp.repeat(c, g, axis=0).astype(x.dtype), mode="drop")
      new_cache = KVCache(k=tuple(map(insert, state.cache.k, cache.k)),
                          v=tuple(map(insert, state.cache.v, cache.v)))
      key_R2 = jnp.broadcast_to(jax.random.key_data(rng), (rows,) + state.key_S2.shape[1:])
      state = SlotState(
          cache=new_cache, token_S=put(state.token_S, first_R),
          count_S=put(state.count_S, jnp.ones((rows,), jnp.int32)),
          prompt_len_S=put(state.prompt_len_S, jnp.repeat(lengths_P, g)),
          budget_S=put(state.budget_S, budget_R), row_S=put(state.row_S, row_R),
          live_S=put(state.live_S, ~_eos_mask(first_R, eos) & (budget_R > 1)),
          key_S2=put(state.key_S2, key_R2))
      return state, first_R, logp_R

    shardings = (None, None)
    if o.mesh is not None:
      state_sh, rep = self.state_shardings(slots, cache_len), self._replicated()
      row = o._sharding(("batch",), (rows,))
      shardings = ((o._param_shardings(o.params), state_sh,
                    o._sharding(("batch", "length"), (p, l)), o._sharding(("batch",), (p,)),
                    row, row, row, rep),
                   (state_sh, rep, rep))
    fn = self._jit_donating(admit, *shardings)
    o._fns[key] = fn
    return fn

  def chunk(self, slots: int, cache_len: int, steps: int, method: Sampling,
            eos: tuple[int, ...]):
    """fn(params, state, min_free) -> (state, tokens [K, S], log-probs [K, S], steps run,
    count_S, live_S); state donated. Step k's entry of slot s is its token number
    count_S(before) + k while the slot was live (pad / 0 after)."""
    o = self.o
    key = ("chunk", slots, cache_len, steps, method, eos)
    if key in o._fns:
      return o._fns[key]
    pad_id = o.pad_id

    def chunk(params, state, min_free):
      o.trace_counts["chunk"] += 1
      model = nnx.merge(o.graphdef, o._compute_params(params))
      keys_S = jax.random.wrap_key_data(state.key_S2)
      tokens_KS = jnp.full((steps, slots), pad_id, jnp.int32)
      logprobs_KS = jnp.zeros((steps, slots), jnp.float32)

      def cond(carry):
        k, st, *_ = carry
        free = jnp.sum((~st.live_S).astype(jnp.int32))
        return (k < steps) & jnp.any(st.live_S) & (free < min_free)

      def body(carry):
        k, st, tokens_KS, logprobs_KS = carry
        live_S = st.live_S
        positions_S1 = (st.prompt_len_S + st.count_S - 1)[:, None]
        hidden, cache = model.hidden_states(st.token_S[:, None], positions_S1, None,
                                            cache=st.cache)
        new_S, logp_S = sample_tokens(model.logits(hidden)[:, 0],
                                      row_uniforms(keys_S, st.count_S, st.row_S), method)
        new_S = jnp.where(live_S, new_S, pad_id)
        logp_S = jnp.where(live_S, logp_S, 0.0)
        tokens_KS = jax.lax.dynamic_update_slice(tokens_KS, new_S[None], (k, 0))
        logprobs_KS = jax.lax.dynamic_update_slice(logprobs_KS, logp_S[None], (k, 0))
        count_S = st.count_S + live_S.astype(jnp.int32)
        st = st.replace(cache=cache, token_S=jnp.where(live_S, new_S, st.token_S),
                        count_S=count_S,
                        live_S=live_S & ~_eos_mask(new_S, eos) & (count_S < st.budget_S))
        return k + 1, st, tokens_KS, logprobs_KS

      k, state, tokens_KS, logprobs_KS = jax.lax.while_loop(
          cond, body, (jnp.int32(0), state, tokens_KS, logprobs_KS))
      return state, tokens_KS, logprobs_KS, k, state.count_S, state.live_S

    shardings = (None, None)
    if o.mesh is not None:
      state_sh, rep = self.state_shardings(slots, cache_len), self._replicated()
      shardings = ((o._param_shardings(o.params), state_sh, rep),
                   (state_sh, rep, rep, rep, rep, rep))
    fn = self._jit_donating(chunk, *shardings)
    o._fns[key] = fn
    return fn

  def resize(self, slots: int, from_len: int, to_len: int):
    """fn(state) -> the state with a cache of `to_len` positions: its first min(from, to)
    positions kept, new ones zero (no row has written there). The engine keeps
    the cache as long as its live rows need (`SlotEngine.live_prefix`)."""
    o = self.o
    key = ("resize", slots, from_len, to_len)
    if key in o._fns:
      return o._fns[key]
    axis = KVCache.LOGICAL_AXES.index("cache_length")

    def fit(x):
      if to_len <= from_len:
        return jax.lax.slice_in_dim(x, 0, to_len, axis=axis)
      widths = [(0, 0)] * x.ndim
      widths[axis] = (0, to_len - from_len)
      return jnp.pad(x, widths)

    def resize(state):
      return state.replace(cache=jax.tree.map(fit, state.cache))

    # Not donated: the cache cannot be reused at another length (the old one is freed on return).
    if o.mesh is None:
      fn = jax.jit(resize)
    else:
      fn = jax.jit(resize, in_shardings=(self.state_shardings(slots, from_len),),
                   out_shardings=self.state_shardings(slots, to_len))
    o._fns[key] = fn
    return fn

  def _jit_donating(self, fn, in_shardings, out_shardings) -> Any:
    if self.o.mesh is None:
      return jax.jit(fn, donate_argnums=(1,))
    return jax.jit(fn, in_shardings=in_shardings, out_shardings=out_shardings,
                   donate_argnums=(1,))
