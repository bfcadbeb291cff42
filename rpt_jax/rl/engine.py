"""Continuous-batching rollouts: a fixed set of decode slots refilled as rows finish.

`SlotEngine.generate` takes the same inputs as `Sampler.generate` and returns the same
`SampleOutput`, token for token (see `rpt_jax.rl.slots` for the device programs):

  queue   contexts wait on the host, longest row budget first (a long row started late is what
          leaves slots idle at the end; the order never changes a row's tokens);
  admit   while >= G slots are free: prefill the next P contexts ONCE each and insert each
          context's cache into G free slots (its G rollouts);
  chunk   decode all S slots for up to K steps on device, returning early once enough slots are
          free for the next admission; the host then copies the chunk's tokens into the rows'
          outputs, retires finished rows and refills their slots.

Where the scheduling runs: on the host, between decode chunks. Measured with
benchmarks/rollout_long_tail.py (model (a) of benchmarks/sampler.py, 2,048 rows with
long-tail budgets, 128 slots, cache up to 640; idle 2-core CPU): 242 host visits took 0.71 s
of the 21.4 s run (3.3%; 2.9 ms per visit: read the [K, S] tokens, retire rows, dispatch admit
+ chunk) against a 21 ms decode step. Scheduling on device (prefill and insert inside the
decode loop, a `lax.cond` over a second program shape every step) could win back at most those
3.3%, so the host does it. The early exit on `min_free` keeps host visits to when a refill is
possible: a freed slot idles only until G slots are free (utilization 95% on that workload;
94-95% in a simulation for 64-256 slots, longest-budget-first; 56-86% first-come).

Live prefix (CPU): the slot cache is kept as long as the live rows can reach in the next chunk
(one of LIVE_PREFIXES lengths, each a compile of the programs; `SlotPrograms.resize` between
chunks when the need crosses a length), so every decode step reads only that. XLA:CPU reads
every key it is given, and a slice of the loop's cache is materialised every step (128 slots,
192 of 640 positions: 20.3 ms a step, 15.5 on a 192-position cache; a prefix copied in and out
per chunk cost more still, chunks being ~4 steps on the long-tail workload). With the CPU decode
attention kernel (which reads only live keys) it still pays: the cache writes and the rest of
the step scale with the cache (long-tail workload, engine alone: 6,689 tok/s with it, 6,181
without).

Over-sampling with abort (`generate_groups`, off unless called): admit more contexts than the
step needs and stop as soon as `groups_needed` whole groups are done. Rows still decoding are
dropped, or with `carry_over=True` stay in their slots (cache, random stream and all) as partial
rollouts that the next call keeps decoding, with that call's weights: each returned group
reports its staleness (policy versions between its admission and its return) and keeps the
log-probs of the weights that sampled each token (the behaviour policy of the PPO ratio).

Several processes (multi-host): every process runs this scheduler in lockstep and must take
the same decisions, so it reads only values that every process holds whole: the prompts and
their lengths (a global array spanning processes is all-gathered once per call), the budgets,
and the chunk program's outputs (tokens [K, S], count_S, live_S: replicated). Host inputs of
the programs are global arrays built from each process's own slices of those whole values
(`_feed`: no collective), and so are the returned rows (batch-sharded). On one process none of
this adds work.

Memory: the slot cache (S rows of L + max budget positions, see the Sampler's docstring) lives
only during a call unless partial rollouts are carried.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rpt_jax.rl.sampler import SampleOutput, Sampler
from rpt_jax.rl.sampling import Sampling
from rpt_jax.rl.slots import SlotPrograms, SlotState


@dataclasses.dataclass
class GroupRollouts:
  """Whole groups returned by `SlotEngine.generate_groups` (K groups, rows k*G .. k*G+G-1).

  output: SampleOutput of the K*G rows. prompt_tokens [K, L] / prompt_lengths [K]: their
  contexts. context_ids [K]: the caller's ids (a carried group keeps the id it came with).
  staleness [K]: policy versions between the group's admission and this call (0: on-policy).
  unstarted: ids of this call's contexts never admitted (free to reuse). dropped: ids aborted
  mid-generation (carry_over=False). carried: ids left in the engine for the next call.
  """

  output: SampleOutput
  prompt_tokens: np.ndarray
  prompt_lengths: np.ndarray
  context_ids: np.ndarray
  staleness: np.ndarray
  unstarted: np.ndarray
  dropped: np.ndarray
  carried: np.ndarray


@dataclasses.dataclass
class _Group:
  """Host bookkeeping of one context's G rows."""

  context_id: int
  prompt: np.ndarray      # [L] int32
  prompt_len: int
  version: int
  tokens_GN: np.ndarray
  logprobs_GN: np.ndarray
  lengths_G: np.ndarray
  eos_G: np.ndarray
  left: int               # rows still decoding


def _whole(x, dtype) -> np.ndarray:
  """The whole value of `x` on this process (numpy): a global array spanning several processes
  is all-gathered (a collective every process enters at the same point)."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(x, dtype)


class SlotEngine(Sampler):
  """A `Sampler` whose `generate` is continuous batching over `decode_slots` static slots.

  decode_slots (S): rows decoded at once (with a mesh, a multiple of data * fsdp keeps them
  batch-sharded); at least G. prefill_contexts (P): contexts prefilled per admission (the last
  batch padded with dummies). chunk_steps (K): most decode steps between host visits.
  live_prefix: keep the slot cache only as long as its live rows can reach (one of
  `LIVE_PREFIXES` lengths, each a compile) instead of L + the largest budget. Default: on CPU,
  whose decode attention reads every key it is given (one dense pass is fastest there);
  elsewhere the attention skips each row's dead blocks itself, and resizing would cost HBM.
  """

  LIVE_PREFIXES = 8

  def __init__(self, model, *, decode_slots: int, prefill_contexts: int = 1,
               chunk_steps: int = 16, live_prefix: bool | None = None, **kwargs):
    super().__init__(model, **kwargs)
    self.live_prefix = (jax.default_backend() == "cpu") if live_prefix is None else live_prefix
    for name, value in (("decode_slots", decode_slots), ("prefill_contexts", prefill_contexts),
                        ("chunk_steps", chunk_steps)):
      if int(value) < 1:
        raise ValueError(f"{name}={value} must be >= 1.")
    self.slots, self.prefill_contexts, self.chunk_steps = (
        int(decode_slots), int(prefill_contexts), int(chunk_steps))
    self.programs = SlotPrograms(self)
    self.last_stats: dict[str, float] = {}
    self._state: SlotState | None = None
    self._cache_len: int | None  # positions of the slot cache now (see _fit_cache)
    self._slot_group: list[tuple[_Group, int] | None]  # slot -> (its row's group, member g)
    self._slot_count: np.ndarray  # slot -> tokens its row had when the host last read it
    self._slot_prompt: np.ndarray  # slot -> its row's prompt length
    self._slot_end: np.ndarray  # slot -> its row's prompt length + budget (positions it can fill)
    self._finished_carry: list[_Group]  # groups finished but not returned by the last call
    self._shape: tuple | None  # (L, N, G) of the carried rows
    self.drop_partial()

  # ---- public --------------------------------------------------------------------------------

  def generate(self, prompt_tokens, prompt_lengths, *, num_samples: int, max_new_tokens,
               temperature: float, top_k: int = 0, top_p: float = 1.0,
               eos_ids: Sequence[int] = (), rng: jax.Array, params: Any = None,
               cache_tokens: int | None = None) -> SampleOutput:
    """`Sampler.generate` (same arguments but micro_batch / shared_prefill, same output): all B
    contexts, row i*G+g = sample g of context i."""
    if self._carried_groups():
      raise ValueError("this SlotEngine holds partial rollouts from generate_groups("
                       "carry_over=True); finish them with generate_groups or call "
                       "drop_partial() first.")
    groups, *_ = self._run(prompt_tokens, prompt_lengths, num_samples, max_new_tokens,
                           Sampling(float(temperature), int(top_k), float(top_p)), eos_ids, rng,
                           params, groups_needed=np.shape(prompt_tokens)[0], carry_over=False,
                           version=0, context_ids=None, cache_tokens=cache_tokens)
    return self._package(sorted(groups, key=lambda grp: grp.context_id), 0).output

  def generate_groups(self, prompt_tokens, prompt_lengths, *, num_samples: int, max_new_tokens,
                      temperature: float, top_k: int = 0, top_p: float = 1.0,
                      eos_ids: Sequence[int] = (), rng: jax.Array, params: Any = None,
                      groups_needed: int, carry_over: bool = False, policy_version: int = 0,
                      context_ids: Sequence[int] | None = None,
                      cache_tokens: int | None = None) -> GroupRollouts:
    """Over-sampling: admits contexts (plus any carried groups, which go first) until
    `groups_needed` whole groups are done, then stops; returns exactly those groups (in the
    order they finished). max_new_tokens: one int or one per row [B*G]. Row i*G+g of this call
    draws from fold_in(fold_in(rng, t), i*G+g), as `generate`. context_ids: [B] ints reported
    back (default arange(B)); policy_version: the caller's weights version (for staleness);
    cache_tokens: as in `Sampler.generate`."""
    groups, unstarted, dropped, carried = self._run(
        prompt_tokens, prompt_lengths, num_samples, max_new_tokens,
        Sampling(float(temperature), int(top_k), float(top_p)), eos_ids, rng, params,
        groups_needed=groups_needed, carry_over=carry_over, version=int(policy_version),
        context_ids=context_ids, cache_tokens=cache_tokens)
    result = self._package(groups, int(policy_version))
    return dataclasses.replace(result, unstarted=unstarted, dropped=dropped, carried=carried)

  def lower(self, contexts: int, prompt_len: int, *, num_samples: int, max_new_tokens: int,
            temperature: float, top_k: int = 0, top_p: float = 1.0,
            eos_ids: Sequence[int] = ()) -> dict[str, jax.stages.Lowered]:
    """{'prefill', 'decode'}: the engine's two programs for prompts of `prompt_len` tokens and
    a cache of `prompt_len + max_new_tokens` positions, lowered from abstract inputs placed as
    `generate` places them (`Sampler.lower`'s contract; `contexts` is unused: the slots fix the
    shapes). prefill = admit (P contexts prefilled into the slot cache), decode = one chunk."""
    del contexts
    g, s, p, cache_len = int(num_samples), self.slots, self.prefill_contexts, (
        int(prompt_len) + int(max_new_tokens))
    method = Sampling(float(temperature), int(top_k), float(top_p))
    eos = tuple(sorted({int(e) for e in eos_ids}))
    params = self.params
    if self.mesh is not None:
      params = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                            params, self._param_shardings(params))
    key = jax.eval_shape(lambda: jax.random.key(0))
    key_shape = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0))).shape
    state = self.programs.abstract(s, cache_len, key_shape)
    i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)  # noqa: E731
    admit = self.programs.admit(s, cache_len, p, int(prompt_len), g, method, eos)
    chunk = self.programs.chunk(s, cache_len, self.chunk_steps, method, eos)
    return {"prefill": admit.lower(params, state, i32(p, int(prompt_len)), i32(p), i32(p * g),
                                   i32(p * g), i32(p * g), key),
            "decode": chunk.lower(params, state, i32())}

  def drop_partial(self) -> None:
    """Forgets carried partial rollouts and frees the slot cache."""
    self._state, self._cache_len, self._shape, self._finished_carry = None, None, None, []
    self._slot_group = [None] * self.slots
    self._slot_count = np.ones(self.slots, np.int64)
    self._slot_prompt = np.zeros(self.slots, np.int64)
    self._slot_end = np.zeros(self.slots, np.int64)

  # ---- scheduling ----------------------------------------------------------------------------

  def _run(self, prompt_tokens, prompt_lengths, num_samples, max_new_tokens, method, eos_ids,
           rng, params, *, groups_needed, carry_over, version, context_ids, cache_tokens):
    """The scheduler loop: (finished groups, unstarted ids, dropped ids, carried ids)."""
    tokens_BL, lengths_B = _whole(prompt_tokens, np.int32), _whole(prompt_lengths, np.int32)
    b, l = self._check(tokens_BL, lengths_B, num_samples, None)
    g = int(num_samples)
    budgets_R, n = self.row_budgets(max_new_tokens, b * g, l, cache_tokens)
    carried = self._carried_groups()
    if carried and self._shape != (l, n, g):
      raise ValueError(f"carried partial rollouts have (prompt length, max_new_tokens, G) = "
                       f"{self._shape}; this call has {(l, n, g)}. Keep them equal or call "
                       "drop_partial().")
    if not 1 <= int(groups_needed) <= b + len(carried):
      raise ValueError(f"groups_needed={groups_needed} must lie in [1, {b + len(carried)}] "
                       "(contexts given + groups carried).")
    if self.slots < g:
      raise ValueError(f"decode_slots={self.slots} must be >= num_samples={g} (one context "
                       "fills G slots).")
    eos = tuple(sorted({int(e) for e in eos_ids}))
    ids = np.arange(b) if context_ids is None else np.asarray(context_ids)
    new = [_Group(int(ids[i]), tokens_BL[i], int(lengths_B[i]), version,
                  np.full((g, n), self.pad_id, np.int32), np.zeros((g, n), np.float32),
                  np.zeros(g, np.int32), np.zeros(g, bool), g) for i in range(b)]
    # Longest budget first (stable): the order changes which slot a row gets, never its tokens.
    group_budget_B = budgets_R.reshape(b, g).max(axis=1)  # a context's longest row budget
    queue = sorted(range(b), key=lambda i: -int(group_budget_B[i]))
    finished, self._finished_carry = list(self._finished_carry), []
    params = self._place_params(self.params if params is None else params)
    if self._state is None:
      self._state = self.programs.init(self.slots, l + n, jax.random.key_data(rng).shape)
      self._cache_len = l + n
    stats = dict(decode_steps=0, chunks=0, admissions=0, resizes=0, tokens=0, first_tokens=0,
                 host_s=0.0)
    eos_set = np.asarray(eos, np.int32)
    start = host = time.perf_counter()  # host: when the device last handed results back

    while len(finished) < groups_needed:
      free = [s for s, occupant in enumerate(self._slot_group) if occupant is None]
      pending = []  # (groups, first-token outputs) of this visit's admissions
      # This visit admits the queue's first len(free) // G contexts; a new row reaches position
      # prompt + min(K, budget) - 1 in the chunk, and every prefill writes [0, L).
      new_reach = max((int(lengths_B[i]) + min(self.chunk_steps, int(group_budget_B[i]))
                       for i in queue[:len(free) // g]), default=0)
      self._fit_cache(l + n, max(new_reach, l if queue else 0), stats)
      while queue and len(free) >= g:
        take = [queue.pop(0) for _ in range(min(self.prefill_contexts, len(free) // g,
                                                len(queue)))]
        admit = self.programs.admit(self.slots, self._cache_len, self.prefill_contexts, l, g,
                                    method, eos)
        pending.append((take, self._admit(admit, params, new, take, free, tokens_BL,
                                          lengths_B, budgets_R, g, rng)))
        stats["admissions"] += 1
      live = any(o is not None for o in self._slot_group)
      if not live:
        break
      min_free = g * min(self.prefill_contexts, len(queue)) if queue else self.slots + 1
      chunk = self.programs.chunk(self.slots, self._cache_len, self.chunk_steps, method, eos)
      self._state, tokens_KS, logprobs_KS, steps, count_S, live_S = chunk(
          params, self._state, jnp.int32(min_free))
      stats["chunks"] += 1
      stats["host_s"] += time.perf_counter() - host  # Scheduling while the device sat idle.
      for take, (first, logp) in pending:  # Token 0 of the admitted rows (from the prefill).
        first, logp = np.asarray(first), np.asarray(logp)
        for j, i in enumerate(take):
          new[i].tokens_GN[:, 0] = first[j * g:(j + 1) * g]
          new[i].logprobs_GN[:, 0] = logp[j * g:(j + 1) * g]
          stats["first_tokens"] += g
      tokens_KS, logprobs_KS, steps, count_S, live_S = jax.device_get(
          (tokens_KS, logprobs_KS, steps, count_S, live_S))
      host = time.perf_counter()
      stats["decode_steps"] += int(steps)
      finished += self._collect(tokens_KS, logprobs_KS, count_S, live_S, eos_set, stats)

    done, rest = finished[:groups_needed], finished[groups_needed:]
    in_flight = {id(o[0]): o[0] for o in self._slot_group if o is not None}
    unstarted = np.asarray([new[i].context_id for i in queue], np.int64)
    rest_ids = np.asarray([grp.context_id for grp in rest + list(in_flight.values())], np.int64)
    if carry_over and (rest or in_flight):
      self._finished_carry, self._shape = rest, (l, n, g)
      dropped, carried_ids = np.zeros(0, np.int64), rest_ids
    else:
      self.drop_partial()
      dropped, carried_ids = rest_ids, np.zeros(0, np.int64)
    stats["wall_s"] = time.perf_counter() - start
    self._record_stats(stats)
    return done, unstarted, dropped, carried_ids

  def _fit_cache(self, cache_len: int, new_reach: int, stats: dict) -> None:
    """With `live_prefix`, resizes the slot cache to the positions the next chunk can touch:
    every live row's next K positions (capped at its budget) and `new_reach` (rows about to be
    admitted, and the padded prompt width while contexts wait), rounded up to a multiple of
    cache_len / LIVE_PREFIXES. Row r's token t sits at position prompt_len_r + t - 1 once fed."""
    if not self.live_prefix:
      return
    live = np.asarray([o is not None for o in self._slot_group])
    reach = np.minimum(self._slot_prompt + self._slot_count + self.chunk_steps - 1, self._slot_end)
    need = max(int(reach[live].max(initial=1)), new_reach)
    step = -(-cache_len // self.LIVE_PREFIXES)
    length = min(cache_len, -(-need // step) * step)
    if length != self._cache_len:
      self._state = self.programs.resize(self.slots, self._cache_len, length)(self._state)
      self._cache_len = length
      stats["resizes"] += 1

  def _carried_groups(self) -> list[_Group]:
    """Groups kept from the previous call: finished ones, then those still in slots."""
    in_slots = {id(o[0]): o[0] for o in self._slot_group if o is not None}
    return list(self._finished_carry) + list(in_slots.values())

  def _admit(self, admit, params, new, take, free, tokens_BL, lengths_B, budgets_R, g, rng):
    """Prefills contexts `take` (padded to P with dummies) into slots popped from `free`."""
    p = self.prefill_contexts
    slot_R = np.full(p * g, self.slots, np.int32)  # Dummy rows: slot S, dropped by the scatter.
    row_R = np.zeros(p * g, np.int32)
    budget_R = np.ones(p * g, np.int32)
    tok_PL = np.full((p, tokens_BL.shape[1]), self.pad_id, np.int32)
    len_P = np.ones(p, np.int32)
    for j, i in enumerate(take):
      tok_PL[j], len_P[j] = tokens_BL[i], lengths_B[i]
      for member in range(g):
        s = free.pop(0)
        slot_R[j * g + member], row_R[j * g + member] = s, i * g + member
        self._slot_group[s] = (new[i], member)
      budget_R[j * g:(j + 1) * g] = budgets_R[i * g:(i + 1) * g]
      self._slot_count[slot_R[j * g:(j + 1) * g]] = 1
      self._slot_prompt[slot_R[j * g:(j + 1) * g]] = lengths_B[i]
      self._slot_end[slot_R[j * g:(j + 1) * g]] = lengths_B[i] + budgets_R[i * g:(i + 1) * g]
    row = lambda x: self._feed(x, ("batch",))  # noqa: E731
    self._state, first, logp = admit(params, self._state, self._feed(tok_PL, ("batch", "length")),
                                     row(len_P), row(slot_R), row(row_R), row(budget_R), rng)
    return first, logp

  def _collect(self, tokens_KS, logprobs_KS, count_S, live_S, eos_set, stats) -> list[_Group]:
    """Copies a chunk's tokens into the rows' outputs; retires finished rows; returns the groups
    that finished."""
    finished = []
    for s, occupant in enumerate(self._slot_group):
      if occupant is None:
        continue
      grp, member = occupant
      start, end = int(self._slot_count[s]), int(count_S[s])
      grp.tokens_GN[member, start:end] = tokens_KS[:end - start, s]
      grp.logprobs_GN[member, start:end] = logprobs_KS[:end - start, s]
      stats["tokens"] += end - start
      self._slot_count[s] = end
      if not live_S[s]:
        grp.lengths_G[member] = end
        grp.eos_G[member] = bool(np.isin(grp.tokens_GN[member, end - 1], eos_set))
        grp.left -= 1
        self._slot_group[s] = None
        if grp.left == 0:
          finished.append(grp)
    return finished

  def _record_stats(self, stats) -> None:
    steps = stats["decode_steps"]
    stats["slot_utilization"] = stats["tokens"] / max(1, self.slots * steps)
    self.last_stats = stats

  def _feed(self, x: np.ndarray, axes) -> np.ndarray | jax.Array:
    """`x` (numpy, whole on every process) for a program input sharded by `axes`: itself when
    this process addresses every device (jit places it); else the global array of this
    process's slices (jit refuses numpy there, and `jax.device_put` would all-gather `x` first
    to check that every process holds the same)."""
    sharding = self._sharding(axes, x.shape)
    if sharding is None or sharding.is_fully_addressable:
      return x
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

  def _package(self, groups, version) -> GroupRollouts:
    """The groups' rows as a (batch-sharded) SampleOutput with their contexts."""
    cat = lambda name: np.concatenate([getattr(grp, name) for grp in groups])  # noqa: E731
    lengths = cat("lengths_G")
    put = lambda x, axes: jax.device_put(  # noqa: E731
        self._feed(x, axes), self._sharding(axes, x.shape))
    output = SampleOutput(tokens=put(cat("tokens_GN"), ("batch", None)),
                          logprobs=put(cat("logprobs_GN"), ("batch", None)),
                          lengths=put(lengths, ("batch",)), done=put(cat("eos_G"), ("batch",)),
                          num_steps=jnp.int32(lengths.max()))
    return GroupRollouts(
        output=output, prompt_tokens=np.stack([grp.prompt for grp in groups]),
        prompt_lengths=np.asarray([grp.prompt_len for grp in groups], np.int32),
        context_ids=np.asarray([grp.context_id for grp in groups], np.int64),
        staleness=np.asarray([version - grp.version for grp in groups], np.int64),
        unstarted=np.zeros(0, np.int64), dropped=np.zeros(0, np.int64),
        carried=np.zeros(0, np.int64))
