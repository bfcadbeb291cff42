"""The paper's scaling law of accuracy in RL training compute, fitted with numpy alone.

    P(C) = A / C**alpha + P*

P is next-token accuracy on one difficulty split, C the RL training compute (any positive unit:
FLOPs, steps, GPU-hours; only A depends on it), alpha > 0 the decay rate and P* the asymptote.
Accuracy may be a fraction in [0, 1] or a percentage (the paper's tables use %): A and P* come out
in the same unit as the accuracies given. Accuracy rising with compute means A < 0.

The fit minimises the squared error. For a fixed alpha the model is linear in (A, P*), so they
have a closed-form least-squares solution; what is left is a 1-D search over alpha (a log-spaced
grid, then golden-section refinement around the best grid point).
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Mapping, Sequence

import numpy as np

ArrayLike = Sequence[float] | np.ndarray


@dataclasses.dataclass(frozen=True)
class ScalingFit:
  """P(C) = A / C**alpha + p_star, with the fit's coefficient of determination `r2`."""

  A: float  # pylint: disable=invalid-name  # The paper's symbol.
  alpha: float
  p_star: float
  r2: float

  def predict(self, compute: ArrayLike | float) -> np.ndarray:
    """Accuracy at `compute` (same units as the fitted points), float64."""
    c = np.asarray(compute, np.float64)
    return self.A * np.exp(-self.alpha * np.log(c)) + self.p_star


def _linear_fit(x_N: np.ndarray, y_N: np.ndarray) -> tuple[float, float, float]:
  """Least squares y ~ a * x + b; returns (a, b, sum of squared residuals)."""
  design_N2 = np.stack([x_N, np.ones_like(x_N)], axis=1)
  (a, b), *_ = np.linalg.lstsq(design_N2, y_N, rcond=None)
  residual_N = y_N - (a * x_N + b)
  return float(a), float(b), float(residual_N @ residual_N)


def fit_scaling_law(compute: ArrayLike, accuracy: ArrayLike, *,
                    alpha_range: tuple[float, float] = (1e-3, 5.0),
                    grid_size: int = 400, tol: float = 1e-12) -> ScalingFit:
  """Fits P(C) = A / C**alpha + P* to (compute, accuracy) points.

  Args:
    compute: [N] positive training compute per point.
    accuracy: [N] accuracy per point (fraction or %; the fit keeps the unit).
    alpha_range: search interval for alpha (> 0).
    grid_size: log-spaced grid points over `alpha_range` before refinement.
    tol: relative tolerance on alpha of the golden-section refinement.

  Returns:
    ScalingFit with A in accuracy-units x compute-units**alpha.
  """
  c_N = np.asarray(compute, np.float64).ravel()
  p_N = np.asarray(accuracy, np.float64).ravel()
  if c_N.shape != p_N.shape:
    raise ValueError(f"compute has {c_N.size} points but accuracy has {p_N.size}; pass one "
                     "accuracy per compute value.")
  if c_N.size < 3:
    raise ValueError(f"{c_N.size} points cannot determine the 3 parameters (A, alpha, P*): "
                     "pass at least 3, ideally one per evaluated checkpoint.")
  if not np.all(np.isfinite(c_N) & (c_N > 0)):
    raise ValueError(f"compute must be finite and > 0; got {c_N.tolist()}.")
  if not np.all(np.isfinite(p_N)):
    raise ValueError(f"accuracy must be finite; got {p_N.tolist()}.")
  lo, hi = alpha_range
  if not 0 < lo < hi:
    raise ValueError(f"alpha_range={alpha_range} must satisfy 0 < low < high.")
  if np.unique(c_N).size < 3:
    raise ValueError("the scaling law needs at least 3 distinct compute values.")

  # Relative compute keeps C**-alpha near 1 however large the units (FLOPs ~ 1e21).
  c_ref = math.exp(float(np.mean(np.log(c_N))))
  log_c_N = np.log(c_N / c_ref)

  def sse(log_alpha: float) -> float:
    return _linear_fit(np.exp(-math.exp(log_alpha) * log_c_N), p_N)[2]

  grid = np.linspace(math.log(lo), math.log(hi), grid_size)
  losses = np.array([sse(g) for g in grid])
  best = int(np.argmin(losses))
  log_alpha = _golden_section(sse, grid[max(best - 1, 0)], grid[min(best + 1, grid_size - 1)],
                              tol=tol)
  if sse(log_alpha) > losses[best]:  # Keep the grid point if refinement did not improve it.
    log_alpha = float(grid[best])

  alpha = math.exp(log_alpha)
  a_rel, p_star, residual = _linear_fit(np.exp(-alpha * log_c_N), p_N)
  total = float(((p_N - p_N.mean()) ** 2).sum())
  r2 = 1.0 - residual / total if total > 0 else (1.0 if residual == 0 else 0.0)
  # a_rel / (C/c_ref)**alpha == (a_rel * c_ref**alpha) / C**alpha.
  return ScalingFit(A=a_rel * c_ref**alpha, alpha=alpha, p_star=p_star, r2=r2)


def _golden_section(f, lo: float, hi: float, *, tol: float, max_iter: int = 200) -> float:
  """Minimiser of a unimodal `f` on [lo, hi]."""
  inv_phi = (math.sqrt(5.0) - 1.0) / 2.0
  x1, x2 = hi - inv_phi * (hi - lo), lo + inv_phi * (hi - lo)
  f1, f2 = f(x1), f(x2)
  for _ in range(max_iter):
    if hi - lo <= tol * max(1.0, abs(lo) + abs(hi)):
      break
    if f1 <= f2:
      hi, x2, f2 = x2, x1, f1
      x1 = hi - inv_phi * (hi - lo)
      f1 = f(x1)
    else:
      lo, x1, f1 = x1, x2, f2
      x2 = lo + inv_phi * (hi - lo)
      f2 = f(x2)
  return (lo + hi) / 2.0


def plot_scaling(fits_by_split: Mapping[str, ScalingFit],
                 points_by_split: Mapping[str, tuple[ArrayLike, ArrayLike]],
                 path: str | os.PathLike, *, xlabel: str = "RL training compute",
                 ylabel: str = "next-token accuracy", title: str | None = None) -> str:
  """Saves a PNG: measured points and fitted curve per split (easy/medium/hard), log-x axis.

  Args:
    fits_by_split: split name -> ScalingFit.
    points_by_split: split name -> (compute [N], accuracy [N]).
    path: output .png path (parent directories are created).
  Returns:
    The path written.
  """
  # The Agg canvas directly, so importing this never changes pyplot's global backend.
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

  fig = Figure(figsize=(9.0, 4.4), dpi=120)
  FigureCanvasAgg(fig)
  ax = fig.add_subplot(1, 1, 1)
  splits = list(dict.fromkeys([*points_by_split, *fits_by_split]))
  all_c = [np.asarray(c, np.float64) for c, _ in points_by_split.values()]
  c_lo = min((c.min() for c in all_c if c.size), default=1.0)
  c_hi = max((c.max() for c in all_c if c.size), default=10.0)
  curve_c = np.geomspace(c_lo, c_hi if c_hi > c_lo else c_lo * 10, 200)
  for i, split in enumerate(splits):
    color = f"C{i}"
    if split in points_by_split:
      c, p = points_by_split[split]
      ax.scatter(np.asarray(c), np.asarray(p), color=color, s=18, label=f"{split} (measured)")
    if split in fits_by_split:
      fit = fits_by_split[split]
      label = f"{split}: {fit.A:.3g}/C^{fit.alpha:.3g} + {fit.p_star:.3g} (R²={fit.r2:.3f})"
      ax.plot(curve_c, fit.predict(curve_c), color=color, label=label)
  ax.set_xscale("log")
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  if title:
    ax.set_title(title)
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))  # outside: never on data
  path = os.fspath(path)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, bbox_inches="tight")
  return path
