# Over ~400 lines: three row kinds (plain, reasoning, skill) share one batch builder; next split.
"""Plain next-token pretraining from scratch, mixed with formatted next-token-reasoning examples.

Owns the `pretrain` mode: it turns a random policy into one that models the corpus AND already
answers RPT prompts in the RPT format (the paper starts from R1-Distill-Qwen, which reasons and
boxes answers; a tiny offline model has to be taught that). Rows of a batch, one kind per row:

  plain      a chunk (<= seq_len tokens) of ONE document, EOS after the document's last token,
             right-padded; loss on every real target. No packing: the model's attention has no
             segment ids, so packed documents would attend to each other.
  reasoning  a (document, position t): `build_prompt_ids` of the context (the <= max_context_tokens
             tokens before t, decoded as the data pipeline does), then
             `format_response(thought, answer)` + EOS, `answer` being token t's exact bytes in the
             document (what the prefix-matching reward compares); loss ONLY on the response.
             Skipped (counted in `PretrainBatches.skipped`): answers that do not round-trip
             through `extract_prediction` (unbalanced braces, `</think>`), empty or newline-only
             answers, answers splitting a UTF-8 character, examples longer than seq_len.
  skill      worked problems (`rpt_jax.data.skills`), as many as fit, one after another (a
             multi-turn chat): each the chat template around the problem as the user turn (NOT
             the next-token-reasoning template), then `format_response(work, result)` + EOS;
             loss ONLY on the responses. Operands grow from 1 digit to the corpus's
             `max_digits` over the run (a curriculum). This is the reasoning the policy can do
             before RPT; RPT has to learn to use it on documents.

The documents are the TRAINING documents only: `train_documents` drops the held-out ones (the
same seeded split `rpt_jax.data.prepare` uses), so no evaluated text is ever trained on.

Every row starts at position 0, as prompts do at sampling time. Batch s is a pure function of
(documents, tokenizer, config, s): round((s+1) B f) - round(s B f) reasoning rows (exact long-run
share f; skill rows likewise with their share), drawn with a generator seeded by (seed, s); plain
chunks in order of per-epoch seeded permutations; the i-th skill row overall holds examples
i * 64, i * 64 + 1, ... of the stream seeded by `seed`. The train step is one jitted pure
function of (params, opt_state, batch), state donated; with a mesh, params/moments keep the
`state_shardings` layout and the batch is split over the 'batch' rule. Loss: masked mean NLL
from `token_logprobs_and_entropy` on the final hidden states (chunked, vocab-parallel: no
[B, L, V] logits). AdamW (decay on matrices only), linear
warmup then cosine decay, global-norm clipping.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from rpt_jax import mesh as mesh_lib
from rpt_jax import tokenizer as tokenizer_lib
from rpt_jax.data import records as records_lib
from rpt_jax.data import skills as skills_lib
from rpt_jax.data import synthetic
from rpt_jax.rl import loss as loss_lib
from rpt_jax.rl import optim
from rpt_jax.rl import prompts

_MAX_DRAWS_PER_EXAMPLE = 64  # rejection-sampling budget before a clear error


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
  """Pretraining settings (validated).

  Attributes:
    steps: optimiser steps.
    batch_size: rows per step (global); a multiple of data x fsdp when sharded.
    seq_len: tokens per row.
    learning_rate: peak AdamW learning rate (after warmup).
    warmup_steps: linear warmup from 0; then cosine decay to `end_learning_rate_fraction` x peak.
    end_learning_rate_fraction: final learning rate / peak.
    weight_decay: AdamW decay, applied to matrices only (not norms and biases).
    b1, b2: Adam betas.
    grad_clip_norm: global-norm clip (0: off).
    reasoning_example_fraction: share of rows that are formatted reasoning examples, in [0, 1].
    skill_example_fraction: share of rows that are worked skill examples (each row as many
      examples as fit, a multi-turn chat); the two shares sum to <= 1 (the rest are plain rows).
    thought: the fixed chain-of-thought text of the examples (must not hold `</think>`).
    template: prompt template name (`rpt_jax.rl.prompts.TEMPLATES`).
    max_context_tokens: most document tokens before the position put in an example's context.
    min_context_tokens: positions with fewer tokens before them are not used (>= 1).
    seed: seeds the batch stream (documents order, example positions).
    log_every: report metrics every this many steps (and at the last step).
    chunk_size: positions per chunk of the log-prob computation.
  """

  steps: int = 300
  batch_size: int = 32
  seq_len: int = 256
  learning_rate: float = 1e-3
  warmup_steps: int = 50
  end_learning_rate_fraction: float = 0.1
  weight_decay: float = 0.01
  b1: float = 0.9
  b2: float = 0.95
  grad_clip_norm: float = 1.0
  reasoning_example_fraction: float = 0.5
  skill_example_fraction: float = 0.0
  thought: str = "Let me work out the next token."
  template: str = "v0"
  max_context_tokens: int = 64
  min_context_tokens: int = 8
  seed: int = 0
  log_every: int = 10
  chunk_size: int = 256

  def __post_init__(self):
    checks = (
        ("steps", self.steps >= 1, ">= 1"), ("batch_size", self.batch_size >= 1, ">= 1"),
        ("seq_len", self.seq_len >= 2, ">= 2 (a token and its target)"),
        ("learning_rate", self.learning_rate > 0, "> 0"),
        ("warmup_steps", self.warmup_steps >= 0, ">= 0"),
        ("end_learning_rate_fraction", 0 <= self.end_learning_rate_fraction <= 1, "in [0, 1]"),
        ("weight_decay", self.weight_decay >= 0, ">= 0"), ("b1", 0 <= self.b1 < 1, "in [0, 1)"),
        ("b2", 0 <= self.b2 < 1, "in [0, 1)"),
        ("grad_clip_norm", self.grad_clip_norm >= 0, ">= 0 (0 = no clipping)"),
        ("reasoning_example_fraction", 0 <= self.reasoning_example_fraction <= 1, "in [0, 1]"),
        ("skill_example_fraction", 0 <= self.skill_example_fraction
         <= 1 - self.reasoning_example_fraction,
         "in [0, 1 - reasoning_example_fraction]"),
        ("max_context_tokens", self.max_context_tokens >= 1, ">= 1"),
        ("min_context_tokens", self.min_context_tokens >= 1, ">= 1"),
        ("log_every", self.log_every >= 1, ">= 1"), ("chunk_size", self.chunk_size >= 1, ">= 1"))
    for name, ok, rule in checks:
      if not ok:
        raise ValueError(f"pretrain.{name}={getattr(self, name)!r} must be {rule}.")
    if prompts.THINK_END in self.thought:
      raise ValueError(f"pretrain.thought must not contain {prompts.THINK_END!r}: the answer "
                       "after it would be lost.")
    prompts.get_template(self.template)  # raises naming the registered templates


@dataclasses.dataclass
class PretrainBatch:
  """One batch (numpy, host side). B = batch_size, L = seq_len.

  Attributes:
    tokens: int32 [B, L], right-padded with the tokenizer's pad id.
    loss_mask: float32 [B, L]; [b, t] = 1 where the loss predicts tokens[b, t + 1] from position
      t (the targets are the tokens shifted left; the last column is always 0).
    attention_mask: int32 [B, L], 1 for real tokens.
    positions: int32 [B, L], arange(L) in every row.
    is_reasoning: bool [B], True for reasoning-example rows.
    is_skill: bool [B], True for skill-example rows.
  """

  tokens: np.ndarray
  loss_mask: np.ndarray
  attention_mask: np.ndarray
  positions: np.ndarray
  is_reasoning: np.ndarray
  is_skill: np.ndarray

  def as_dict(self) -> dict[str, np.ndarray]:
    return dataclasses.asdict(self)


def train_documents(documents: Sequence[str], eval_fraction: float, seed: int) -> list[str]:
  """The documents `rpt_jax.data.prepare` puts in its 'train' split (document i is doc_id i):
  pretraining never sees a held-out document."""
  return [d for i, d in enumerate(documents)
          if records_lib.document_split(i, eval_fraction, seed) == "train"]


def _cumulative(step: int, per_step: float) -> int:
  """Rows of one kind in batches 0..step-1: round(step x per_step), exact long-run."""
  return int(np.floor(step * per_step + 0.5))


class PretrainBatches:
  """Deterministic host-side batch builder (see the module docstring); `batch(step)` is pure."""

  def __init__(self, tokenizer: tokenizer_lib.Tokenizer, documents: Sequence[str],
               config: PretrainConfig):
    self.tokenizer, self.config = tokenizer, config
    self._ids: list[np.ndarray] = []
    self._bytes: list[bytes] = []
    self._starts: list[np.ndarray] = []  # byte offset where token i starts (len + 1 entries)
    chunks = []  # (document, first token) of each plain chunk
    candidates = []  # (document, position) pairs with enough context
    for d, text in enumerate(documents):
      ids, spans = tokenizer.encode_with_byte_spans(text)
      if not ids:
        continue
      self._ids.append(np.asarray(ids + [tokenizer.eos_id], np.int32))
      self._bytes.append(text.encode("utf-8"))
      self._starts.append(np.asarray([s for s, _ in spans] + [spans[-1][1]], np.int64))
      doc = len(self._ids) - 1
      n = len(self._ids[doc])
      chunks.extend((doc, start) for start in range(0, n - 1, config.seq_len))
      first = max(1, config.min_context_tokens)
      candidates.extend((doc, t) for t in range(first, len(ids)))
    if not self._ids:
      raise ValueError("pretraining got no non-empty documents.")
    self._chunks = np.asarray(chunks, np.int64).reshape(-1, 2)
    self._candidates = np.asarray(candidates, np.int64).reshape(-1, 2)
    if config.reasoning_example_fraction > 0 and not len(self._candidates):
      raise ValueError(f"no document has more than min_context_tokens="
                       f"{config.min_context_tokens} tokens, so no reasoning example can be "
                       "built; lower pretrain.min_context_tokens or use longer documents.")
    self._permutations: dict[int, np.ndarray] = {}
    self.skipped = {"bad_answer": 0, "bad_utf8": 0, "too_long": 0}

  def num_reasoning_rows(self, step: int) -> int:
    """Reasoning rows in batch `step`: the cumulative count round(s B f) is exact long-run."""
    per_step = self.config.batch_size * self.config.reasoning_example_fraction
    return _cumulative(step + 1, per_step) - _cumulative(step, per_step)

  def num_skill_rows(self, step: int) -> int:
    """Skill rows in batch `step` (the same rule with `skill_example_fraction`)."""
    per_step = self.config.batch_size * self.config.skill_example_fraction
    return _cumulative(step + 1, per_step) - _cumulative(step, per_step)

  def skill_row(self, index: int) -> list[tuple[list[int], list[int]]]:
    """The (prompt_ids, response_ids + EOS) of skill row `index`: skill examples
    `index * _MAX_DRAWS_PER_EXAMPLE + k`, k = 0, 1, ..., one after another (a multi-turn chat)
    while they fit seq_len (examples too long for an empty row are skipped)."""
    tok, row, used = self.tokenizer, [], 0
    # A curriculum: operands of 1 digit in the first 1/D of the skill rows, up to 2 in the next
    # 1/D, ... (D = the corpus's max_digits): one-digit facts are learnt in a few hundred steps
    # alone, and the longer problems build on them.
    most = synthetic.SyntheticConfig.max_digits
    total = max(_cumulative(self.config.steps, self.config.batch_size
                            * self.config.skill_example_fraction), 1)
    digits = min(most, 1 + most * index // total)
    for k in range(_MAX_DRAWS_PER_EXAMPLE):
      ex = skills_lib.skill_example(self.config.seed, index * _MAX_DRAWS_PER_EXAMPLE + k,
                                    max_digits=digits)
      prompt_ids = list(tok.encode(tok.apply_chat_template(ex.problem)))
      response_ids = list(tok.encode(prompts.format_response(ex.thought, ex.answer)))
      response_ids.append(tok.eos_id)
      size = len(prompt_ids) + len(response_ids)
      if used + size > self.config.seq_len:
        if row:
          return row
        self.skipped["too_long"] += 1
        continue
      row.append((prompt_ids, response_ids))
      used += size
    if not row:
      raise ValueError(f"no skill example fits pretrain.seq_len={self.config.seq_len} in "
                       f"{_MAX_DRAWS_PER_EXAMPLE} draws; raise pretrain.seq_len.")
    return row

  def example(self, doc: int, position: int) -> tuple[list[int], list[int]] | None:
    """(prompt_ids, response_ids) predicting token `position` of document `doc`, or None (and
    counted in `skipped`) when the example must be skipped. response_ids end with EOS."""
    cfg, tok = self.config, self.tokenizer
    starts, data = self._starts[doc], self._bytes[doc]
    try:
      answer = data[starts[position]:starts[position + 1]].decode("utf-8")
    except UnicodeDecodeError:  # a byte-fallback token holding part of a character
      self.skipped["bad_utf8"] += 1
      return None
    if not answer or (not answer.strip() and "\n" in answer):
      self.skipped["bad_answer"] += 1
      return None
    context_ids = self._ids[doc][max(0, position - cfg.max_context_tokens):position]
    context = tok.decode(context_ids.tolist())
    try:
      user, response = prompts.format_reasoning_example(context, cfg.thought, answer,
                                                        cfg.template)
    except ValueError:  # unbalanced braces or `</think>`: cannot be stated in \boxed{}
      self.skipped["bad_answer"] += 1
      return None
    prompt_ids = list(tok.encode(tok.apply_chat_template(user)))
    response_ids = list(tok.encode(response)) + [tok.eos_id]
    if len(prompt_ids) + len(response_ids) > cfg.seq_len:
      self.skipped["too_long"] += 1
      return None
    return prompt_ids, response_ids

  def _plain_chunk(self, index: int) -> tuple[int, int]:
    """The `index`-th plain chunk of the stream of per-epoch seeded permutations."""
    epoch, offset = divmod(index, len(self._chunks))
    if epoch not in self._permutations:
      if len(self._permutations) > 2:
        self._permutations.clear()
      rng = np.random.default_rng([self.config.seed, 0, epoch])
      self._permutations[epoch] = rng.permutation(len(self._chunks))
    doc, start = self._chunks[self._permutations[epoch][offset]]
    return int(doc), int(start)

  def batch(self, step: int) -> PretrainBatch:
    """Batch `step` (>= 0): reasoning rows first, then skill rows, then plain rows."""
    cfg = self.config
    b, l = cfg.batch_size, cfg.seq_len
    tokens = np.full((b, l), self.tokenizer.pad_id, np.int32)
    loss_mask = np.zeros((b, l), np.float32)
    attention_mask = np.zeros((b, l), np.int32)
    is_reasoning = np.zeros((b,), bool)
    is_skill = np.zeros((b,), bool)
    n_reasoning, n_skill = self.num_reasoning_rows(step), self.num_skill_rows(step)
    rng = np.random.default_rng([cfg.seed, 1, step])
    for row in range(n_reasoning):
      for _ in range(_MAX_DRAWS_PER_EXAMPLE):
        doc, position = self._candidates[rng.integers(len(self._candidates))]
        built = self.example(int(doc), int(position))
        if built is not None:
          break
      else:
        raise ValueError(
            f"no valid reasoning example in {_MAX_DRAWS_PER_EXAMPLE} draws (skipped so far: "
            f"{self.skipped}); if 'too_long' dominates, raise pretrain.seq_len={l} or lower "
            f"max_context_tokens={cfg.max_context_tokens} / use a shorter template than "
            f"{cfg.template!r}.")
      self._put_example(row, [built], tokens, attention_mask, loss_mask)
      is_reasoning[row] = True
    skills_before = _cumulative(step, b * cfg.skill_example_fraction)
    for k, row in enumerate(range(n_reasoning, n_reasoning + n_skill)):
      self._put_example(row, self.skill_row(skills_before + k), tokens, attention_mask,
                        loss_mask)
      is_skill[row] = True
    first_plain = n_reasoning + n_skill
    if first_plain < b and not len(self._chunks):
      raise ValueError("no document has 2 or more tokens for plain rows.")
    plain_before = (step * b - _cumulative(step, b * cfg.reasoning_example_fraction)
                    - skills_before)
    for k, row in enumerate(range(first_plain, b)):
      doc, start = self._plain_chunk(plain_before + k)
      ids = self._ids[doc][start:start + l]
      tokens[row, :len(ids)] = ids
      attention_mask[row, :len(ids)] = 1
      loss_mask[row, :len(ids) - 1] = 1.0
    positions = np.broadcast_to(np.arange(l, dtype=np.int32), (b, l)).copy()
    return PretrainBatch(tokens, loss_mask, attention_mask, positions, is_reasoning, is_skill)

  @staticmethod
  def _put_example(row: int, built: list[tuple[list[int], list[int]]], tokens: np.ndarray,
                   attention_mask: np.ndarray, loss_mask: np.ndarray) -> None:
    """Writes (prompt_ids, response_ids) pairs one after another into `row`; loss on responses."""
    at = 0
    for prompt_ids, response_ids in built:
      ids = prompt_ids + response_ids
      tokens[row, at:at + len(ids)] = ids
      attention_mask[row, at:at + len(ids)] = 1
      # Position t predicts token t + 1: from the last prompt token to the token before EOS.
      loss_mask[row, at + len(prompt_ids) - 1:at + len(ids) - 1] = 1.0
      at += len(ids)


def batch_loss(model: nnx.Module, batch: dict[str, jax.Array], *, chunk_size: int = 256,
               mesh: jax.sharding.Mesh | None = None,
               rules: mesh_lib.ShardingRules | None = None) -> tuple[jax.Array, dict]:
  """Masked mean next-token NLL of a batch (a `PretrainBatch.as_dict()` of arrays), and metrics
  {'loss', 'plain_loss', 'reasoning_loss', 'skill_loss', 'loss_tokens'} (fp32 scalars; a kind
  absent from the batch gets loss 0). Pure and jittable; the gradient flows into `model`'s params."""
  tokens_BL = batch["tokens"]
  hidden_BLD, _ = model.hidden_states(tokens_BL, batch["positions"], batch["attention_mask"])
  targets_BL = jnp.concatenate([tokens_BL[:, 1:], jnp.zeros_like(tokens_BL[:, :1])], axis=1)
  logp_BL, _ = loss_lib.token_logprobs_and_entropy(
      hidden_BLD, model.unembedding(), targets_BL, chunk_size=chunk_size, mesh=mesh, rules=rules)
  mask_BL = batch["loss_mask"].astype(jnp.float32)
  nll_BL = -logp_BL * mask_BL
  reasoning_B = batch["is_reasoning"].astype(jnp.float32)
  skill_B = batch["is_skill"].astype(jnp.float32)

  def mean(weight_B):
    total = (nll_BL * weight_B[:, None]).sum()
    count = (mask_BL * weight_B[:, None]).sum()
    return total / jnp.maximum(count, 1.0)

  loss = nll_BL.sum() / jnp.maximum(mask_BL.sum(), 1.0)
  return loss, {"loss": loss, "plain_loss": mean(1.0 - reasoning_B - skill_B),
                "reasoning_loss": mean(reasoning_B), "skill_loss": mean(skill_B),
                "loss_tokens": mask_BL.sum()}


def make_optimizer(config: PretrainConfig) -> tuple[optax.GradientTransformation, Callable]:
  """(AdamW with warmup-cosine schedule and global-norm clipping, the schedule)."""
  warmup = min(config.warmup_steps, config.steps)
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=config.learning_rate, warmup_steps=warmup,
      decay_steps=max(config.steps, warmup + 1),
      end_value=config.learning_rate * config.end_learning_rate_fraction)
  # The RPT optimiser's rule: matrices decay, norms and biases do not (rank alone is not the
  # rule: q/k/v biases are 2-D [heads, head_dim]).
  adamw = optax.adamw(schedule, b1=config.b1, b2=config.b2,
                      weight_decay=config.weight_decay, mask=optim.weight_decay_mask)
  if config.grad_clip_norm > 0:
    return optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), adamw), schedule
  return adamw, schedule


def pretrain(model: nnx.Module, tokenizer: tokenizer_lib.Tokenizer, documents: Sequence[str],
             config: PretrainConfig, *, mesh: jax.sharding.Mesh | None = None,
             rules: mesh_lib.ShardingRules | None = None, progress: bool = True,
             log_fn: Callable[[int, dict], None] | None = None,
             eval_fn: Callable[[int, nnx.Module], dict] | None = None) -> dict:
  """Trains `model` (an rpt_jax Transformer) in place on `documents`; returns final metrics.

  Args:
    model: the policy; its params are replaced by the trained ones at the end (`nnx.update`).
    tokenizer: the policy's tokenizer (ids must fit the model's vocabulary).
    documents: the corpus (str each).
    config: pretraining settings.
    mesh, rules: shard params (`state_shardings`) and the batch (rule 'batch') over `mesh`.
    progress: show a tqdm bar.
    log_fn: called as log_fn(step, metrics) every `log_every` steps and at the last step (step
      counts completed steps, 1-based); metrics are Python floats: loss, plain_loss,
      reasoning_loss, grad_norm, learning_rate, tokens_per_second, steps_per_second (+ eval_fn's).
    eval_fn: called at the same steps as eval_fn(step, model) with the model holding the current
      params; its dict is merged into the logged metrics (e.g. a format-rate probe).

  Returns:
    The last logged metrics plus steps, total_seconds (wall, incl. compile and eval_fn),
    train_seconds (after the first step, which compiles, minus eval_fn time), steps_per_second
    and tokens_per_second (real, non-padding tokens) over train_seconds, padding_fraction, and
    the batch builder's skipped-example counts (skipped_bad_answer/bad_utf8/too_long).
  """
  tokenizer_lib.check_vocab_fits(tokenizer, model.config.vocab_size)
  model.config.check_context_length(config.seq_len)
  if mesh is not None:
    rules = rules or mesh_lib.ShardingRules()
    if rules.spec(("batch",)) != rules.spec(("batch",), (config.batch_size,), mesh):
      raise ValueError(f"pretrain.batch_size={config.batch_size} does not divide over the mesh "
                       f"axes {rules.mesh_axes('batch')} of rule 'batch'; use a multiple of them.")
  batches = PretrainBatches(tokenizer, documents, config)
  tx, schedule = make_optimizer(config)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  if mesh is None:
    param_shardings = batch_shardings = None
  else:
    param_shardings = mesh_lib.state_shardings(params, mesh, rules)
    batch_shardings = {k: rules.sharding(mesh, ("batch", "length")[:1 if k.startswith("is_")
                                                                  else 2])
                       for k in PretrainBatch.__dataclass_fields__}
  # A fresh copy, so that donating it to the step leaves `model` intact.
  params = jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=param_shardings)(params)
  if mesh is None:
    opt_shardings = None
  else:  # moments like their params; step counts and other scalars replicated
    opt_shardings = optim.map_opt_state(tx, params, lambda _, sharding: sharding,
                                        param_shardings,
                                        lambda _: NamedSharding(mesh, PartitionSpec()))
  opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)

  def train_step(params, opt_state, batch):
    def loss_fn(p):
      return batch_loss(nnx.merge(graphdef, p, rest), batch, chunk_size=config.chunk_size,
                        mesh=mesh, rules=rules)
    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    metrics["grad_norm"] = optax.global_norm(grads)
    return params, opt_state, metrics

  if mesh is None:
    step_fn = jax.jit(train_step, donate_argnums=(0, 1))
  else:
    step_fn = jax.jit(train_step, donate_argnums=(0, 1),
                      in_shardings=(param_shardings, opt_shardings, batch_shardings),
                      out_shardings=(param_shardings, opt_shardings, None))

  def to_device(batch: PretrainBatch) -> dict[str, jax.Array]:
    arrays = batch.as_dict()
    if mesh is None:
      return {k: jnp.asarray(v) for k, v in arrays.items()}
    # Every process builds the same global batch (cheap) and keeps its own shards.
    return {k: jax.make_array_from_callback(v.shape, batch_shardings[k],
                                            functools.partial(lambda a, idx: a[idx], v))
            for k, v in arrays.items()}

  real_tokens = padded_tokens = timed_tokens = 0
  logged: dict[str, Any] = {}
  t_start = time.perf_counter()
  t_first = None  # when the first (compiling) step finished
  eval_seconds = 0.0  # spent in eval_fn: not training throughput

  def throughput(done: int) -> dict[str, float]:
    seconds = time.perf_counter() - t_first - eval_seconds
    return {"steps_per_second": (done - 1) / seconds if done > 1 else 0.0,
            "tokens_per_second": timed_tokens / seconds if done > 1 else 0.0}

  bar = tqdm.tqdm(total=config.steps, disable=not progress, desc="pretrain", unit="step")
  for step in range(config.steps):
    host_batch = batches.batch(step)
    real = int(host_batch.attention_mask.sum())
    real_tokens += real
    padded_tokens += host_batch.tokens.size
    params, opt_state, metrics = step_fn(params, opt_state, to_device(host_batch))
    if t_first is None:
      jax.block_until_ready(metrics)
      t_first = time.perf_counter()
    else:
      timed_tokens += real
    bar.update(1)
    done = step + 1
    if done % config.log_every == 0 or done == config.steps:
      logged = {k: float(v) for k, v in jax.device_get(metrics).items()}
      logged["learning_rate"] = float(schedule(step))
      logged.update(throughput(done))
      if eval_fn is not None:
        t_eval = time.perf_counter()
        nnx.update(model, jax.tree.map(jnp.copy, params))  # a copy: the next step donates params
        logged.update(eval_fn(done, model))
        eval_seconds += time.perf_counter() - t_eval
      bar.set_postfix(loss=f"{logged['loss']:.3f}", skill=f"{logged['skill_loss']:.3f}")
      if log_fn is not None:
        log_fn(done, dict(logged))
  bar.close()
  jax.block_until_ready(params)
  nnx.update(model, params)
  result = dict(logged)
  result.update(throughput(config.steps))
  result.update(
      steps=config.steps, total_seconds=time.perf_counter() - t_start,
      train_seconds=time.perf_counter() - t_first - eval_seconds,
      padding_fraction=1.0 - real_tokens / max(padded_tokens, 1),
      **{f"skipped_{k}": v for k, v in batches.skipped.items()})
  return result
