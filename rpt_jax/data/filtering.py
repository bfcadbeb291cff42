"""Proxy-model scoring of document positions, position filters, and difficulty buckets.

Scoring (on device): a proxy model reads token windows [B, L] and, for every position t >= 1 of
a window, gives the top-k entropy of its distribution predicting token t (nats; softmax over the
k largest logits, the paper's k = 16) and its argmax. Only [B, L] entropies and ids leave the
device, never [B, L, V] logits.

Long documents are scored in windows of `seq_len` tokens that overlap by `overlap` tokens:
window w starts at token w * (seq_len - overlap) and predicts only the positions that the
previous window did not. So position t is predicted from the tokens of its window before it:
all t tokens when t < seq_len, else between `overlap` and `seq_len - 1` tokens (never the whole
document). Every window starts at model position 0.

Selection (on host, numpy): filters are registered by name in `FILTERS`:
  entropy     keep positions whose entropy >= threshold (the paper's filter).
  proxy_miss  keep positions the proxy gets wrong (its argmax != the true token).
  random      a control: per document, as many positions as `entropy` keeps, drawn uniformly
              (seeded) from the eligible positions.
  all         keep every eligible position.
A position t is eligible when t >= max(1, min_context_tokens) (at least that many tokens before
it) and it was scored.

Difficulty bucket = number of `bucket_thresholds` the entropy strictly exceeds; with the
paper's (0.5, 1.0, 1.5): easy = bucket >= 1, medium = bucket >= 2, hard = bucket == 3 (nested).
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rpt_jax import host_rows
from rpt_jax.registry import Registry

DEFAULT_BUCKET_THRESHOLDS = (0.5, 1.0, 1.5)


def topk_entropy(logits: jax.Array, k: int = 16) -> jax.Array:
  """Entropy (nats) of the softmax over the `k` largest logits of the last axis.

  Args:
    logits: [..., V] float logits.
    k: how many logits to keep. When V < k all V logits are used (the full-softmax entropy).

  Returns:
    [...] float32 entropies in [0, log(min(k, V))].
  """
  top = jax.lax.top_k(logits.astype(jnp.float32), min(k, logits.shape[-1]))[0]
  return _entropy_of_top(top)


def _entropy_of_top(top: jax.Array) -> jax.Array:
  logp = jax.nn.log_softmax(top, axis=-1)
  p = jnp.exp(logp)
  # -inf logits (masked vocabulary) give p = 0, whose 0 * log 0 term is 0, not NaN.
  return -jnp.sum(jnp.where(p > 0, p * logp, 0.0), axis=-1)


def _stats_from_logits(logits_BLV: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """(top-k entropy, argmax) per row of logits; ties in the argmax go to the lower id."""
  logits_BLV = logits_BLV.astype(jnp.float32)
  # A separate argmax, not top_k's first index: XLA:CPU turns top_k into a full sort when both
  # of its outputs are used (measured 20x slower).
  return topk_entropy(logits_BLV, k), jnp.argmax(logits_BLV, axis=-1).astype(jnp.int32)


class ProxyScorer:
  """A jitted map from token windows to per-position (entropy, proxy argmax), on device.

  Each call scores one global batch of `batch_size` windows of `seq_len` tokens; this process
  gives its `rows_per_call` rows of it (all of them with one process; under several processes,
  the rows its devices hold, see `rpt_jax.host_rows`): `tokens_RL` int32 [rows_per_call, L]
  (right-padded) and `mask_RL` (1 = real token). Every process must call it the same number of
  times (it is one SPMD program). Returns device arrays; `to_host` gives this process's rows,
  aligned with the TARGET position:
    entropy: [r, t] = top-k entropy of the proxy's distribution for token t given tokens
      [r, :t]; NaN at t = 0 (nothing predicts the first token).
    argmax: [r, t] = the proxy's most likely token at t; -1 at t = 0.
  The call is asynchronous (JAX dispatch): read results with `to_host` when needed.
  """

  def __init__(self, model: nnx.Module, *, batch_size: int, seq_len: int,
               mesh: Mesh | None = None, k: int = 16, logits_chunk: int | None = 128):
    if batch_size < 1 or seq_len < 2:
      raise ValueError(f"scorer batch_size={batch_size}, seq_len={seq_len}: need >= 1 and >= 2.")
    if mesh is not None:
      shards = mesh.shape["data"] * mesh.shape["fsdp"]
      if batch_size % shards:
        raise ValueError(
            f"scorer batch_size={batch_size} is not divisible by the mesh's data x fsdp size "
            f"{shards}; choose a multiple of {shards}.")
    self.batch_size, self.seq_len, self.k = batch_size, seq_len, k
    graphdef, self._state = nnx.split(model)
    chunked = (logits_chunk is not None and seq_len % logits_chunk == 0
               and hasattr(model, "hidden_states") and hasattr(model, "logits"))

    def forward(state, tokens_BL, mask_BL):
      proxy = nnx.merge(graphdef, state)
      if chunked:
        # Logits a chunk of positions at a time: [B, C, V] live instead of [B, L, V].
        hidden_BLD, _ = proxy.hidden_states(tokens_BL, None, mask_BL)
        b, l, d = hidden_BLD.shape
        hidden_NBCD = hidden_BLD.reshape(b, l // logits_chunk, logits_chunk, d).swapaxes(0, 1)
        ent_NBC, arg_NBC = jax.lax.map(
            lambda h_BCD: _stats_from_logits(proxy.logits(h_BCD), k), hidden_NBCD)
        ent_BL, arg_BL = ent_NBC.swapaxes(0, 1).reshape(b, l), arg_NBC.swapaxes(0, 1).reshape(b, l)
      else:
        ent_BL, arg_BL = _stats_from_logits(
            proxy(tokens_BL, attention_mask_BL=mask_BL), k)
      # Column t - 1 predicts token t: shift right so results index the target position.
      ent_BL = jnp.concatenate([jnp.full_like(ent_BL[:, :1], jnp.nan), ent_BL[:, :-1]], axis=1)
      arg_BL = jnp.concatenate([jnp.full_like(arg_BL[:, :1], -1), arg_BL[:, :-1]], axis=1)
      return ent_BL, arg_BL

    if mesh is None:
      self._batch_sharding = None
      self.feed = host_rows.BatchFeed(rows=tuple(range(batch_size)), group=0, num_groups=1,
                                      leader=True)
      self._forward = jax.jit(forward)
    else:
      self._batch_sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp"), None))
      self.feed = host_rows.batch_feed(self._batch_sharding, batch_size)
      self._forward = jax.jit(forward, out_shardings=(self._batch_sharding,) * 2)
    self.rows_per_call = len(self.feed.rows)

  def __call__(self, tokens_RL: np.ndarray, mask_RL: np.ndarray | None = None
               ) -> tuple[jax.Array, jax.Array]:
    shape = (self.rows_per_call, self.seq_len)
    if tuple(tokens_RL.shape) != shape:
      raise ValueError(f"scorer expects this process's tokens of shape {shape}, got "
                       f"{tuple(tokens_RL.shape)}.")
    if mask_RL is None:
      mask_RL = np.ones(shape, np.int32)
    tokens_RL, mask_RL = np.asarray(tokens_RL, np.int32), np.asarray(mask_RL, np.int32)
    if self._batch_sharding is not None:
      tokens_RL = host_rows.to_global(self._batch_sharding, tokens_RL, self.batch_size)
      mask_RL = host_rows.to_global(self._batch_sharding, mask_RL, self.batch_size)
    return self._forward(self._state, tokens_RL, mask_RL)

  @staticmethod
  def to_host(x: jax.Array) -> np.ndarray:
    """This process's rows of a result, in the order they were given."""
    return host_rows.local_rows(x)


def make_proxy_scorer(model: nnx.Module, *, mesh: Mesh | None = None, batch_size: int,
                      seq_len: int, k: int = 16, logits_chunk: int | None = 128) -> ProxyScorer:
  """Builds the jitted proxy scorer (see `ProxyScorer`).

  Args:
    model: an NNX `Transformer` (`model(tokens_BL, positions_BL, attention_mask_BL) ->
      logits_BLV`); when it also has `hidden_states`/`logits` and `logits_chunk` divides
      `seq_len`, logits are formed `logits_chunk` positions at a time.
    mesh: when given, the batch is sharded over ('data', 'fsdp'); the model's parameters keep
      the shardings they were loaded with.
    batch_size, seq_len: the static window shape [B, L] of every call.
    k: the entropy's top-k (the paper: 16).
    logits_chunk: positions per logits chunk (None: all at once).
  """
  return ProxyScorer(model, batch_size=batch_size, seq_len=seq_len, mesh=mesh, k=k,
                     logits_chunk=logits_chunk)


@dataclasses.dataclass(frozen=True)
class Window:
  """Tokens [start, end) of document `doc` scored in one row; targets [first_target, end)."""

  doc: int
  start: int
  end: int
  first_target: int


def document_windows(num_tokens: int, seq_len: int, overlap: int, doc: int = 0) -> list[Window]:
  """The scoring windows of a document of `num_tokens` tokens (see the module docstring)."""
  if not 0 <= overlap < seq_len:
    raise ValueError(f"score overlap={overlap} must be in [0, seq_len={seq_len}).")
  stride = seq_len - overlap
  windows, start, first = [], 0, 1
  while first < num_tokens:
    end = min(start + seq_len, num_tokens)
    windows.append(Window(doc, start, end, first))
    first, start = end, start + stride
  return windows


def _windows(documents: Sequence[np.ndarray], seq_len: int, overlap: int) -> list[Window]:
  return [w for i, ids in enumerate(documents)
          for w in document_windows(len(ids), seq_len, overlap, i)]


def count_batches(documents: Sequence[np.ndarray], *, rows: int, seq_len: int,
                  overlap: int) -> int:
  """Scorer calls `score_documents` makes for `documents` at `rows` windows per call."""
  return -(-len(_windows(documents, seq_len, overlap)) // rows)


def score_documents(scorer: ProxyScorer, documents: Sequence[np.ndarray], *, overlap: int,
                    pad_id: int = 0, lookahead: int = 2, num_batches: int | None = None
                    ) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
  """Scores every position of every document; yields (index, entropy_T, argmax_T) in order.

  Windows of all documents are packed into this process's [rows_per_call, L] part of each
  scorer batch (right-padded with `pad_id`); up to `lookahead` batches are in flight on the
  device while the host packs the next.

  Args:
    scorer: a `ProxyScorer`.
    documents: int token arrays, one per document.
    overlap: tokens shared by consecutive windows of a document.
    pad_id: id used for padding (masked out).
    lookahead: batches dispatched before the first result is read.
    num_batches: call the scorer exactly this many times (at least `count_batches`), the extra
      calls on padding: every process of a multi-process scorer must make the same calls.

  Yields:
    (i, entropy_T float32, argmax_T int32) for document i, in order; entropy is NaN and
    argmax -1 at position 0 (and for a one-token document, everywhere).
  """
  b, l = scorer.rows_per_call, scorer.seq_len
  windows = _windows(documents, l, overlap)
  needed = -(-len(windows) // b)
  num_batches = needed if num_batches is None else num_batches
  if num_batches < needed:
    raise ValueError(f"num_batches={num_batches} is fewer than the {needed} batches these "
                     "documents need.")
  results = [(np.full(len(ids), np.nan, np.float32), np.full(len(ids), -1, np.int32))
             for ids in documents]
  remaining = collections.Counter(w.doc for w in windows)
  next_doc = 0
  in_flight: collections.deque = collections.deque()

  def drain_one():
    batch, (ent_BL, arg_BL) = in_flight.popleft()
    ent_BL, arg_BL = scorer.to_host(ent_BL), scorer.to_host(arg_BL)
    for row, w in enumerate(batch):
      lo, hi = w.first_target - w.start, w.end - w.start
      results[w.doc][0][w.first_target:w.end] = ent_BL[row, lo:hi]
      results[w.doc][1][w.first_target:w.end] = arg_BL[row, lo:hi]
      remaining[w.doc] -= 1

  def ready():
    nonlocal next_doc
    while next_doc < len(documents) and remaining[next_doc] == 0:
      yield next_doc, results[next_doc][0], results[next_doc][1]
      results[next_doc] = None  # Free the finished document's arrays.
      next_doc += 1

  for call in range(num_batches):
    batch = windows[call * b:(call + 1) * b]  # Empty past the documents' windows: padding.
    tokens_BL = np.full((b, l), pad_id, np.int32)
    # Rows past the end are all-ones in the mask: a row with no key to attend to could be NaN.
    mask_BL = np.ones((b, l), np.int32)
    for row, w in enumerate(batch):
      tokens_BL[row, :w.end - w.start] = documents[w.doc][w.start:w.end]
      mask_BL[row, w.end - w.start:] = 0
    in_flight.append((batch, scorer(tokens_BL, mask_BL)))
    if len(in_flight) > lookahead:
      drain_one()
      yield from ready()
  while in_flight:
    drain_one()
  yield from ready()


# ---------------------------------------------------------------------------------------------
# Filters.

FilterFn = Callable[[np.ndarray, np.ndarray, np.ndarray, float, np.random.Generator], np.ndarray]
FILTERS: Registry[FilterFn] = Registry("position filter",
                                      "rpt_jax.data.filtering.register_filter")
# Registers `fn(entropy_T, correct_T, eligible_T, threshold, rng) -> keep_T` as `name`.
register_filter = FILTERS.register


@register_filter("entropy")
def _entropy_filter(entropy, correct, eligible, threshold, rng):
  del correct, rng
  return eligible & (entropy >= threshold)


@register_filter("proxy_miss")
def _proxy_miss_filter(entropy, correct, eligible, threshold, rng):
  del entropy, threshold, rng
  return eligible & ~correct


@register_filter("random")
def _random_filter(entropy, correct, eligible, threshold, rng):
  count = int(np.sum(_entropy_filter(entropy, correct, eligible, threshold, rng)))
  keep = np.zeros_like(eligible)
  keep[rng.choice(np.flatnonzero(eligible), size=count, replace=False)] = True
  return keep


@register_filter("all")
def _all_filter(entropy, correct, eligible, threshold, rng):
  del entropy, correct, threshold, rng
  return eligible.copy()


get_filter = FILTERS.get


def document_rng(seed: int, doc_id: int) -> np.random.Generator:
  """The seeded generator of one document (filters and position sub-sampling)."""
  return np.random.Generator(np.random.PCG64([seed, doc_id]))


def select_positions(entropy_T: np.ndarray, correct_T: np.ndarray, *, filter_name: str,
                     threshold: float, min_context_tokens: int, rng: np.random.Generator,
                     max_positions: int | None = None) -> np.ndarray:
  """Positions of one document kept by filter `filter_name`, ascending.

  Args:
    entropy_T: float [T] top-k entropy per target position (NaN where not scored).
    correct_T: bool [T] whether the proxy's argmax equals the token.
    filter_name: a name in `FILTERS`.
    threshold: entropy threshold (the `entropy` and `random` filters).
    min_context_tokens: positions with fewer tokens before them are never kept.
    rng: the document's generator (`document_rng`).
    max_positions: keep at most this many, drawn uniformly (None: no cap).

  Returns:
    int64 [K] kept positions.
  """
  entropy_T = np.asarray(entropy_T, np.float32)
  eligible = (np.arange(len(entropy_T)) >= max(1, min_context_tokens)) & np.isfinite(entropy_T)
  keep = get_filter(filter_name)(entropy_T, np.asarray(correct_T, bool), eligible, threshold, rng)
  positions = np.flatnonzero(keep)
  if max_positions is not None and len(positions) > max_positions:
    positions = np.sort(rng.choice(positions, size=max_positions, replace=False))
  return positions


def difficulty_buckets(entropy: np.ndarray,
                       thresholds: Sequence[float] = DEFAULT_BUCKET_THRESHOLDS) -> np.ndarray:
  """Bucket = how many thresholds the entropy strictly exceeds (int8, same shape)."""
  entropy = np.asarray(entropy, np.float32)
  return np.sum(entropy[..., None] > np.asarray(thresholds, np.float32), axis=-1).astype(np.int8)
