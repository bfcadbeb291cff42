"""Scaling-law fit: recovers known (A, alpha, P*) from generated points; writes a plot."""
import numpy as np
import pytest

from rpt_jax import scaling

# Steps 100..1200 as in the paper, in FLOP-like units to exercise large compute values.
COMPUTE = np.linspace(100, 1200, 12) * 3.0e17


def _points(a, alpha, p_star, noise=0.0, seed=0):
  acc = a / COMPUTE**alpha + p_star  # The law written out by hand, independent of the module.
  return acc + noise * np.random.default_rng(seed).standard_normal(acc.shape)


@pytest.mark.parametrize("a, alpha, p_star", [
    (-4.0e9, 0.55, 0.48),    # accuracy fraction rising with compute (A < 0)
    (-30.0, 0.08, 45.0),     # percent, slow decay
    (2.0e25, 1.4, 0.2),      # a decreasing quantity (A > 0), fast decay
])
def test_noiseless_points_recover_parameters_exactly(a, alpha, p_star):
  fit = scaling.fit_scaling_law(COMPUTE, _points(a, alpha, p_star))
  assert fit.alpha == pytest.approx(alpha, rel=1e-6)
  assert fit.A == pytest.approx(a, rel=1e-5)
  assert fit.p_star == pytest.approx(p_star, rel=1e-6)
  assert fit.r2 == pytest.approx(1.0, abs=1e-10)
  np.testing.assert_allclose(fit.predict(COMPUTE), _points(a, alpha, p_star), rtol=1e-8)


def test_noisy_points_recover_parameters_and_r2():
  a, alpha, p_star = -4.0e9, 0.55, 0.48
  acc = _points(a, alpha, p_star, noise=1e-4, seed=1)
  fit = scaling.fit_scaling_law(COMPUTE, acc)
  assert fit.alpha == pytest.approx(alpha, rel=0.05)
  assert fit.p_star == pytest.approx(p_star, rel=0.01)
  # A is strongly correlated with alpha; compare predicted curves instead of A alone, plus A loosely.
  assert fit.A == pytest.approx(a, rel=0.5)
  truth = a / COMPUTE**alpha + p_star
  np.testing.assert_allclose(fit.predict(COMPUTE), truth, atol=2e-4)
  assert fit.r2 > 0.99
  # The fit is the least-squares optimum: no better than the true parameters by more than noise,
  # and at least as good as them (it minimises the same squared error).
  assert np.sum((fit.predict(COMPUTE) - acc) ** 2) <= np.sum((truth - acc) ** 2) + 1e-15


def test_r2_is_the_coefficient_of_determination():
  acc = _points(-4.0e9, 0.55, 0.48, noise=5e-3, seed=2)
  fit = scaling.fit_scaling_law(COMPUTE, acc)
  residual = np.sum((acc - fit.predict(COMPUTE)) ** 2)
  total = np.sum((acc - acc.mean()) ** 2)
  assert fit.r2 == pytest.approx(1 - residual / total, rel=1e-9)


@pytest.mark.parametrize("compute, accuracy, match", [
    ([1, 2], [0.1, 0.2], "at least 3"),
    ([1, 2, 3], [0.1, 0.2], "one accuracy per compute"),
    ([0, 2, 3], [0.1, 0.2, 0.3], "> 0"),
    ([2, 2, 2, 3], [0.1, 0.2, 0.3, 0.3], "distinct"),
])
def test_bad_inputs_raise_clear_errors(compute, accuracy, match):
  with pytest.raises(ValueError, match=match):
    scaling.fit_scaling_law(compute, accuracy)


def test_plot_writes_png(tmp_path):
  points, fits = {}, {}
  for split, (a, alpha, p_star) in {"easy": (-3e9, 0.5, 0.6), "medium": (-3e9, 0.5, 0.45),
                                    "hard": (-3e9, 0.5, 0.3)}.items():
    points[split] = (COMPUTE, _points(a, alpha, p_star, noise=1e-3))
    fits[split] = scaling.fit_scaling_law(*points[split])
  path = scaling.plot_scaling(fits, points, tmp_path / "plots" / "scaling.png",
                              title="RPT scaling")
  with open(path, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert (tmp_path / "plots" / "scaling.png").stat().st_size > 5000
