# Over ~400 lines: measuring, summarising by split and by kind share one set of positions.
"""Evaluation: next-token accuracy by difficulty (the paper's Table 1).

This module owns the held-out evaluation of a policy on prepared position records:

- `load_eval_positions`: the records of one split of a prepared folder, in a deterministic order.
- Difficulty splits (nested, PAPER.md): a record's `bucket` counts the manifest's
  `bucket_thresholds` its proxy entropy strictly exceeds, so with the paper's (0.5, 1.0, 1.5)
  easy = bucket >= 1, medium = bucket >= 2, hard = bucket >= 3; plus `all` (every record).
- Two modes. `standard_accuracy`: the argmax of the model's next-token logits after the raw
  context equals the true next token (compared as BYTES, so a different id spelling the same
  bytes counts). `reasoning_accuracy`: the policy is prompted (template + chat template), samples
  `num_samples` answers, and each is scored with `rpt_jax.rl.reward.score_rollouts`; the paper's
  metric is the reward of ONE sampled answer (the first sample), reported with the mean over
  samples, pass@k (unbiased estimator), the format rate and the mean response length.
- `measure` -> per-position results (`Measured`); `summarize` -> a JSON-able report
  {split: {metric: value}} in percent (`evaluate` = both); `breakdown` -> the same metrics per
  kind of position (e.g. the synthetic corpus's line kinds: where reasoning wins);
  `rpt_jax.report` writes, tabulates and plots them, `rpt_jax.scaling` fits the curve across
  checkpoints.
- Thought length: the generated tokens before `</think>` (the whole response when it never
  closes its thought), a measure of how much work a response does.

Metrics of a split with no position are None (JSON null), never NaN.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from rpt_jax import mesh as mesh_lib
from rpt_jax.errors import InputError
from rpt_jax.data.pipeline import read_manifest
from rpt_jax.data.records import SPLITS, PositionRecord, read_shard
from rpt_jax.rl import prompts
from rpt_jax.rl import reward as reward_lib

MODES = ("standard", "reasoning")
SPLIT_NAMES = ("easy", "medium", "hard")  # names of buckets >= 1, 2, 3 (the paper's three)


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """What `evaluate` runs.

  Attributes:
    max_positions: evaluate a seeded random subset of this many records (None: all).
    num_samples: sampled answers per position (n of pass@k).
    pass_k: the k of each reported pass@k (each <= num_samples).
    temperature: sampling temperature (0: greedy); the paper does not state its evaluation
      temperature, so the default is its training one.
    max_new_tokens: response budget in tokens.
    template: prompt template name (`rpt_jax.rl.prompts.TEMPLATES`).
    reward: reward name (`rpt_jax.rl.reward.REWARDS`), one that needs no model probabilities.
    batch_size: contexts per device call (standard: rows; reasoning: contexts, x num_samples
      rows).
    prompt_buckets: increasing static prompt lengths; longer prompts lose context tokens from
      their start.
    length_multiple: standard mode pads contexts to a multiple of this many tokens.
    modes: which of `MODES` to run.
    seed: seeds the subset choice of `max_positions`.
  """

  max_positions: int | None = None
  num_samples: int = 1
  pass_k: tuple[int, ...] = (1,)
  temperature: float = 0.8
  max_new_tokens: int = 1024
  template: str = "v0"
  reward: str = "prefix_match"
  batch_size: int = 8
  prompt_buckets: tuple[int, ...] = (512, 1024, 2048)
  length_multiple: int = 64
  modes: tuple[str, ...] = MODES
  seed: int = 0

  def __post_init__(self):
    for name in ("pass_k", "prompt_buckets", "modes"):
      object.__setattr__(self, name, tuple(getattr(self, name)))
    if self.max_positions is not None and self.max_positions < 1:
      raise ValueError(f"eval max_positions={self.max_positions}: use None (all) or >= 1.")
    for name in ("num_samples", "max_new_tokens", "batch_size", "length_multiple"):
      if getattr(self, name) < 1:
        raise ValueError(f"eval {name}={getattr(self, name)} must be >= 1.")
    if any(not 1 <= k <= self.num_samples for k in self.pass_k) or len(set(self.pass_k)) != len(
        self.pass_k):
      raise ValueError(f"eval pass_k={self.pass_k}: each k must be distinct and in [1, "
                       f"num_samples={self.num_samples}]; raise num_samples or drop that k.")
    if not self.temperature >= 0:
      raise ValueError(f"eval temperature={self.temperature} must be >= 0 (0 = greedy).")
    b = self.prompt_buckets
    if not b or b[0] < 1 or any(y <= x for x, y in zip(b, b[1:])):
      raise ValueError(f"eval prompt_buckets={b} must be increasing positive lengths.")
    if not self.modes or set(self.modes) - set(MODES):
      raise ValueError(f"eval modes={self.modes}: choose a non-empty subset of {MODES}.")
    prompts.get_template(self.template)  # Raises for an unknown name.
    if reward_lib.get_reward(self.reward).needs_first_token_prob:
      raise ValueError(f"eval reward={self.reward!r} needs the policy's first-token "
                       "probabilities; evaluate with 'prefix_match' or 'first_token'.")


# ---- data -------------------------------------------------------------------------------------

def load_eval_positions(records_dir: str, *, split: str = "eval", max_positions: int | None = None,
                        seed: int = 0) -> list[PositionRecord]:
  """The records of `split`, in manifest file order then record order within each shard.

  With `max_positions` (fewer than the split holds), a seeded uniform subset of that size is
  kept, still in file order: a pure function of (folder, split, max_positions, seed) that is
  spread over all documents instead of favouring the first shard.
  """
  if split not in SPLITS:
    raise ValueError(f"split {split!r} is unknown; choose one of {SPLITS}.")
  manifest = read_manifest(records_dir)
  files = manifest["files"][split]
  if not files:
    raise InputError(f"{records_dir!r} has no {split!r} records (see its manifest counts); "
                     "prepare with data.eval_fraction > 0 or a corpus of more documents.")
  positions = [r for f in files for r in read_shard(os.path.join(records_dir, f))]
  if max_positions is not None and max_positions < len(positions):
    keep = np.sort(np.random.default_rng(seed).permutation(len(positions))[:max_positions])
    positions = [positions[i] for i in keep]
  return positions


def bucket_thresholds(records_dir: str) -> tuple[float, ...]:
  """The entropy thresholds (nats) the records' `bucket` counts, from the manifest."""
  return tuple(float(t) for t in read_manifest(records_dir)["identity"]["config"][
      "bucket_thresholds"])


def difficulty_splits(thresholds: Sequence[float]) -> dict[str, tuple[int, float | None]]:
  """split name -> (min bucket, entropy threshold): easy/medium/hard for the first three
  thresholds (`entropy>{t}` beyond), then `all` (min bucket 0)."""
  out = {}
  for i, t in enumerate(thresholds):
    out[SPLIT_NAMES[i] if i < len(SPLIT_NAMES) else f"entropy>{t:g}"] = (i + 1, float(t))
  out["all"] = (0, None)
  return out


# ---- standard next-token prediction -------------------------------------------------------------

def _batches(order: np.ndarray, batch_size: int):
  for start in range(0, len(order), batch_size):
    yield order[start:start + batch_size]


@functools.lru_cache(maxsize=8)
def _argmax_fn(graphdef, out_sharding):
  """Jitted (state, tokens_BL, lengths_B) -> argmax_B, cached per model structure so evaluating
  successive checkpoints (new `params`) reuses the compiled program."""

  def predict(state, tokens_BL, lengths_B):
    model = nnx.merge(graphdef, state)
    mask_BL = jnp.arange(tokens_BL.shape[1])[None, :] < lengths_B[:, None]
    hidden_BLD, _ = model.hidden_states(tokens_BL, None, mask_BL)
    last_BD = jnp.take_along_axis(hidden_BLD, (lengths_B - 1)[:, None, None], axis=1)[:, 0]
    return jnp.argmax(model.logits(last_BD[:, None, :])[:, 0], axis=-1)

  return jax.jit(predict, out_shardings=out_sharding)


def standard_accuracy(model: nnx.Module, tokenizer, positions: Sequence[PositionRecord], *,
                      batch_size: int, mesh: jax.sharding.Mesh | None = None,
                      rules: mesh_lib.ShardingRules | None = None, params: Any = None,
                      length_multiple: int = 64) -> np.ndarray:
  """bool [P]: the model's argmax after each raw context spells the true next token's bytes.

  Contexts are right-padded to a multiple of `length_multiple` (positions sorted by length, so a
  batch pads little; one compile per length bucket) and the batch to `batch_size` rows; only the
  last real position's hidden state is unembedded ([B, V], never [B, L, V]). With a mesh, rows
  go over ('data', 'fsdp'), params per their logical axes, and the argmax comes back replicated
  (readable on every process). `params`: a state like `nnx.split(model)[1]` to use instead.
  """
  if not positions:
    return np.zeros(0, bool)
  graphdef, state = nnx.split(model)
  state = state if params is None else params
  in_shardings = out_sharding = None
  if mesh is not None:
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch_size % shards:
      raise ValueError(f"eval batch_size={batch_size} is not a multiple of the mesh's data x fsdp "
                       f"size {shards}.")
    rules = rules or mesh_lib.ShardingRules()
    state = jax.device_put(state, mesh_lib.state_shardings(state, mesh, rules))  # no-op if placed
    in_shardings = (rules.sharding(mesh, ("batch", None)), rules.sharding(mesh, ("batch",)))
    out_sharding = NamedSharding(mesh, PartitionSpec())
  predict = _argmax_fn(graphdef, out_sharding)
  lengths = np.array([len(p.context_ids) for p in positions])
  if lengths.min() < 1:
    raise ValueError("a record has an empty context; standard prediction needs >= 1 token.")
  correct = np.zeros(len(positions), bool)
  for rows in _batches(np.argsort(lengths, kind="stable"), batch_size):
    width = -(-int(lengths[rows].max()) // length_multiple) * length_multiple
    tokens = np.full((batch_size, width), tokenizer.pad_id, np.int32)
    lens = np.ones(batch_size, np.int32)  # dummy rows: one pad token, result dropped
    for j, i in enumerate(rows):
      tokens[j, :lengths[i]] = positions[i].context_ids
      lens[j] = lengths[i]
    if in_shardings is not None:
      tokens, lens = jax.device_put((tokens, lens), in_shardings)
    argmax = np.asarray(predict(state, tokens, lens))
    for j, i in enumerate(rows):
      first = positions[i].completion[:int(positions[i].boundaries[0])]
      correct[i] = tokenizer.token_bytes(int(argmax[j])) == first
  return correct


# ---- next-token reasoning -----------------------------------------------------------------------

def pass_at_k(n: int, c: int, k: int) -> float:
  """Unbiased pass@k = 1 - C(n-c, k) / C(n, k) (n samples, c correct), as a stable product."""
  if not 0 <= c <= n or not 1 <= k <= n:
    raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n; got n={n}, c={c}, k={k}.")
  if n - c < k:
    return 1.0
  return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))


def _host(x) -> np.ndarray:
  """The whole value of a (possibly multi-process, batch-sharded) array on every process."""
  if not isinstance(x, jax.Array) or x.is_fully_addressable:
    return np.asarray(x)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def thought_length(tokenizer, response: str, response_tokens: int) -> int:
  """Tokens of `response` before its first `</think>`; all `response_tokens` if it has none."""
  at = response.find(prompts.THINK_END)
  return response_tokens if at < 0 else len(tokenizer.encode(response[:at]))


def reasoning_accuracy(sampler, tokenizer, positions: Sequence[PositionRecord], *,
                       num_samples: int = 1, temperature: float, max_new_tokens: int,
                       template: str = "v0", reward: str = "prefix_match", rng: jax.Array,
                       batch_size: int, params: Any = None, prompt_buckets: Sequence[int],
                       pass_k: Sequence[int] = (1,)) -> dict[str, Any]:
  """Samples `num_samples` answers per position and scores them; per-position arrays [P].

  Prompts are right-padded with the tokenizer's pad id to the smallest bucket holding the
  batch's longest prompt; the last batch is filled with copies of its first prompt whose outputs
  are dropped. Batch b samples with `jax.random.fold_in(rng, b)`.

  Returns:
    {'accuracy': float [P] (correct of the first sample: the paper's metric),
     'mean_reward': float [P], 'pass@k': float [P] per k, 'format_rate': float [P] (fraction
     of samples with a non-empty answer), 'response_length': float [P] (mean generated tokens,
     incl. the stop token), 'thought_length': float [P] (mean tokens before `</think>`),
     'num_correct': int [P], 'truncated': bool [P],
     'first_response': list[str] (the first sample's text, for inspection)}
  """
  n, buckets = len(positions), tuple(int(b) for b in prompt_buckets)
  stop_ids = tuple(int(i) for i in tokenizer.stop_ids)
  built = [prompts.fitted_prompt_ids(p.context_ids, tokenizer, template, buckets[-1])
           for p in positions]
  rewards = np.zeros((n, num_samples), np.float32)
  correct = np.zeros((n, num_samples), bool)
  formatted = np.zeros((n, num_samples), bool)
  lengths = np.zeros((n, num_samples), np.float64)
  thoughts = np.zeros((n, num_samples), np.float64)
  first_response = [""] * n
  order = np.argsort([len(ids) for ids, _ in built], kind="stable")  # similar lengths together
  for b, rows in enumerate(_batches(order, batch_size)):
    rows = list(rows)
    width = next(x for x in buckets if x >= max(len(built[i][0]) for i in rows))
    filled = rows + [rows[0]] * (batch_size - len(rows))
    tokens = np.full((batch_size, width), tokenizer.pad_id, np.int32)
    prompt_lengths = np.zeros(batch_size, np.int32)
    for j, i in enumerate(filled):
      tokens[j, :len(built[i][0])] = built[i][0]
      prompt_lengths[j] = len(built[i][0])
    out = sampler.generate(tokens, prompt_lengths, num_samples=num_samples,
                           max_new_tokens=max_new_tokens, temperature=temperature,
                           eos_ids=stop_ids, rng=jax.random.fold_in(rng, b), params=params)
    # Context j owns rows j*G .. j*G+G-1; rows past the real contexts are dropped.
    real = len(rows) * num_samples
    out_tokens, out_lengths, out_done = (_host(x)[:real] for x in (out.tokens, out.lengths,
                                                                    out.done))
    texts = prompts.response_texts(tokenizer, out_tokens, out_lengths, out_done)
    lens = [int(n) for n in out_lengths]
    completions = [positions[i].completion for i in rows for _ in range(num_samples)]
    bounds = [positions[i].boundaries.tolist() for i in rows for _ in range(num_samples)]
    scored = reward_lib.score_rollouts(texts, completions, bounds, reward=reward,
                                       response_lengths=lens)
    shape = (len(rows), num_samples)
    rewards[rows] = scored.rewards.reshape(shape)
    correct[rows] = scored.correct.reshape(shape)
    formatted[rows] = scored.has_prediction.reshape(shape)
    lengths[rows] = np.asarray(lens, np.float64).reshape(shape)
    thoughts[rows] = np.asarray([thought_length(tokenizer, t, n) for t, n in zip(texts, lens)],
                                np.float64).reshape(shape)
    for j, i in enumerate(rows):
      first_response[i] = texts[j * num_samples]
  num_correct = correct.sum(axis=1)
  result = {"accuracy": correct[:, 0].astype(np.float64), "mean_reward": rewards.mean(axis=1),
            "format_rate": formatted.mean(axis=1), "response_length": lengths.mean(axis=1),
            "thought_length": thoughts.mean(axis=1),
            "num_correct": num_correct, "truncated": np.array([t for _, t in built], bool),
            "first_response": first_response}
  for k in pass_k:
    result[f"pass@{k}"] = np.array([pass_at_k(num_samples, int(c), k) for c in num_correct])
  return result


# ---- the report ---------------------------------------------------------------------------------

def _mean(values: np.ndarray | None, mask: np.ndarray, scale: float = 100.0) -> float | None:
  """scale x mean of values[mask] (percent by default); None if not measured or empty."""
  if values is None or not mask.any():
    return None
  return float(scale * np.mean(values[mask], dtype=np.float64))


@dataclasses.dataclass
class Measured:
  """Per-position results of one evaluation: `positions` [P], `standard` bool [P] (None: not
  run), `reasoning` (`reasoning_accuracy`'s dict; None: not run)."""

  positions: list[PositionRecord]
  standard: np.ndarray | None
  reasoning: dict[str, Any] | None


def measure(model: nnx.Module | None, tokenizer, sampler, records_dir: str, *,
            config: EvalConfig, rng: jax.Array, mesh: jax.sharding.Mesh | None = None,
            params: Any = None, split: str = "eval") -> Measured:
  """Runs `config.modes` on the held-out records of `records_dir` (see `evaluate`)."""
  positions = load_eval_positions(records_dir, split=split, max_positions=config.max_positions,
                                  seed=config.seed)
  standard = reasoning = None
  if "standard" in config.modes:
    standard = standard_accuracy(model, tokenizer, positions, batch_size=config.batch_size,
                                 mesh=mesh, params=params, length_multiple=config.length_multiple)
  if "reasoning" in config.modes:
    reasoning = reasoning_accuracy(
        sampler, tokenizer, positions, num_samples=config.num_samples,
        temperature=config.temperature, max_new_tokens=config.max_new_tokens,
        template=config.template, reward=config.reward, rng=rng, batch_size=config.batch_size,
        params=params, prompt_buckets=config.prompt_buckets, pass_k=config.pass_k)
  return Measured(positions, standard, reasoning)


def _metrics(m: Measured, mask: np.ndarray, pass_k: Sequence[int]) -> dict[str, Any]:
  """The report's metrics over the positions in `mask` (bool [P])."""
  r = m.reasoning or {}
  proxy = np.array([p.proxy_correct for p in m.positions])
  return {
      "num_positions": int(mask.sum()),
      "proxy_accuracy": _mean(proxy, mask), "standard_accuracy": _mean(m.standard, mask),
      "reasoning_accuracy": _mean(r.get("accuracy"), mask),
      "reasoning_mean_reward": _mean(r.get("mean_reward"), mask),
      **{f"pass@{k}": _mean(r.get(f"pass@{k}"), mask) for k in pass_k},
      "format_rate": _mean(r.get("format_rate"), mask),
      "mean_response_length": _mean(r.get("response_length"), mask, scale=1.0),
      "mean_thought_length": _mean(r.get("thought_length"), mask, scale=1.0),
      "truncated_prompts": int(r["truncated"][mask].sum()) if r else None}


def summarize(m: Measured, thresholds: Sequence[float],
              pass_k: Sequence[int] = (1,)) -> dict[str, dict[str, Any]]:
  """{split name: metrics} for the difficulty splits of `thresholds` (see `evaluate`)."""
  buckets = np.array([p.bucket for p in m.positions])
  report = {}
  for name, (min_bucket, threshold) in difficulty_splits(thresholds).items():
    metrics = _metrics(m, buckets >= min_bucket, pass_k)
    report[name] = {"num_positions": metrics.pop("num_positions"), "entropy_above": threshold,
                    **metrics}
  return report


def breakdown(m: Measured, kind_of: Callable[[PositionRecord], str], thresholds: Sequence[float],
              splits: Sequence[str] = ("hard", "all")) -> dict[str, dict[str, dict[str, Any]]]:
  """{split: {kind: metrics}}: the report's metrics per kind of position (`kind_of(record)`),
  kinds sorted by name (the order their JSON file, written with sorted keys, reads back in), for
  the named difficulty splits."""
  kinds = np.array([kind_of(p) for p in m.positions], dtype=object)
  buckets = np.array([p.bucket for p in m.positions])
  out = {}
  for name, (min_bucket, _) in difficulty_splits(thresholds).items():
    if name not in splits:
      continue
    in_split = buckets >= min_bucket
    out[name] = {kind: _metrics(m, in_split & (kinds == kind), ())
                 for kind in sorted(set(kinds[in_split].tolist()))}
  return out


def evaluate(model: nnx.Module | None, tokenizer, sampler, records_dir: str, *,
             config: EvalConfig, rng: jax.Array, mesh: jax.sharding.Mesh | None = None,
             params: Any = None, split: str = "eval") -> dict[str, dict[str, Any]]:
  """Runs `config.modes` on the held-out records; returns {split_name: metrics}.

  Each split entry: num_positions, entropy_above (None for `all`), and in percent (None when the
  mode did not run or the split is empty): proxy_accuracy (the data-preparation proxy's argmax
  was right: the share a model gets without reasoning), standard_accuracy, reasoning_accuracy,
  reasoning_mean_reward, pass@k for each k, format_rate; plus mean_response_length and
  mean_thought_length (tokens) and truncated_prompts (count). `model` is needed for 'standard',
  `sampler` for 'reasoning'.
  Multi-process: every process evaluates the same positions with the same inputs and gets the
  same report; write it from process 0 only. Passing the same `rng` at every checkpoint gives
  common random numbers across checkpoints (less noise in their differences).
  """
  return summarize(measure(model, tokenizer, sampler, records_dir, config=config, rng=rng,
                           mesh=mesh, params=params, split=split),
                   bucket_thresholds(records_dir), config.pass_k)
