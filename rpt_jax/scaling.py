"""The paper's scaling law of accuracy in RL training compute: the fit, the compute of an RL step,
the per-split report across checkpoints, and its plot.

    P(C) = A / C**alpha + P*

P is next-token accuracy on one difficulty split, C the RL training compute (any positive unit:
FLOPs, steps, GPU-hours; only A depends on it), alpha > 0 the decay rate and P* the asymptote.
Accuracy may be a fraction in [0, 1] or a percentage (the paper's tables use %): A and P* come out
in the same unit as the accuracies given. Accuracy rising with compute means A < 0.

The fit minimises the squared error. For a fixed alpha the model is linear in (A, P*), so they
have a closed-form least-squares solution; what is left is a 1-D search over alpha (a log-spaced
grid, then `scipy.optimize.minimize_scalar` (bounded Brent) around the best grid point).

`rl_step_flops` gives the compute C of one RL step; `scaling_report` fits every difficulty split
of a series of evaluation reports and writes `scaling.json` and `scaling.png`.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Mapping, Sequence

import numpy as np
import scipy.optimize

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
    tol: absolute tolerance on log(alpha) of the bounded refinement.

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
  lo_g, hi_g = grid[max(best - 1, 0)], grid[min(best + 1, grid_size - 1)]
  log_alpha = float(scipy.optimize.minimize_scalar(
      sse, bounds=(lo_g, hi_g), method="bounded", options={"xatol": tol}).x)
  if sse(log_alpha) > losses[best]:  # Keep the grid point if refinement did not improve it.
    log_alpha = float(grid[best])

  alpha = math.exp(log_alpha)
  a_rel, p_star, residual = _linear_fit(np.exp(-alpha * log_c_N), p_N)
  total = float(((p_N - p_N.mean()) ** 2).sum())
  r2 = 1.0 - residual / total if total > 0 else (1.0 if residual == 0 else 0.0)
  # a_rel / (C/c_ref)**alpha == (a_rel * c_ref**alpha) / C**alpha.
  return ScalingFit(A=a_rel * c_ref**alpha, alpha=alpha, p_star=p_star, r2=r2)


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


def rl_step_flops(model_config, *, contexts: int, generations: int, prompt_len: int,
                  response_len: int, shared_prefix: bool = True) -> float:
  """Model FLOPs of one RL step (rollouts + one policy update), as used for the x-axis of the
  scaling law.

      tokens = contexts * (prompt_len + generations * response_len)    (shared_prefix: each
               context prefilled once, as this project samples and trains)
             = contexts * generations * (prompt_len + response_len)    (otherwise)
      flops  = (1 + 3) * tokens * F(prompt_len + response_len)

  where F = `ModelConfig.flops_per_token` (forward FLOPs per token, attention over the full
  prompt + response window as a static-cache dense attention computes it); 1 forward for the
  rollouts (the sampler's log-probs serve as the old policy's: exact on-policy, no extra pass,
  no reference model at zero KL) and 3 for training (forward + backward = 2 forwards). Remat
  recomputation is not counted (model FLOPs, not hardware FLOPs). Pass the measured mean
  response length for the compute actually spent, or max_new_tokens for the static upper bound.
  """
  for name, v in (("contexts", contexts), ("generations", generations),
                  ("prompt_len", prompt_len), ("response_len", response_len)):
    if v < 0:
      raise ValueError(f"rl_step_flops {name}={v} must be >= 0.")
  if shared_prefix:
    tokens = contexts * (prompt_len + generations * response_len)
  else:
    tokens = contexts * generations * (prompt_len + response_len)
  return 4.0 * tokens * model_config.flops_per_token(prompt_len + response_len)


def scaling_report(points: Sequence[tuple[float, Mapping[str, Mapping[str, Any]]]],
                   out_dir: str, *, metric: str = "reasoning_accuracy") -> dict[str, Any]:
  """Fits P(C) = A / C^alpha + P* per split on `metric` (%) vs cumulative training compute C.

  Args:
    points: (train_flops, report) per evaluated checkpoint (C > 0).
    out_dir: where `scaling.png` (if any split was fitted) and `scaling.json` go.

  Returns:
    {split: {'A', 'alpha', 'p_star', 'r2', 'num_points'} or {'error': why, 'num_points'}}
    plus 'plot': the PNG path or None. A split with fewer than 3 usable points (or too few
    distinct compute values) gets 'not enough points: ...' as its error.
  """
  splits = list(dict.fromkeys(s for _, r in points for s in r))
  fits, measured, out = {}, {}, {}
  for split in splits:
    pairs = [(float(c), r[split][metric]) for c, r in points
             if split in r and r[split].get(metric) is not None]
    c, p = np.array([x for x, _ in pairs]), np.array([y for _, y in pairs])
    measured[split] = (c, p)
    if len(pairs) < 3 or np.unique(c).size < 3:
      out[split] = {"error": f"not enough points: {len(pairs)} with {metric} at "
                             f"{np.unique(c).size} distinct compute values; the fit needs 3.",
                    "num_points": len(pairs)}
      continue
    try:
      fit = fit_scaling_law(c, p)
    except ValueError as e:
      out[split] = {"error": str(e), "num_points": len(pairs)}
      continue
    fits[split] = fit
    out[split] = {"A": fit.A, "alpha": fit.alpha, "p_star": fit.p_star, "r2": fit.r2,
                  "num_points": len(pairs)}
  out["plot"] = (plot_scaling(fits, {s: measured[s] for s in fits},
                                      os.path.join(out_dir, "scaling.png"),
                                      xlabel="RL training compute (FLOPs)",
                                      ylabel=f"{metric} (%)") if fits else None)
  from rpt_jax.report import write_report  # pylint: disable=g-import-not-at-top
  write_report(out, out_dir, "scaling")
  return out
