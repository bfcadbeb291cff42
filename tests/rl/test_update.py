"""The RPT update: log-prob passes, gradient accumulation and the sharded train step, checked
against a per-row reference written here (the model's plain forward on each unpadded row, the
clipped loss by hand), finite differences and hand-worked optimiser numbers."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from rpt_jax import mesh as mesh_lib
from rpt_jax.model import ModelConfig, Transformer
from rpt_jax.rl import optim, update
from rpt_jax.rl import train_state
from rpt_jax.rl.advantages import group_advantages
from rpt_jax.rl.loss import LossConfig

CFG = ModelConfig(family="qwen2", vocab_size=64, hidden_size=32, intermediate_size=64,
                  num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, attention_bias=True,
                  max_position_embeddings=128)
B, G, LP, N, TAU = 4, 2, 6, 5, 0.8
LOSS = LossConfig(eps_low=0.2, eps_high=0.28)


def _model(mesh=None, seed=0):
  """The tiny model with O(1) logits: weights, biases and norm scales randomised."""
  model = Transformer(CFG, rngs=nnx.Rngs(seed), mesh=mesh)
  graphdef, params = train_state.split_params(model)
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  new = []
  for key, leaf, path in zip(keys, leaves, paths):
    if "norm" in path:
      new.append(jax.random.uniform(key, leaf.shape, minval=0.5, maxval=1.5))
    else:
      new.append(0.3 * jax.random.normal(key, leaf.shape))
  nnx.update(model, jax.tree.unflatten(treedef, new))
  return model


def _batch(seed=0):
  """B=4 contexts of lengths 6, 3, 1, 4 x G=2; masks with early EOS and one empty row."""
  rng = np.random.default_rng(seed)
  lengths = np.array([6, 3, 1, 4], np.int32)
  prompts = rng.integers(3, CFG.vocab_size, (B, LP)).astype(np.int32)
  prompts[np.arange(LP)[None] >= lengths[:, None]] = 0
  completions = rng.integers(0, CFG.vocab_size, (B * G, N)).astype(np.int32)
  comp_len = np.array([5, 2, 4, 1, 0, 5, 3, 5])
  mask = (np.arange(N)[None] < comp_len[:, None]).astype(np.int32)
  completions[mask == 0] = 0
  return update.RolloutBatch(
      prompt_tokens=prompts, prompt_lengths=lengths, completion_tokens=completions,
      completion_mask=mask, advantages=rng.normal(size=B * G).astype(np.float32),
      old_logprobs=None)


def _reference_logp(model, batch):
  """[B*G, N] log-probs: each context's G rows as unpadded sequences through the model's plain
  forward (no padding, no cache, no gathering tricks)."""
  rows = []
  for b in range(B):
    c = int(batch.prompt_lengths[b])
    comp = batch.completion_tokens[b * G:(b + 1) * G]
    seq = np.concatenate([np.tile(batch.prompt_tokens[b, :c], (G, 1)), comp], axis=1)
    logits = model(jnp.asarray(seq))[:, c - 1:c - 1 + N] / TAU
    logsm = jax.nn.log_softmax(logits, axis=-1)
    rows.append(jnp.take_along_axis(logsm, jnp.asarray(comp)[..., None], axis=-1)[..., 0])
  return jnp.concatenate(rows)


def _reference_loss(model, batch, noise):
  """Token-mean clipped surrogate written out by hand, with old log-probs = logp + noise (so
  the ratio exp(-noise) reaches both clip sides). Returns (loss, old log-probs)."""
  logp = _reference_logp(model, batch)
  old = jax.lax.stop_gradient(logp) + noise
  ratio = jnp.exp(logp - old)
  adv = jnp.asarray(batch.advantages)[:, None]
  per_token = -jnp.minimum(ratio * adv, jnp.clip(ratio, 1 - LOSS.eps_low, 1 + LOSS.eps_high) * adv)
  mask = jnp.asarray(batch.completion_mask, jnp.float32)
  return (per_token * mask).sum() / mask.sum(), old


@pytest.fixture(scope="module")
def setup():
  model = _model()
  graphdef, params = train_state.split_params(model)
  batch = _batch()
  noise = np.random.default_rng(1).normal(0, 0.3, (B * G, N)).astype(np.float32)
  (ref_loss, old), ref_grads = nnx.jit(nnx.value_and_grad(
      lambda m: _reference_loss(m, batch, noise), has_aux=True))(model)
  batch = batch.replace(old_logprobs=np.asarray(old))
  return graphdef, params, batch, float(ref_loss), nnx.state(ref_grads, nnx.Param)


_CACHE = {}


def _loss_and_grads(graphdef, params, batch, *, shared_prefix, micro):
  key = (shared_prefix, micro)
  if key not in _CACHE:
    step = update.make_train_step(graphdef, LOSS, optim.make_optimizer(1e-3),
                                  num_generations=G, temperature=TAU, micro_batch_contexts=micro,
                                  shared_prefix=shared_prefix, logprob_chunk_size=2)
    _CACHE[key] = jax.jit(step.loss_and_grads)
  return _CACHE[key](params, batch)


def _assert_trees_close(a, b, atol, rtol=1e-4):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol,
                                                       rtol=rtol), a, b)


@pytest.mark.parametrize("shared_prefix", [True, False])
def test_both_passes_match_per_row_reference(setup, shared_prefix):
  graphdef, params, batch, ref_loss, ref_grads = setup
  loss, grads, metrics = _loss_and_grads(graphdef, params, batch, shared_prefix=shared_prefix,
                                         micro=B)
  np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-5, atol=1e-6)
  assert float(metrics["num_tokens"]) == batch.completion_mask.sum()
  assert float(metrics["clip_high_count"]) > 0 and float(metrics["clip_low_count"]) > 0
  _assert_trees_close(grads, ref_grads, atol=2e-5)


def test_shared_prefix_equals_plain_pass(setup):
  graphdef, params, batch, _, _ = setup
  loss_s, grads_s, metrics_s = _loss_and_grads(graphdef, params, batch, shared_prefix=True, micro=B)
  loss_p, grads_p, metrics_p = _loss_and_grads(graphdef, params, batch, shared_prefix=False,
                                               micro=B)
  np.testing.assert_allclose(float(loss_s), float(loss_p), rtol=1e-5)
  _assert_trees_close(grads_s, grads_p, atol=1e-5)
  _assert_trees_close(metrics_s, metrics_p, atol=1e-4)


@pytest.mark.parametrize("micro", [1, 2])
def test_gradient_accumulation_equals_full_batch(setup, micro):
  graphdef, params, batch, _, _ = setup
  full = _loss_and_grads(graphdef, params, batch, shared_prefix=True, micro=B)
  acc = _loss_and_grads(graphdef, params, batch, shared_prefix=True, micro=micro)
  np.testing.assert_allclose(float(acc[0]), float(full[0]), rtol=1e-5)
  _assert_trees_close(acc[1], full[1], atol=1e-5)
  _assert_trees_close(acc[2], full[2], atol=1e-4)


def test_gradient_matches_directional_finite_difference(setup):
  graphdef, params, batch, _, _ = setup
  _, grads, _ = _loss_and_grads(graphdef, params, batch, shared_prefix=True, micro=2)
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(7), len(leaves))
  unit = lambda xs: [x / np.sqrt(sum(float((y ** 2).sum()) for y in xs)) for x in xs]  # noqa: E731
  # A random unit direction tilted towards the gradient, so the derivative is well above noise.
  mixed = [0.5 * a + b for a, b in zip(unit(jax.tree.leaves(grads)),
                                       unit([jax.random.normal(k, x.shape)
                                             for k, x in zip(keys, leaves)]))]
  direction = jax.tree.unflatten(treedef, unit(mixed))
  eps = 1e-2
  shifted = lambda s: jax.tree.map(lambda p, d: p + s * eps * d, params, direction)  # noqa: E731
  plus = float(_loss_and_grads(graphdef, shifted(1.0), batch, shared_prefix=True, micro=2)[0])
  minus = float(_loss_and_grads(graphdef, shifted(-1.0), batch, shared_prefix=True, micro=2)[0])
  numeric = (plus - minus) / (2 * eps)
  analytic = sum(float(jnp.vdot(g, d)) for g, d in zip(jax.tree.leaves(grads),
                                                       jax.tree.leaves(direction)))
  assert abs(analytic) > 1e-2
  np.testing.assert_allclose(numeric, analytic, rtol=1e-2)


def test_nan_old_logprobs_mark_on_policy_rows(setup):
  """A batch mixing on-policy rows (old log-probs NaN) with stale rows (old = logp + noise): the
  loss and gradients of the reference with noise 0 on the on-policy rows, and the ratio worked
  by hand: exp(-noise) on stale tokens, exactly 1 on on-policy ones."""
  graphdef, params, batch, _, _ = setup
  model = nnx.merge(graphdef, params)
  on_policy_R = np.isin(np.arange(B * G), [0, 3, 5])
  noise = np.random.default_rng(1).normal(0, 0.3, (B * G, N)).astype(np.float32)
  noise[on_policy_R] = 0.0
  (ref_loss, old), ref_grads = nnx.jit(nnx.value_and_grad(
      lambda m: _reference_loss(m, batch, noise), has_aux=True))(model)
  mixed = batch.replace(old_logprobs=np.where(on_policy_R[:, None], np.nan, np.asarray(old)))
  loss, grads, metrics = _loss_and_grads(graphdef, params, mixed, shared_prefix=True, micro=2)
  np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5, atol=1e-6)
  _assert_trees_close(grads, nnx.state(ref_grads, nnx.Param), atol=2e-5)
  mask = batch.completion_mask.astype(bool)
  ratio_hand = np.where(on_policy_R[:, None], 1.0, np.exp(-noise.astype(np.float64)))
  np.testing.assert_allclose(float(metrics["ratio_sum"]), ratio_hand[mask].sum(), rtol=1e-5)


# ---- the full train step ---------------------------------------------------------------------


def _adam_hand(params, grads, lr, eps):
  """One AdamW step from zero moments, clip 1.0, no decay on norms/biases, wd 0.01."""
  norm = np.sqrt(sum(float((np.asarray(g, np.float64) ** 2).sum()) for g in jax.tree.leaves(grads)))
  scale = min(1.0, 1.0 / norm)

  def one(path, p, g):
    g = np.asarray(g, np.float64) * scale
    m, v = 0.1 * g / 0.1, 0.001 * g * g / 0.001  # bias-corrected first moments
    name = jax.tree_util.keystr(path)
    decay = 0.0 if ("norm" in name or "bias" in name) else 0.01
    return np.asarray(p, np.float64) - lr * (m / (np.sqrt(v) + eps) + decay * np.asarray(p))

  return jax.tree_util.tree_map_with_path(one, params, grads)


@pytest.fixture(scope="module")
def one_step(setup):
  """One unsharded train step (micro-batches of 2) and its compiled step object."""
  graphdef, _, batch, _, _ = setup
  # A large Adam eps keeps the update smooth in tiny gradient entries (no sign-like jumps).
  opt = optim.make_optimizer(1e-3, eps=1e-3)
  step_fn = update.make_train_step(graphdef, LOSS, opt, num_generations=G, temperature=TAU,
                                   micro_batch_contexts=2, logprob_chunk_size=2)
  state = train_state.create_train_state(_model(), opt)
  before = jax.tree.map(np.asarray, state.params)
  new_state, metrics = step_fn(state, batch)
  return step_fn, opt, before, new_state, metrics


def test_train_step_applies_adamw_to_the_accumulated_gradient(setup, one_step):
  graphdef, params, batch, ref_loss, _ = setup
  _, _, before, state, metrics = one_step
  _, grads, _ = _loss_and_grads(graphdef, params, batch, shared_prefix=True, micro=B)
  want = _adam_hand(before, grads, 1e-3, 1e-3)
  _assert_trees_close(state.params, want, atol=1e-6, rtol=0)  # updates are up to lr = 1e-3
  assert int(state.step) == 1 and float(metrics["skipped"]) == 0
  np.testing.assert_allclose(float(metrics["loss"]), ref_loss, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["grad_norm"]), float(optax.global_norm(grads)),
                             rtol=1e-5)
  np.testing.assert_allclose(float(metrics["learning_rate"]), 1e-3, rtol=1e-6)
  has = batch.completion_mask.any(1)
  np.testing.assert_allclose(float(metrics["mean_advantage"]), batch.advantages[has].mean(),
                             rtol=1e-5)


def test_sharded_train_step_equals_unsharded(setup, one_step):
  _, _, batch, _, _ = setup
  _, opt, _, state_ref, metrics_ref = one_step
  mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(data=2, fsdp=2, tensor=2))
  model = _model(mesh=mesh)
  graphdef, _ = train_state.split_params(model)
  state = train_state.create_train_state(model, opt, mesh=mesh)
  assert state.params["layers"][0]["mlp"]["gate"].get_value().sharding.spec == P("fsdp", "tensor")
  mu = state.opt_state[1].inner_state[0].mu
  assert mu["lm_head"].get_value().sharding.spec == P("fsdp", "tensor")
  # The abstract state (for checkpoint restore) carries the same shardings.
  abstract = train_state.abstract_train_state(train_state.split_params(model)[1], opt, mesh)
  for a, x in zip(jax.tree.leaves(abstract), jax.tree.leaves(state), strict=True):
    assert a.shape == x.shape and a.sharding.is_equivalent_to(x.sharding, x.ndim)
  step_fn = update.make_train_step(graphdef, LOSS, opt, num_generations=G, temperature=TAU,
                                   micro_batch_contexts=2, mesh=mesh, logprob_chunk_size=2)
  new_state, metrics = step_fn(state, batch)
  assert new_state.params["embed"].get_value().sharding.spec == P("tensor", "fsdp")
  _assert_trees_close(new_state.params, state_ref.params, atol=1e-6, rtol=0)
  _assert_trees_close(new_state.opt_state, state_ref.opt_state, atol=1e-7, rtol=1e-4)
  for key, value in metrics_ref.items():
    np.testing.assert_allclose(float(metrics[key]), float(value), rtol=1e-4, atol=1e-6,
                               err_msg=key)


def test_non_finite_loss_skips_the_update(setup, one_step):
  _, _, batch, _, _ = setup
  step_fn, opt, _, _, _ = one_step
  state = train_state.create_train_state(_model(), opt)
  before = jax.tree.map(np.asarray, (state.params, state.opt_state))
  bad = batch.replace(advantages=np.where(np.arange(B * G) == 2, np.nan,
                                          batch.advantages).astype(np.float32))
  new_state, metrics = step_fn(state, bad)
  assert float(metrics["skipped"]) == 1 and not np.isfinite(float(metrics["loss"]))
  jax.tree.map(np.testing.assert_array_equal, (new_state.params, new_state.opt_state), before)
  assert int(new_state.step) == 1


def test_bad_batches_are_refused_before_compiling(setup, one_step):
  _, _, batch, _, _ = setup
  step_fn = one_step[0]
  with pytest.raises(ValueError, match="completion_mask has shape"):
    step_fn.check_batch(batch.replace(completion_mask=batch.completion_mask[:, :3]))
  with pytest.raises(ValueError, match="micro_batch_contexts=2"):
    step_fn.check_batch(update.RolloutBatch(
        batch.prompt_tokens[:3], batch.prompt_lengths[:3], batch.completion_tokens[:6],
        batch.completion_mask[:6], batch.advantages[:6]))
  with pytest.raises(ValueError, match="prompt_lengths must lie"):
    step_fn.check_batch(batch.replace(prompt_lengths=np.array([6, 0, 1, 4], np.int32)))


# ---- a toy task: reward for emitting a target token ------------------------------------------


def test_a_few_steps_raise_the_reward_on_a_toy_task():
  target, steps, groups, g, n = 7, 20, 4, 8, 4
  model = Transformer(CFG, rngs=nnx.Rngs(3))
  graphdef, _ = train_state.split_params(model)
  opt = optim.make_optimizer(1e-2, weight_decay=0.0)
  state = train_state.create_train_state(model, opt)
  step_fn = update.make_train_step(graphdef, LossConfig(), opt, num_generations=g,
                                   temperature=1.0, micro_batch_contexts=groups)
  prompt = np.tile(np.arange(1, 6, dtype=np.int32), (groups, 1))

  @jax.jit
  def sample(params, key):
    m = nnx.merge(graphdef, params)
    lp = prompt.shape[1]
    seq = jnp.zeros((groups * g, lp + n), jnp.int32).at[:, :lp].set(
        jnp.repeat(jnp.asarray(prompt), g, axis=0))

    def one(i, seq):  # Causal: the zeros after position lp + i - 1 do not change its logits.
      logits = jax.lax.dynamic_index_in_dim(m(seq), lp + i - 1, axis=1, keepdims=False)
      nxt = jax.random.categorical(jax.random.fold_in(key, i), logits)
      return seq.at[:, lp + i].set(nxt.astype(jnp.int32))

    return jax.lax.fori_loop(0, n, one, seq)[:, lp:]

  rewards_seen = []
  for i in range(steps):
    completions = np.asarray(sample(state.params, jax.random.key(100 + i)))
    rewards = (completions == target).any(axis=1).astype(np.float32)
    rewards_seen.append(rewards.mean())
    batch = update.RolloutBatch(
        prompt_tokens=prompt, prompt_lengths=np.full(groups, 5, np.int32),
        completion_tokens=completions, completion_mask=np.ones_like(completions),
        advantages=np.asarray(group_advantages(rewards, g)))
    state, metrics = step_fn(state, batch)
    assert float(metrics["skipped"]) == 0
  assert np.mean(rewards_seen[:3]) < 0.2  # ~1 - (63/64)^4 = 6% at random
  assert np.mean(rewards_seen[-5:]) > 0.8, rewards_seen


# ---- optimiser -------------------------------------------------------------------------------


def test_weight_decay_mask_skips_norms_and_biases():
  _, params = train_state.split_params(_model())
  mask = optim.weight_decay_mask(params)
  flat = {jax.tree_util.keystr(p): bool(m) for p, m in jax.tree_util.tree_flatten_with_path(mask)[0]}
  no_decay = sorted(k for k, v in flat.items() if not v)
  assert len(no_decay) == 2 * (3 + 2) + 1  # per layer q/k/v biases + 2 norms; final norm
  assert all("bias" in k or "norm" in k for k in no_decay)
  assert flat["['embed'].value"] and flat["['layers'][0]['attn']['q'].value"]
  # Zero gradients: decayed tensors shrink by lr * wd * p, the others stay put.
  opt = optim.make_optimizer(0.5, weight_decay=0.1)
  grads = jax.tree.map(jnp.zeros_like, params)
  updates, _ = opt.update(grads, opt.init(params), params)
  np.testing.assert_allclose(updates["embed"].get_value(), -0.05 * params["embed"].get_value(),
                             rtol=1e-6)
  np.testing.assert_array_equal(updates["layers"][0]["attn"]["q_bias"].get_value(), 0.0)
  np.testing.assert_array_equal(updates["final_norm"]["scale"].get_value(), 0.0)


@pytest.mark.parametrize("schedule,want", [
    ("constant", [0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]),
    # Update k >= 4 decays with p = (k - 4) / (8 - 4): cosine (1 + cos(pi p)) / 2, linear 1 - p.
    ("cosine", [0.25, 0.5, 0.75, 1.0, 1.0, 0.8535534, 0.5, 0.1464466, 0.0]),
    ("linear", [0.25, 0.5, 0.75, 1.0, 1.0, 0.75, 0.5, 0.25, 0.0]),
])
def test_warmup_and_decay_schedules_by_hand(schedule, want):
  opt = optim.make_optimizer(2.0, warmup_steps=4, schedule=schedule, total_steps=8,
                             weight_decay=0.0, grad_clip_norm=None)
  params = {"w": jnp.ones(())}
  state = opt.init(params)
  got = []
  for _ in range(9):
    updates, state = opt.update({"w": jnp.ones(())}, state, params)
    got.append(float(optim.current_learning_rate(state)))
    # A constant gradient 1: m_hat / sqrt(v_hat) = 1, so the update is -lr exactly.
    np.testing.assert_allclose(float(updates["w"]), -got[-1], rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(got, 2.0 * np.asarray(want), atol=1e-6)


@pytest.mark.parametrize("kwargs,match", [
    (dict(learning_rate=0.0), "learning_rate=0.0"),
    (dict(b2=1.0), "b2=1.0"),
    (dict(schedule="cosine"), "needs total_steps"),
    (dict(schedule="step"), "unknown"),
    (dict(weight_decay=-1.0), "weight_decay"),
    (dict(grad_clip_norm=-1.0), "grad_clip_norm"),
])
def test_optimizer_settings_are_validated(kwargs, match):
  with pytest.raises(ValueError, match=match):
    optim.make_optimizer(**kwargs)
