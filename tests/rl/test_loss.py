"""Chunked/vocab-parallel log-probs and the policy loss vs numpy references written here."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from rpt_jax.mesh import MESH_AXES, MeshConfig, make_mesh
from rpt_jax.rl.loss import (LossConfig, finalize_metrics, mean_loss, policy_loss,
                             token_logprobs_and_entropy)

# ---------------------------------------------------------------------------------------------
# Independent references.
# ---------------------------------------------------------------------------------------------


def np_logp_entropy(h, w, t, tau=1.0):
  """float64 log p(target) and entropy of softmax(h @ w / tau), from full logits."""
  z = np.asarray(h, np.float64) @ np.asarray(w, np.float64) / tau
  z = z - z.max(-1, keepdims=True)
  logsm = z - np.log(np.exp(z).sum(-1, keepdims=True))
  logp = np.take_along_axis(logsm, np.asarray(t)[..., None], -1)[..., 0]
  return logp, -(np.exp(logsm) * logsm).sum(-1)


def jnp_unchunked(h, w, t, tau=1.0):
  """Plain full-logits jnp version, as a second gradient reference."""
  logsm = jax.nn.log_softmax(jnp.einsum("btd,dv->btv", h, w) / tau, axis=-1)
  logp = jnp.take_along_axis(logsm, t[..., None], -1)[..., 0]
  return logp, -(jnp.exp(logsm) * logsm).sum(-1)


def _data(b, t, d, v, seed=0):
  rng = np.random.default_rng(seed)
  h = rng.normal(size=(b, t, d)).astype(np.float32)
  w = (rng.normal(size=(d, v)) / np.sqrt(d) * 3).astype(np.float32)
  tgt = rng.integers(0, v, size=(b, t)).astype(np.int32)
  return h, w, tgt


# ---------------------------------------------------------------------------------------------
# token_logprobs_and_entropy
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk,tau", [(1, 1.0), (3, 0.7), (7, 1.0), (16, 1.3)])
def test_logprobs_entropy_match_numpy(chunk, tau):
  h, w, tgt = _data(3, 7, 8, 50)  # T=7: chunk 3 pads to 9, chunk 16 clips to 7.
  logp, ent = token_logprobs_and_entropy(h, w, tgt, temperature=tau, chunk_size=chunk)
  ref_logp, ref_ent = np_logp_entropy(h, w, tgt, tau)
  assert logp.shape == ent.shape == (3, 7) and logp.dtype == ent.dtype == jnp.float32
  np.testing.assert_allclose(logp, ref_logp, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ent, ref_ent, rtol=1e-5, atol=1e-5)


def test_bf16_inputs_give_fp32_outputs():
  h, w, tgt = _data(2, 5, 8, 40)
  hb, wb = jnp.asarray(h, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)
  logp, ent = token_logprobs_and_entropy(hb, wb, tgt, chunk_size=2)
  assert logp.dtype == ent.dtype == jnp.float32
  ref_logp, ref_ent = np_logp_entropy(np.asarray(hb, np.float32), np.asarray(wb, np.float32), tgt)
  np.testing.assert_allclose(logp, ref_logp, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(ent, ref_ent, rtol=1e-4, atol=1e-4)


def test_gradients_match_finite_differences():
  b, t, d, v, tau = 2, 3, 4, 6, 0.8
  h, w, tgt = _data(b, t, d, v, seed=1)
  rng = np.random.default_rng(2)
  c_logp, c_ent = rng.normal(size=(b, t)), rng.normal(size=(b, t))

  def objective_np(h64, w64):
    logp, ent = np_logp_entropy(h64, w64, tgt, tau)
    return (c_logp * logp).sum() + (c_ent * ent).sum()

  def objective_jax(hh, ww):
    logp, ent = token_logprobs_and_entropy(hh, ww, tgt, temperature=tau, chunk_size=2)
    return (c_logp * logp).sum() + (c_ent * ent).sum()

  gh, gw = jax.grad(objective_jax, (0, 1))(h, w)

  def central(x, f, step=1e-6):
    x = np.asarray(x, np.float64)
    g = np.zeros_like(x)
    for idx in np.ndindex(*x.shape):
      xp, xm = x.copy(), x.copy()
      xp[idx] += step
      xm[idx] -= step
      g[idx] = (f(xp) - f(xm)) / (2 * step)
    return g

  fd_h = central(h, lambda x: objective_np(x, np.float64(w)))
  fd_w = central(w, lambda x: objective_np(np.float64(h), x))
  np.testing.assert_allclose(gh, fd_h, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(gw, fd_w, rtol=1e-4, atol=1e-5)


def test_gradients_match_unchunked_jnp():
  h, w, tgt = _data(2, 9, 8, 33, seed=3)
  c = np.random.default_rng(4).normal(size=(2, 9)).astype(np.float32)

  def make(fn):
    return lambda hh, ww: sum(((c * x).sum() for x in fn(hh, ww)), 0.0)

  chunked = make(lambda hh, ww: token_logprobs_and_entropy(hh, ww, tgt, temperature=0.9,
                                                           chunk_size=4))
  plain = make(lambda hh, ww: jnp_unchunked(hh, ww, tgt, 0.9))
  for got, want in zip(jax.grad(chunked, (0, 1))(h, w), jax.grad(plain, (0, 1))(h, w)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("rows", [8, 128])
def test_live_logits_bounded_by_chunk_not_rows(rows):
  """Chunks run over rows x tokens: with 8-token rows and chunk 16, the compiled gradient's
  temporaries stay within 4 [chunk, V] fp32 logit blocks at 8 or 128 rows (chunking T alone
  would hold [rows, 8, V]: 16x the bound at 128 rows)."""
  t, d, v, chunk = 8, 16, 4096, 16

  def objective(h, w, tgt):
    logp, ent = token_logprobs_and_entropy(h, w, tgt, chunk_size=chunk)
    return logp.sum() + ent.sum()

  shapes = (jax.ShapeDtypeStruct((rows, t, d), jnp.float32),
            jax.ShapeDtypeStruct((d, v), jnp.float32), jax.ShapeDtypeStruct((rows, t), jnp.int32))
  compiled = jax.jit(jax.grad(objective, (0, 1))).lower(*shapes).compile()
  assert compiled.memory_analysis().temp_size_in_bytes <= 4 * chunk * v * 4


def _auto_mesh(shape):
  return Mesh(np.asarray(jax.devices(), dtype=object).reshape(shape), MESH_AXES)


@pytest.mark.parametrize("kind,shape,b,v", [
    ("explicit", (2, 2, 2), 4, 32),   # make_mesh: batch over data x fsdp, vocab over tensor.
    ("auto", (1, 2, 4), 3, 30),       # B=3 stays replicated over fsdp; V=30 padded to 32.
])
def test_vocab_parallel_matches_unsharded(kind, shape, b, v):
  t = 5
  h, w, tgt = _data(b, t, 8, v, seed=5)
  mesh = make_mesh(MeshConfig(*shape)) if kind == "explicit" else _auto_mesh(shape)
  c_logp = np.random.default_rng(6).normal(size=(b, t)).astype(np.float32)

  def objective(hh, ww, m):
    logp, ent = token_logprobs_and_entropy(hh, ww, tgt, temperature=0.8, chunk_size=2, mesh=m)
    return (c_logp * logp).sum() + (ent ** 2).sum(), (logp, ent)

  if kind == "explicit":
    # Laid out as the model holds them: hidden over batch, unembed ('embed','vocab').
    batch = ("data", "fsdp") if b % 4 == 0 else None
    h_in = jax.device_put(h, NamedSharding(mesh, P(batch, None, None)))
    w_in = jax.device_put(w, NamedSharding(mesh, P("fsdp", "tensor")))
  else:
    h_in, w_in = h, w
  sharded = jax.jit(jax.value_and_grad(lambda hh, ww: objective(hh, ww, mesh), (0, 1),
                                       has_aux=True))
  (_, (logp, ent)), (gh, gw) = sharded(h_in, w_in)
  (_, (ulogp, uent)), (ugh, ugw) = jax.value_and_grad(
      lambda hh, ww: objective(hh, ww, None), (0, 1), has_aux=True)(h, w)
  ref_logp, ref_ent = np_logp_entropy(h, w, tgt, 0.8)
  np.testing.assert_allclose(logp, ref_logp, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ent, ref_ent, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(logp, ulogp, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ent, uent, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(gh, ugh, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(gw, ugw, rtol=1e-4, atol=1e-5)
  assert gw.shape == w.shape  # The vocab padding does not leak into the gradient.


def test_input_errors():
  h, w, tgt = _data(2, 4, 8, 10)
  with pytest.raises(ValueError, match="temperature"):
    token_logprobs_and_entropy(h, w, tgt, temperature=0.0)
  with pytest.raises(ValueError, match="shapes do not agree"):
    token_logprobs_and_entropy(h, w[:4], tgt)
  with pytest.raises(ValueError, match="integer"):
    token_logprobs_and_entropy(h, w, tgt.astype(np.float32))


# ---------------------------------------------------------------------------------------------
# policy_loss
# ---------------------------------------------------------------------------------------------


def np_policy_loss(logp, old, adv, mask, cfg, ref=None, ent=None):
  """Token-by-token loop: (loss_sum, denominator, per-token losses)."""
  b, t = logp.shape
  per = np.zeros((b, t))
  for i in range(b):
    for j in range(t):
      if not mask[i, j]:
        continue
      a = adv[i]
      r = np.exp(float(logp[i, j]) - float(old[i, j]))
      rc = min(max(r, 1 - cfg.eps_low), 1 + cfg.eps_high)
      val = -min(r * a, rc * a)
      if cfg.beta > 0:
        x = float(ref[i, j]) - float(logp[i, j])
        val += cfg.beta * (-x if cfg.kl_estimator == "k1" else np.exp(x) - x - 1)
      if cfg.entropy_coef:
        val -= cfg.entropy_coef * float(ent[i, j])
      per[i, j] = val
  n = mask.sum(1)
  if cfg.aggregation == "token-mean":
    return per.sum(), mask.sum(), per
  if cfg.aggregation == "seq-mean-token-mean":
    return sum(per[i].sum() / n[i] for i in range(b) if n[i]), (n > 0).sum(), per
  return sum(per[i].sum() / cfg.max_response_length for i in range(b) if n[i]), (n > 0).sum(), per


def _loss_batch(seed=0, b=6, t=5):
  rng = np.random.default_rng(seed)
  old = rng.normal(-2.0, 0.5, size=(b, t)).astype(np.float32)
  # log-ratios in [-0.7, 0.7]: ratios 0.5 .. 2.0, many outside [0.8, 1.2] on both sides.
  logp = (old + rng.uniform(-0.7, 0.7, size=(b, t))).astype(np.float32)
  ref = (old + rng.normal(0, 0.3, size=(b, t))).astype(np.float32)
  ent = rng.uniform(0, 3, size=(b, t)).astype(np.float32)
  adv = np.array([1.5, -1.0, 0.5, -0.3, 0.0, 2.0], np.float32)[:b]
  lengths = np.array([5, 3, 1, 4, 2, 0])[:b]  # Last row: batch padding, no valid tokens.
  mask = np.arange(t)[None, :] < lengths[:, None]
  return logp, old, adv, mask, ref, ent


CONFIGS = [
    LossConfig(),
    LossConfig(eps_low=0.2, eps_high=0.28, aggregation="seq-mean-token-mean"),
    LossConfig(aggregation="seq-mean-token-sum-norm", max_response_length=8),
    LossConfig(beta=0.1, kl_estimator="k1", entropy_coef=0.01),
    LossConfig(beta=0.05, kl_estimator="k3", aggregation="seq-mean-token-mean"),
    LossConfig(entropy_coef=-0.02, eps_high=0.5, aggregation="seq-mean-token-sum-norm",
               max_response_length=5),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.aggregation}-b{c.beta}-e{c.entropy_coef}")
def test_policy_loss_matches_numpy_loop(cfg):
  logp, old, adv, mask, ref, ent = _loss_batch()
  loss_sum, denom, metrics = policy_loss(logp, old, adv, mask, config=cfg, ref_logp_BT=ref,
                                         entropy_BT=ent)
  want_sum, want_denom, _ = np_policy_loss(logp, old, adv, mask, cfg, ref, ent)
  np.testing.assert_allclose(loss_sum, want_sum, rtol=1e-5, atol=1e-6)
  assert float(denom) == want_denom
  # Metrics: token sums/counts against the same loop quantities.
  r = np.exp(logp.astype(np.float64) - old)
  a = np.broadcast_to(adv[:, None], r.shape)
  assert float(metrics["num_tokens"]) == mask.sum()
  assert float(metrics["num_sequences"]) == (mask.sum(1) > 0).sum()
  assert float(metrics["clip_high_count"]) == (mask & (a > 0) & (r > 1 + cfg.eps_high)).sum()
  assert float(metrics["clip_low_count"]) == (mask & (a < 0) & (r < 1 - cfg.eps_low)).sum()
  np.testing.assert_allclose(metrics["ratio_sum"], r[mask].sum(), rtol=1e-5)
  np.testing.assert_allclose(metrics["approx_kl_sum"], (r - 1 - np.log(r))[mask].sum(), rtol=1e-4)
  np.testing.assert_allclose(metrics["entropy_sum"], ent[mask].sum(), rtol=1e-5)
  means = finalize_metrics(metrics)
  np.testing.assert_allclose(means["entropy"], ent[mask].mean(), rtol=1e-5)
  assert 0 < float(means["clip_fraction"]) < 1  # The batch exercises both sides of the range.


def test_clip_cases_by_hand():
  """Ratio 1.5 / 0.5 with advantage +1 / -1, eps 0.2: values and gradients worked by hand."""
  ratios = np.array([1.5, 1.5, 0.5, 0.5, 1.1], np.float32)
  adv = np.array([1.0, -1.0, -1.0, 1.0, 1.0], np.float32)
  old = np.full((5, 1), -1.0, np.float32)
  logp = old + np.log(ratios)[:, None]
  mask = np.ones((5, 1), bool)
  cfg = LossConfig()

  def per_row(lp):
    return [policy_loss(lp[i:i + 1], old[i:i + 1], adv[i:i + 1], mask[i:i + 1],
                        config=cfg)[0] for i in range(5)]

  # -min(r A, clip(r) A): clipped at 1.2 | unclipped 1.5 | clipped at 0.8 | unclipped | unclipped
  np.testing.assert_allclose(per_row(logp), [-1.2, 1.5, 0.8, -0.5, -1.1], rtol=1e-5)
  # d/dlogp: 0 where the clipped branch is active, else -A * r.
  grad = jax.grad(lambda lp: policy_loss(lp, old, adv, mask, config=cfg)[0])(logp)[:, 0]
  np.testing.assert_allclose(grad, [0.0, 1.5, 0.0, -0.5, -1.1], rtol=1e-5, atol=1e-7)
  _, _, m = policy_loss(logp, old, adv, mask, config=cfg)
  assert float(m["clip_high_count"]) == 1 and float(m["clip_low_count"]) == 1
  # Clip-higher: eps_high=0.6 lets ratio 1.5 through with A > 0.
  hi = policy_loss(logp[:1], old[:1], adv[:1], mask[:1], config=LossConfig(eps_high=0.6))[0]
  np.testing.assert_allclose(hi, -1.5, rtol=1e-6)


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean",
                                         "seq-mean-token-sum-norm"])
def test_micro_batch_accumulation_is_exact(aggregation):
  cfg = LossConfig(aggregation=aggregation, max_response_length=5, beta=0.02)
  logp, old, adv, mask, ref, ent = _loss_batch(seed=7)
  full_sum, full_denom, full_m = policy_loss(logp, old, adv, mask, config=cfg, ref_logp_BT=ref)
  parts = [policy_loss(logp[s], old[s], adv[s], mask[s], config=cfg, ref_logp_BT=ref[s])
           for s in (slice(0, 2), slice(2, 6))]
  acc_sum = sum(p[0] for p in parts)
  acc_denom = sum(p[1] for p in parts)
  np.testing.assert_allclose(acc_sum, full_sum, rtol=1e-6)
  assert float(acc_denom) == float(full_denom)
  want_sum, want_denom, _ = np_policy_loss(logp, old, adv, mask, cfg, ref)
  np.testing.assert_allclose(mean_loss(acc_sum, acc_denom), want_sum / want_denom, rtol=1e-5)
  acc_m = {k: sum(p[2][k] for p in parts) for k in full_m}
  for k, v in finalize_metrics(acc_m).items():
    np.testing.assert_allclose(v, finalize_metrics(full_m)[k], rtol=1e-5, err_msg=k)
  # Gradients accumulate the same way: d(mean)/dlogp of the full batch.
  grad_full = jax.grad(lambda lp: mean_loss(*policy_loss(lp, old, adv, mask, config=cfg,
                                                         ref_logp_BT=ref)[:2]))(logp)
  grad_parts = [jax.grad(lambda lp, s=s: policy_loss(lp, old[s], adv[s], mask[s], config=cfg,
                                                     ref_logp_BT=ref[s])[0])(logp[s])
                for s in (slice(0, 2), slice(2, 6))]
  np.testing.assert_allclose(np.concatenate(grad_parts) / float(acc_denom), grad_full,
                             rtol=1e-5, atol=1e-7)


def test_masked_garbage_stays_out():
  logp, old, adv, mask, ref, ent = _loss_batch()
  bad = np.where(mask, logp, 1e4).astype(np.float32)  # exp(1e4) would overflow.
  bad_old = np.where(mask, old, -1e4).astype(np.float32)
  cfg = LossConfig(beta=0.1, entropy_coef=0.01)
  bad_ent = np.where(mask, ent, np.nan).astype(np.float32)
  fn = lambda lp: policy_loss(lp, bad_old, adv, mask, config=cfg, ref_logp_BT=ref,
                              entropy_BT=bad_ent)[0]
  got, grad = jax.value_and_grad(fn)(bad)
  want = policy_loss(logp, old, adv, mask, config=cfg, ref_logp_BT=ref, entropy_BT=ent)[0]
  np.testing.assert_allclose(got, want, rtol=1e-6)
  assert np.isfinite(grad).all() and (np.asarray(grad)[~mask] == 0).all()


def test_empty_batch_and_per_token_advantages():
  logp, old, adv, mask, _, _ = _loss_batch()
  s, d, _ = policy_loss(logp, old, adv, np.zeros_like(mask), config=LossConfig())
  assert float(d) == 0 and float(mean_loss(s, d)) == 0.0
  per_token = np.broadcast_to(adv[:, None], logp.shape)
  np.testing.assert_allclose(policy_loss(logp, old, per_token, mask, config=LossConfig())[0],
                             policy_loss(logp, old, adv, mask, config=LossConfig())[0], rtol=1e-6)


def test_config_validation():
  with pytest.raises(ValueError, match="max_response_length"):
    LossConfig(aggregation="seq-mean-token-sum-norm")
  with pytest.raises(ValueError, match="aggregation"):
    LossConfig(aggregation="mean")
  with pytest.raises(ValueError, match="kl_estimator"):
    LossConfig(kl_estimator="k2")
  with pytest.raises(ValueError, match="eps_low"):
    LossConfig(eps_low=1.0)
  with pytest.raises(ValueError, match="beta"):
    LossConfig(beta=-0.1)
  with pytest.raises(ValueError, match="ntp_coef=-0.5"):
    LossConfig(ntp_coef=-0.5)
  logp, old, adv, mask, _, _ = _loss_batch()
  with pytest.raises(ValueError, match="ref_logp_BT"):
    policy_loss(logp, old, adv, mask, config=LossConfig(beta=0.1))
  with pytest.raises(ValueError, match="entropy_BT"):
    policy_loss(logp, old, adv, mask, config=LossConfig(entropy_coef=0.1))
