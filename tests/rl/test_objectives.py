"""The objectives against independent references: the rollout-phase scores (dense probability,
RLP information gain, KL reference log-probs, context mask) against the model's plain forward
and numpy, the EMA teacher against numpy, RLP's thought-only gradient against finite
differences, RMT's next-token loss and thought budget by hand."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rpt_jax.model import ModelConfig, Transformer
from rpt_jax.rl import context_ntp, objectives, optim, train_state, update
from rpt_jax.rl.loss import LossConfig
from rpt_jax.rl.reward import get_reward, score_rollouts
from rpt_jax.rl.rollout_scores import RolloutScorer
from rpt_jax.rl.teacher import ema_update

CFG = ModelConfig(family="qwen2", vocab_size=260, hidden_size=32, intermediate_size=64,
                  num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, attention_bias=True,
                  max_position_embeddings=256)
G = 2


class ByteTokenizer:
  """id = byte + 3 (0 pad, 2 stop); chat template: 'U:' + message + '\\nA:'."""

  pad_id, stop_ids = 0, (2,)

  def encode(self, text):
    return [b + 3 for b in text.encode()]

  def decode(self, ids):
    return bytes(i - 3 for i in ids if i >= 3).decode("utf-8", "replace")

  def token_bytes(self, token_id):
    return bytes([token_id - 3]) if token_id >= 3 else b""

  def apply_chat_template(self, message):
    return f"U:{message}\nA:"


TOK = ByteTokenizer()


def _model(seed=0):
  model = Transformer(CFG, rngs=nnx.Rngs(seed))
  _, params = train_state.split_params(model)
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  nnx.update(model, jax.tree.unflatten(treedef, [0.3 * jax.random.normal(k, x.shape)
                                                 for k, x in zip(keys, leaves)]))
  return model


def _log_softmax(logits):
  """float64 numpy log softmax over the last axis."""
  logits = np.asarray(logits, np.float64)
  shifted = logits - logits.max(-1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def _logsm(model, ids, temperature=1.0):
  """log softmax(logits / temperature) of the plain forward on one unpadded sequence."""
  return _log_softmax(np.asarray(model(jnp.asarray([ids]))[0], np.float64) / temperature)


def _seq_logp(model, prefix, target):
  """log p(target ids | prefix ids) by the plain forward."""
  logsm = _logsm(model, list(prefix) + list(target))
  return sum(logsm[len(prefix) + i - 1, t] for i, t in enumerate(target))


def _rollouts():
  """2 contexts x G=2 responses: closed thoughts, an unclosed one, and an empty one."""
  contexts = ["abc", "hello w"]
  prompts = [TOK.encode(TOK.apply_chat_template(f"Q:{c}")) for c in contexts]
  lp = max(map(len, prompts))
  prompt_tokens = np.zeros((2, lp), np.int32)
  for b, p in enumerate(prompts):
    prompt_tokens[b, :len(p)] = p
  responses = ["xy\n</think>\n\n\\boxed{d}", "think", "ab\n</think>\n\n\\boxed{orld}", ""]
  n = max(len(r) for r in responses) + 1
  tokens = np.zeros((4, n), np.int32)
  lengths = np.zeros(4, np.int32)
  for r, text in enumerate(responses):
    ids = TOK.encode(text) + [2]
    tokens[r, :len(ids)], lengths[r] = ids, len(ids)
  completions = [b"d", b"orld"]
  return dict(prompt_tokens=prompt_tokens, prompt_lengths=np.array(list(map(len, prompts)),
                                                                    np.int32),
              completions=completions, boundaries=[[1], [4]], tokens=tokens, lengths=lengths,
              done=np.ones(4, bool), prompts=prompts, responses=responses)


def _scorer(name, loss=LossConfig(), **fields):
  model = _model()
  graphdef, _ = train_state.split_params(model)
  objective = objectives.ObjectiveConfig.build(name, fields)
  scorer = RolloutScorer(graphdef, TOK, objective, loss, num_generations=G, temperature=0.8,
                         template="v0_short", shared_prefix=True, to_global=jnp.asarray)
  return model, scorer


def _thought_ids(response):
  """The thought a response's tail keeps: bytes before its last '</think>', else all."""
  at = response.rfind("</think>")
  return TOK.encode(response if at < 0 else response[:at]), at >= 0


def _answer_logp(model, prompt, response, truth):
  thought, closed = _thought_ids(response)
  opening = "</think>\n\n\\boxed{" if closed else "\n</think>\n\n\\boxed{"
  return _seq_logp(model, list(prompt) + thought + TOK.encode(opening), TOK.encode(truth))


def test_dense_scores_are_the_first_token_probability():
  model, scorer = _scorer("dense")
  data = _rollouts()
  state = train_state.create_train_state(model, optim.make_optimizer(1e-3))
  parts = scorer.score(state, data["prompt_tokens"], data["prompt_lengths"], data["completions"],
                       data["boundaries"], data["tokens"], data["lengths"], data["done"], 64)
  truths = ["d", "orld"]  # the first token of each completion (its first boundary)
  want = [np.exp(_answer_logp(model, data["prompts"][r // G], data["responses"][r],
                              truths[r // G])) for r in range(4)]
  np.testing.assert_allclose(parts.first_token_probs, want, rtol=1e-4, atol=1e-7)
  # The reward: 1 where the prefix matches ('orld' is 4 bytes = the first boundary), else p.
  scored = score_rollouts(["", "", "</think>\\boxed{orld}", "</think>\\boxed{x}"],
                          [b"d", b"d", b"orld", b"orld"], [[1], [1], [4], [4]], reward="dense",
                          first_token_probs=parts.first_token_probs)
  p = parts.first_token_probs
  np.testing.assert_allclose(scored.rewards, [p[0], p[1], 1.0, p[3]], rtol=1e-6)
  np.testing.assert_array_equal(parts.gradient_lengths, data["lengths"])


def test_rlp_information_gain_against_the_teacher_without_thought():
  model, scorer = _scorer("rlp", ema_decay=0.9)
  data = _rollouts()
  teacher_model = _model(seed=7)
  state = train_state.create_train_state(model, optim.make_optimizer(1e-3), teacher=True)
  state = state.replace(teacher=train_state.split_params(teacher_model)[1])
  parts = scorer.score(state, data["prompt_tokens"], data["prompt_lengths"], data["completions"],
                       data["boundaries"], data["tokens"], data["lengths"], data["done"], 64)
  truths = ["d", "orld"]
  for r in range(4):
    prompt = data["prompts"][r // G]
    policy = _answer_logp(model, prompt, data["responses"][r], truths[r // G])
    baseline = _seq_logp(teacher_model, list(prompt) + TOK.encode("\n</think>\n\n\\boxed{"),
                         TOK.encode(truths[r // G]))
    np.testing.assert_allclose(parts.information_gains[r], policy - baseline, rtol=1e-4,
                               atol=1e-4)
  # The gradient reaches the thought only: tokens before '</think>' (the unclosed row: all but
  # the stop token; the empty response: none).
  np.testing.assert_array_equal(parts.gradient_lengths, [3, 5, 3, 0])
  scored = score_rollouts(data["responses"], [b"d", b"d", b"orld", b"orld"],
                          [[1], [1], [4], [4]], reward="rlp",
                          information_gains=parts.information_gains)
  np.testing.assert_allclose(scored.rewards, parts.information_gains, rtol=1e-6)
  np.testing.assert_array_equal(scored.correct, [True, False, True, False])


def test_reference_logprobs_are_the_frozen_models():
  model, scorer = _scorer("prefix_match", LossConfig(beta=0.1))
  data = _rollouts()
  ref_model = _model(seed=3)
  state = train_state.create_train_state(model, optim.make_optimizer(1e-3), reference=True)
  state = state.replace(reference=train_state.split_params(ref_model)[1])
  parts = scorer.score(state, data["prompt_tokens"], data["prompt_lengths"], data["completions"],
                       data["boundaries"], data["tokens"], data["lengths"], data["done"], 64)
  for r in range(4):
    prompt, n = data["prompts"][r // G], int(data["lengths"][r])
    logsm = _logsm(ref_model, prompt + list(data["tokens"][r, :n]), temperature=0.8)
    want = [logsm[len(prompt) + i - 1, data["tokens"][r, i]] for i in range(n)]
    np.testing.assert_allclose(parts.ref_logprobs[r, :n], want, rtol=1e-4, atol=1e-5)


def test_kl_penalty_in_the_train_step_matches_numpy():
  """beta > 0 with fixed reference log-probs: loss = mean over tokens of -A + beta * k3 (on
  policy the ratio is 1), log-probs from the plain forward."""
  model = _model()
  graphdef, params = train_state.split_params(model)
  data = _rollouts()
  rng = np.random.default_rng(0)
  mask = (np.arange(data["tokens"].shape[1])[None] < data["lengths"][:, None]).astype(np.int32)
  ref = rng.normal(-5.0, 1.0, mask.shape).astype(np.float32)
  adv = np.array([1.0, -1.0, 0.5, -0.5], np.float32)
  batch = update.RolloutBatch(prompt_tokens=data["prompt_tokens"],
                              prompt_lengths=data["prompt_lengths"],
                              completion_tokens=data["tokens"], completion_mask=mask,
                              advantages=adv, ref_logprobs=ref)
  step = update.make_train_step(graphdef, LossConfig(beta=0.05), optim.make_optimizer(1e-3),
                                num_generations=G, temperature=1.0, micro_batch_contexts=2)
  loss, _, metrics = jax.jit(step.loss_and_grads)(params, batch)
  per, kl = [], []
  for r in range(4):
    prompt, n = data["prompts"][r // G], int(data["lengths"][r])
    logsm = _logsm(model, prompt + list(data["tokens"][r, :n]))
    for i in range(n):
      x = ref[r, i] - logsm[len(prompt) + i - 1, data["tokens"][r, i]]
      kl.append(np.exp(x) - x - 1)
      per.append(-adv[r] + 0.05 * kl[-1])
  np.testing.assert_allclose(float(loss), np.mean(per), rtol=1e-4)
  np.testing.assert_allclose(float(metrics["ref_kl_sum"]), np.sum(kl), rtol=1e-4)


def test_ema_teacher_update_matches_numpy():
  rng = np.random.default_rng(0)
  teacher = {"a": rng.normal(size=(3, 2)).astype(np.float32), "b": np.float32(2.0)}
  params = {"a": rng.normal(size=(3, 2)).astype(np.float32), "b": np.float32(-1.0)}
  out = ema_update(jax.tree.map(jnp.asarray, teacher), jax.tree.map(jnp.asarray, params), 0.9)
  np.testing.assert_allclose(out["a"], 0.9 * teacher["a"] + 0.1 * params["a"], rtol=1e-6)
  np.testing.assert_allclose(out["b"], 0.9 * 2.0 + 0.1 * -1.0, rtol=1e-6)


def test_train_step_moves_the_teacher_after_the_update():
  model = _model()
  graphdef, _ = train_state.split_params(model)
  opt = optim.make_optimizer(1e-2)
  state = train_state.create_train_state(model, opt, teacher=True)
  teacher0 = jax.tree.map(np.asarray, state.teacher)
  data = _rollouts()
  mask = (np.arange(data["tokens"].shape[1])[None] < data["lengths"][:, None]).astype(np.int32)
  batch = update.RolloutBatch(prompt_tokens=data["prompt_tokens"],
                              prompt_lengths=data["prompt_lengths"],
                              completion_tokens=data["tokens"], completion_mask=mask,
                              advantages=np.array([1.0, -1.0, 0.5, -0.5], np.float32))
  step = update.make_train_step(graphdef, LossConfig(), opt, num_generations=G,
                                temperature=1.0, micro_batch_contexts=2, ema_decay=0.75)
  new, _ = step(state, batch)
  jax.tree.map(lambda t, t0, p: np.testing.assert_allclose(
      np.asarray(t), 0.75 * t0 + 0.25 * np.asarray(p), rtol=1e-5, atol=1e-7),
      new.teacher, teacher0, new.params)
  assert not np.allclose(jax.tree.leaves(new.teacher)[0], jax.tree.leaves(teacher0)[0])


def test_thought_only_gradient_matches_finite_differences():
  """RLP's mask: the loss is the surrogate over thought tokens alone. Its gradient along a
  random direction equals central differences of a hand-written surrogate over the thought
  tokens (plain forward), so the answer tokens after '</think>' carry no gradient."""
  model = _model()
  graphdef, params = train_state.split_params(model)
  data = _rollouts()
  model_, scorer = _scorer("rlp")
  del model_
  state = train_state.create_train_state(model, optim.make_optimizer(1e-3), teacher=True)
  parts = scorer.score(state, data["prompt_tokens"], data["prompt_lengths"], data["completions"],
                       data["boundaries"], data["tokens"], data["lengths"], data["done"], 64)
  thought = parts.gradient_lengths
  mask = (np.arange(data["tokens"].shape[1])[None] < thought[:, None]).astype(np.int32)
  adv = np.array([1.0, -1.0, 0.5, -0.5], np.float32)
  batch = update.RolloutBatch(prompt_tokens=data["prompt_tokens"],
                              prompt_lengths=data["prompt_lengths"],
                              completion_tokens=data["tokens"], completion_mask=mask,
                              advantages=adv)
  step = update.make_train_step(graphdef, LossConfig(), optim.make_optimizer(1e-3),
                                num_generations=G, temperature=1.0, micro_batch_contexts=2)
  _, grads, _ = jax.jit(step.loss_and_grads)(params, batch)
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(5), len(leaves))
  direction = jax.tree.unflatten(treedef, [jax.random.normal(k, x.shape)
                                           for k, x in zip(keys, leaves)])
  base = {r: [] for r in range(4)}

  def surrogate(p, record=False):
    m = nnx.merge(graphdef, p)
    total, count = 0.0, 0
    for r in range(4):
      prompt, n = data["prompts"][r // G], int(thought[r])
      if not n:
        continue
      logsm = _logsm(m, prompt + list(data["tokens"][r, :n]))
      logp = np.array([logsm[len(prompt) + i - 1, data["tokens"][r, i]] for i in range(n)])
      if record:
        base[r] = logp
      total += float(np.sum(-adv[r] * np.exp(logp - base[r])))
      count += n
    return total / count

  surrogate(params, record=True)
  eps = 1e-3
  shift = lambda s: jax.tree.map(lambda x, d: x + s * d, params, direction)  # noqa: E731
  fd = (surrogate(shift(eps)) - surrogate(shift(-eps))) / (2 * eps)
  analytic = sum(float(jnp.vdot(g, d)) for g, d in zip(jax.tree.leaves(grads),
                                                       jax.tree.leaves(direction)))
  np.testing.assert_allclose(analytic, fd, rtol=2e-3)


def test_context_mask_by_hand():
  empty = [1, 2, 3, 9, 8]  # head [1, 2, 3], tail [9, 8]
  prompts = np.array([[1, 2, 3, 5, 6, 9, 8, 0], [1, 2, 3, 9, 8, 0, 0, 0],
                      [1, 2, 4, 9, 8, 0, 0, 0]])
  mask = context_ntp.context_mask(prompts, np.array([7, 5, 5]), empty)
  np.testing.assert_array_equal(mask, [[0, 0, 0, 1, 1, 0, 0, 0], [0] * 8,
                                       [0, 0, 1, 0, 0, 0, 0, 0]])


def test_ntp_loss_is_the_mean_context_nll():
  """ntp_coef: loss = pg + coef * mean NLL of the context tokens (plain forward)."""
  model = _model()
  graphdef, params = train_state.split_params(model)
  data = _rollouts()
  empty = context_ntp.empty_prompt_ids(TOK, "v0_short")
  cmask = context_ntp.context_mask(data["prompt_tokens"], data["prompt_lengths"], empty)
  for b, c in enumerate(["abc", "hello w"]):  # The context is exactly the document's bytes.
    assert TOK.decode(data["prompt_tokens"][b][cmask[b] > 0]) == f"Q:{c}"
  zeros = np.zeros((4, data["tokens"].shape[1]), np.int32)
  batch = update.RolloutBatch(prompt_tokens=data["prompt_tokens"],
                              prompt_lengths=data["prompt_lengths"],
                              completion_tokens=data["tokens"], completion_mask=zeros,
                              advantages=np.zeros(4, np.float32), context_mask=cmask)
  step = update.make_train_step(graphdef, LossConfig(ntp_coef=0.5), optim.make_optimizer(1e-3),
                                num_generations=G, temperature=1.0, micro_batch_contexts=1)
  loss, _, metrics = jax.jit(step.loss_and_grads)(params, batch)
  nll = []
  for b, prompt in enumerate(data["prompts"]):
    logsm = _logsm(model, prompt)
    nll += [-logsm[i - 1, prompt[i]] for i in range(1, len(prompt)) if cmask[b, i]]
  np.testing.assert_allclose(float(loss), 0.5 * np.mean(nll), rtol=1e-4)
  np.testing.assert_allclose(float(metrics["ntp_tokens"]), len(nll))


def test_thought_budget_schedule_and_length_reward():
  budget = objectives.ThoughtBudget(start=64, floor=8, decay=0.25, length_reward_coef=0.5)
  # max(8, 64 * 0.25 ** (s / 100)) rounded up to a multiple of ceil(100 / 8) = 13, cap 100.
  for step, raw in ((0, 64.0), (50, 32.0), (100, 16.0), (200, 8.0)):
    assert budget.at(step, 100, 100) == min(100, 13 * int(np.ceil(raw / 13)))
  np.testing.assert_allclose(budget.length_reward(np.array([0, 13, 26, 40]), 26),
                             [0.5, 0.25, 0.0, 0.0])
  assert objectives.ThoughtBudget().at(7, 100, 100) == 100  # off
  with pytest.raises(ValueError, match="start >= floor"):
    objectives.ThoughtBudget(start=4, floor=8)


def test_every_objective_is_a_reward_with_its_config():
  for name, objective in objectives.OBJECTIVES.items():
    spec = get_reward(name)
    assert spec.needs_first_token_prob == (objective.answer_score == "first_token_prob")
    assert spec.needs_information_gain == (objective.answer_score == "information_gain")
    assert dataclasses.is_dataclass(objective.config_type)
  config = objectives.ObjectiveConfig.build("rlp", {"ema_decay": 0.5, "other": 1})
  assert config.settings == objectives.RLPConfig(0.5)
  with pytest.raises(ValueError, match="reward='nope': unknown reward"):
    objectives.ObjectiveConfig("nope")
  with pytest.raises(ValueError, match="ema_decay=1.0"):
    objectives.RLPConfig(1.0)
