"""Evaluation reports on disk and on screen: JSON, Table-1-shaped text, bar plots.

A report is `rpt_jax.evaluate.evaluate`'s {split: {metric: value}} (percent; None where not
measured). `write_report` writes one atomically, `format_table` renders it as markdown,
`summary_table` puts a before/after pair side by side (what the offline default prints),
`breakdown_table` does the same per kind of position, and `plot_report` draws one or several
labelled reports as grouped bars.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Sequence

import numpy as np

MODE_LABELS = {"proxy_accuracy": "proxy argmax (data preparation)",
               "standard_accuracy": "standard next-token prediction (argmax)",
               "reasoning_accuracy": "next-token reasoning (1 sample)",
               "reasoning_mean_reward": "next-token reasoning (mean over samples)",
               "format_rate": "answer format rate", "mean_response_length": "response tokens",
               "mean_thought_length": "thought tokens"}


def split_order(report: Mapping[str, Any]) -> list[str]:
  """The report's splits in Table 1's order: easy, medium, hard, any others, all (a report read
  back from JSON has its keys sorted)."""
  rank = {"easy": 0, "medium": 1, "hard": 2, "all": 4}
  return sorted(report, key=lambda s: rank.get(s, 3))


def format_table(report: Mapping[str, Mapping[str, Any]]) -> str:
  """A Table-1-shaped markdown table: rows = modes/metrics, columns = splits (with counts)."""
  splits = split_order(report)
  metrics = ["proxy_accuracy", "standard_accuracy", "reasoning_accuracy", "reasoning_mean_reward"]
  extra = [k for k in next(iter(report.values())) if k.startswith("pass@")] + ["format_rate"]
  header = ["mode (accuracy %)"] + [f"{s} (n={report[s]['num_positions']})" for s in splits]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for metric in metrics + extra + ["mean_response_length", "mean_thought_length"]:
    values = [report[s].get(metric) for s in splits]
    if all(v is None for v in values):
      continue
    cells = ["-" if v is None else f"{v:.2f}" for v in values]
    lines.append("| " + " | ".join([MODE_LABELS.get(metric, metric)] + cells) + " |")
  return "\n".join(lines)


def _as_labelled(reports) -> dict[str, Mapping[str, Any]]:
  first = next(iter(reports.values()), None)
  if isinstance(first, Mapping) and "num_positions" in first:
    return {"": reports}  # a single report
  return dict(reports)


def plot_report(reports, path: str | os.PathLike,
                metrics: Sequence[str] = ("standard_accuracy", "reasoning_accuracy"),
                title: str | None = None) -> str:
  """Grouped bars per split (accuracy %), one bar per (label, metric) that has values.

  `reports`: one report, or {label: report} (e.g. {'before RPT': r0, 'after RPT': r1}).
  """
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

  labelled = _as_labelled(reports)
  splits = list(dict.fromkeys(s for r in labelled.values() for s in r))
  series = [(label, m) for label, r in labelled.items() for m in metrics
            if any(r.get(s, {}).get(m) is not None for s in splits)]
  fig = Figure(figsize=(max(6.0, 1.6 * len(splits) + 0.4 * len(series)), 4.2), dpi=120)
  FigureCanvasAgg(fig)
  ax = fig.add_subplot(1, 1, 1)
  width = 0.8 / max(len(series), 1)
  x = np.arange(len(splits))
  for i, (label, metric) in enumerate(series):
    values = [labelled[label].get(s, {}).get(metric) for s in splits]
    heights = [np.nan if v is None else v for v in values]
    name = MODE_LABELS.get(metric, metric)
    ax.bar(x + (i - (len(series) - 1) / 2) * width, heights, width,
           label=f"{label}: {name}" if label else name)
  ax.set_xticks(x, [f"{s}\n(n={next(r[s]['num_positions'] for r in labelled.values() if s in r)})"
                    for s in splits])
  ax.set_ylabel("next-token accuracy (%)")
  if title:
    ax.set_title(title)
  ax.legend(fontsize=7)
  ax.grid(True, axis="y", alpha=0.3)
  path = os.fspath(path)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, bbox_inches="tight")
  return path


def write_report(report: Mapping[str, Any], out_dir: str, name: str) -> str:
  """Writes `report` as `{out_dir}/{name}.json` (atomically; sorted keys); returns the path."""
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, f"{name}.json")
  with open(path + ".tmp", "w") as f:
    json.dump(report, f, indent=1, sort_keys=True, allow_nan=False)
    f.write("\n")
  os.replace(path + ".tmp", path)
  return path


def summary_table(before: dict, after: dict) -> str:
  """Before/after RPT per difficulty split: standard argmax accuracy beside next-token reasoning
  accuracy (the paper's Table 1 shape), the answer format rate and the mean thought length."""
  fmt = lambda v, w=7: f"{'-':>{w}}" if v is None else f"{v:{w}.2f}"
  lines = ["", "Next-token reasoning accuracy on held-out positions (%) beside standard argmax "
           "accuracy, before -> after RPT:",
           f"{'split':<7} {'positions':>9} | {'standard (argmax)':>17} | "
           f"{'reasoning (1 sample)':>20} | {'format':>15} | {'thought tokens':>15}"]
  for split in split_order(after):
    b, a = before.get(split, {}), after[split]
    pair = lambda key, w=7: f"{fmt(b.get(key), w)} {fmt(a.get(key), w)}"
    lines.append(f"{split:<7} {a.get('num_positions', 0):>9} | {pair('standard_accuracy', 8)} | "
                 f"{pair('reasoning_accuracy', 10)} | {pair('format_rate')} | "
                 f"{pair('mean_thought_length')}")
  return "\n".join(lines)


def breakdown_table(before: Mapping[str, Mapping[str, Any]],
                    after: Mapping[str, Mapping[str, Any]], split: str = "hard") -> str:
  """Markdown: one row per kind of position (`rpt_jax.evaluate.breakdown` of `split`), standard
  and reasoning accuracy before/after RPT and the mean thought length after."""
  rows = after.get(split, {})
  lines = [f"| {split} positions by line kind | n | standard before | standard after | "
           "reasoning before | reasoning after | thought tokens after |",
           "|---|---|---|---|---|---|---|"]
  cell = lambda v: "-" if v is None else f"{v:.1f}"
  for kind, a in sorted(rows.items(), key=lambda kv: -kv[1]["num_positions"]):
    b = before.get(split, {}).get(kind, {})
    lines.append(f"| {kind} | {a['num_positions']} | {cell(b.get('standard_accuracy'))} | "
                 f"{cell(a.get('standard_accuracy'))} | {cell(b.get('reasoning_accuracy'))} | "
                 f"{cell(a.get('reasoning_accuracy'))} | {cell(a.get('mean_thought_length'))} |")
  return "\n".join(lines)
