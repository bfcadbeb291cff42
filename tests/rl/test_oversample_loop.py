"""Over-sampling in the RPT loop (`rl.oversample_contexts`, `rl.partial_rollouts`): a real
`RPTTrainer` on a tiny random policy and hand-made prompt batches.

References: the static `Sampler` (the engine's reference, tests/rl/test_engine.py) on the
prompts the loop offered, and the prompts written here by context id; the default loop's
rollouts against the static sampler too (over-sampling off leaves the loop as it was)."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from flax import nnx

from rpt_jax import mesh as mesh_lib
from rpt_jax.data.pipeline import PromptBatch
from rpt_jax.model import ModelConfig, Transformer
from rpt_jax.rl import train_state
from rpt_jax.rl.loss import LossConfig
from rpt_jax.rl.rpt_config import RPTConfig
from rpt_jax.rl.sampler import Sampler
from rpt_jax.train import RPTTrainer

CFG = ModelConfig(family="qwen2", vocab_size=64, hidden_size=32, intermediate_size=64,
                  num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, attention_bias=True,
                  max_position_embeddings=128)
B, G, N, WIDTH = 4, 2, 10, 16  # contexts per step, rollouts per context, budget, prompt width


class Tokenizer:
  """id = byte + 3 (0 pad); ids 3..15 stop a row, so responses end after ~5 tokens on average
  (the random policy's lengths vary, so groups finish out of order)."""

  pad_id, stop_ids = 0, tuple(range(3, 16))

  def decode(self, ids):
    return bytes(int(i) - 3 for i in ids if i >= 3).decode("utf-8", "replace")


def _prompt(context_id: int) -> np.ndarray:
  """Context `context_id`'s prompt: its own length (4..13 tokens) and tokens."""
  rng = np.random.default_rng(1000 + context_id)
  return rng.integers(16, CFG.vocab_size, 4 + context_id % 10).astype(np.int32)


class Loader:
  """Global batches of B contexts; batch n holds contexts n*B .. n*B+B-1 (bucket width 8 or 16
  by its longest prompt). Checkpointable like the Grain iterator (get_state/set_state)."""

  def __init__(self):
    self.n = 0

  def __iter__(self):
    return self

  def __next__(self) -> PromptBatch:
    prompts = [_prompt(self.n * B + r) for r in range(B)]
    width = 8 if max(map(len, prompts)) <= 8 else WIDTH
    tokens = np.zeros((B, width), np.int32)
    for r, p in enumerate(prompts):
      tokens[r, :len(p)] = p
    ids = self.n * B + np.arange(B)
    self.n += 1
    return PromptBatch(
        prompt_tokens=tokens, prompt_lengths=np.asarray([len(p) for p in prompts], np.int32),
        completion_bytes=np.tile(np.frombuffer(b"ab", np.uint8), (B, 1)),
        completion_lengths=np.full(B, 2, np.int32), boundaries=np.tile([1, 2], (B, 1)),
        num_boundaries=np.full(B, 2, np.int32), doc_id=ids.astype(np.int64),
        position=ids.astype(np.int32), bucket=np.zeros(B, np.int32),
        entropy=np.zeros(B, np.float32), proxy_correct=np.zeros(B, bool),
        truncated=np.zeros(B, bool))

  def get_state(self) -> bytes:
    return json.dumps({"n": self.n}).encode()

  def set_state(self, state: bytes) -> None:
    self.n = json.loads(state)["n"]


def _model():
  model = Transformer(CFG, rngs=nnx.Rngs(0))
  _, params = train_state.split_params(model)
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  nnx.update(model, jax.tree.unflatten(treedef, [0.3 * jax.random.normal(k, x.shape)
                                                 for k, x in zip(keys, leaves)]))
  return model


def _config(steps: int, **kwargs) -> RPTConfig:
  return RPTConfig(steps=steps, batch_contexts=B, num_generations=G, temperature=1.0,
                   max_new_tokens=N, rollout_micro_batch=B, train_micro_batch=B,
                   decode_slots=8, dynamic_sampling_from_step=100, checkpoint_every=100,
                   optimizer=dict(learning_rate=3e-2), prompt_width=WIDTH,
                   # Rewards are all 0 here: the entropy bonus moves the weights every step.
                   loss=LossConfig(entropy_coef=0.1, max_response_length=N), **kwargs)


class Recorder:
  """Wraps the trainer's sampler and train step: records each over-sampled call (its inputs and
  GroupRollouts, rows gathered to numpy) and each train batch."""

  def __init__(self, trainer: RPTTrainer):
    self.calls, self.batches = [], []
    sampler, step = trainer.sampler, trainer.train_step
    generate_groups = sampler.generate_groups

    def record_groups(tokens, lengths, **kwargs):
      out = generate_groups(tokens, lengths, **kwargs)
      self.calls.append(dict(prompts=np.asarray(tokens), lengths=np.asarray(lengths),
                             kwargs=kwargs, out=out, logprobs=np.asarray(out.output.logprobs),
                             tokens=np.asarray(out.output.tokens)))
      return out

    def record_step(state, batch):
      self.batches.append(jax.tree.map(np.asarray, batch))
      return step(state, batch)

    sampler.generate_groups = record_groups
    trainer.train_step = record_step


def _trainer(tmp_path, config: RPTConfig) -> RPTTrainer:
  mesh = mesh_lib.make_mesh(dict(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
  return RPTTrainer(_model(), Tokenizer(), config, mesh=mesh, workdir=str(tmp_path),
                    progress=False)


def _static_rows(prompts, lengths, key, params):
  """The static sampler's G rows per context (the reference for the engine's rows)."""
  sampler = Sampler(_model(), pad_id=Tokenizer.pad_id)
  out = sampler.generate(prompts, lengths, num_samples=G, max_new_tokens=N, temperature=1.0,
                         eos_ids=Tokenizer.stop_ids, rng=key, params=params)
  return np.asarray(out.tokens), np.asarray(out.lengths)


def test_oversampled_steps_train_on_whole_groups_of_their_contexts(tmp_path):
  trainer = _trainer(tmp_path, _config(2, oversample_contexts=4))
  rec = Recorder(trainer)
  params0 = jax.tree.map(np.asarray, trainer.state.params)
  loader = Loader()
  metrics = [trainer.run_step(loader, None) for _ in range(2)]
  assert len(rec.calls) == 2 and len(rec.batches) == 2
  for call, batch, m in zip(rec.calls, rec.batches, metrics):
    out = call["out"]
    assert len(out.context_ids) == B and len(set(out.context_ids)) == B
    assert (out.staleness == 0).all() and batch.old_logprobs is None
    # Whole groups: every row of every kept group generated >= 1 token, inside the mask.
    np.testing.assert_array_equal(batch.completion_mask.sum(1), np.asarray(out.output.lengths))
    assert (batch.completion_mask.sum(1) >= 1).all()
    # Each trained context is the prompt of its id (written here), in the engine's order.
    for k, cid in enumerate(out.context_ids):
      p = _prompt(int(cid))
      np.testing.assert_array_equal(batch.prompt_tokens[k, :len(p)], p)
      assert batch.prompt_lengths[k] == len(p) and not batch.prompt_tokens[k, len(p):].any()
    np.testing.assert_array_equal(batch.completion_tokens[:, :N], call["tokens"])
    assert m["rollout/groups_kept"] == B
    assert m["rollout/contexts_admitted"] + m["rollout/contexts_unstarted"] == B + 4
    # Not carrying: every admitted context that did not return was dropped.
    assert m["rollout/contexts_dropped"] == m["rollout/contexts_admitted"] - B
    assert m["rollout/contexts_carried"] == 0 and m["rollout/staleness_max"] == 0
    assert 0 < m["rollout/slot_utilization"] <= 1
  # Step 0 offered contexts 0..7 (two loader batches) in order: each kept group's rows are the
  # static sampler's rows of that context on those prompts with the step's key.
  first = rec.calls[0]
  np.testing.assert_array_equal(first["kwargs"]["context_ids"], np.arange(B + 4))
  ref_tokens, ref_lengths = _static_rows(first["prompts"], first["lengths"],
                                         first["kwargs"]["rng"], params0)
  rows = (first["out"].context_ids[:, None] * G + np.arange(G)).reshape(-1)
  np.testing.assert_array_equal(first["tokens"], ref_tokens[rows])
  np.testing.assert_array_equal(np.asarray(first["out"].output.lengths), ref_lengths[rows])
  # Unstarted contexts are offered first in the next call; dropped ones never again.
  unstarted = sorted(first["out"].unstarted.tolist())
  second_ids = rec.calls[1]["kwargs"]["context_ids"].tolist()
  assert second_ids[:len(unstarted)] == unstarted
  assert not set(first["out"].dropped.tolist()) & set(second_ids)
  assert metrics[0]["rollout/contexts_unstarted"] == len(unstarted)


def test_partial_rollouts_carry_stale_groups_with_their_logprobs(tmp_path):
  trainer = _trainer(tmp_path, _config(3, oversample_contexts=8, partial_rollouts=True))
  rec = Recorder(trainer)
  loader = Loader()
  metrics = [trainer.run_step(loader, None) for _ in range(3)]
  assert metrics[0]["rollout/contexts_carried"] > 0 and metrics[0]["rollout/staleness_max"] == 0
  stale_steps = [s for s in (1, 2) if metrics[s]["rollout/staleness_max"] >= 1]
  assert stale_steps and metrics[0]["rollout/contexts_dropped"] == 0
  for s in stale_steps:
    call, batch = rec.calls[s], rec.batches[s]
    out = call["out"]
    # Carried groups come back first, from earlier steps' contexts.
    carried_before = set(rec.calls[s - 1]["out"].carried.tolist())
    stale = out.staleness > 0
    assert set(out.context_ids[stale].tolist()) <= carried_before
    assert metrics[s]["rollout/staleness_mean"] == pytest.approx(out.staleness.mean())
    old = batch.old_logprobs
    assert old.shape == (B * G, N)
    stale_R = np.repeat(stale, G)
    # Stale rows: the engine's per-token log-probs (of the weights that sampled each token);
    # on-policy rows: NaN (the update uses stop_gradient(new) there).
    np.testing.assert_array_equal(old[stale_R], call["logprobs"][stale_R])
    assert np.isnan(old[~stale_R]).all() and not np.isnan(old[stale_R]).any()
    for k in np.flatnonzero(stale):
      p = _prompt(int(out.context_ids[k]))
      assert batch.prompt_lengths[k] == len(p)
      np.testing.assert_array_equal(batch.prompt_tokens[k, :len(p)], p)
  # Step 0 is all on-policy (every old log-prob NaN): ratio exactly 1. Stale rows' log-probs are
  # older weights' (the entropy bonus moved them): the ratio leaves 1.
  assert metrics[0]["train/ratio_mean"] == 1.0
  assert any(abs(metrics[s]["train/ratio_mean"] - 1.0) > 1e-3 for s in stale_steps)
  # A restart drops pooled and carried contexts and continues at the saved loader position.
  trainer.save(loader, force=True)
  trainer.checkpointer.wait_until_finished()
  pulled = loader.n
  fresh = Loader()
  assert trainer.restore(fresh) and fresh.n == pulled and len(trainer.pool) == 0
  after = trainer.run_step(fresh, None)
  assert after["rollout/staleness_max"] == 0 and after["rollout/groups_kept"] == B
  assert min(rec.calls[-1]["kwargs"]["context_ids"]) == pulled * B


def test_default_loop_is_the_plain_rollout(tmp_path):
  """Over-sampling off: one `generate` call per step on the loader's batch, no rollout/*
  metrics, and the trained rows are the static sampler's rows of that batch."""
  trainer = _trainer(tmp_path, _config(1))
  rec = Recorder(trainer)
  assert trainer.pool is None
  params0 = jax.tree.map(np.asarray, trainer.state.params)
  metrics = trainer.run_step(Loader(), None)
  assert not rec.calls and not any(k.startswith("rollout/") for k in metrics)
  batch = Loader().__next__()
  (train_batch,) = rec.batches
  assert train_batch.old_logprobs is None
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(0), 0), 0)
  ref_tokens, ref_lengths = _static_rows(batch.prompt_tokens, batch.prompt_lengths, key,
                                         params0)
  np.testing.assert_array_equal(train_batch.completion_tokens, ref_tokens)
  np.testing.assert_array_equal(train_batch.completion_mask.sum(1), ref_lengths)
  np.testing.assert_array_equal(train_batch.prompt_tokens, batch.prompt_tokens)


@pytest.mark.parametrize("kwargs,message", [
    (dict(oversample_contexts=-1), "rl.oversample_contexts=-1 must be >= 0"),
    (dict(partial_rollouts=True), "rl.partial_rollouts=True carries rows"),
    (dict(oversample_contexts=2, partial_rollouts=True, prompt_width=0), "prompt_width=0"),
])
def test_bad_oversampling_settings_name_the_field(kwargs, message):
  with pytest.raises(ValueError) as info:
    RPTConfig(steps=1, batch_contexts=B, num_generations=G, **kwargs)
  assert message in str(info.value) and "\n" not in str(info.value)
