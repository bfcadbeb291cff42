"""The study mode: the paper's claims measured on one run's budget.

`python -m rpt_jax.main --config=configs/local.py --mode=study` runs, over the run's workdir:

1. the run's own stages up to RPT (tokenizer, pretraining, prepared records, the "before RPT"
   evaluation), shared with `--mode=all`;
2. RPT with the configured position filter (its run of the ablation below), evaluated at
   `eval_points` steps spaced evenly in log-compute (the scaling law is a power law in
   compute), each evaluation sampling `eval_samples` answers per position, then
   `rpt_jax.scaling` fits P(C) = A / C^alpha + P* per difficulty split on their mean reward
   (`METRIC`) against the cumulative RL FLOPs (`rl_step_flops` of each step's measured mean
   response length);
3. the same RL budget (steps x contexts x G) from the same pretrained policy with every filter
   of `filters`, each on its own prepared records (every position the filter keeps: no
   per-document cap), all evaluated on the SAME held-out positions (the run's own records), the
   ablation at equal RL compute;
4. `<workdir>/study/report.md`: the Table 1 shape (standard argmax vs next-token reasoning,
   before and after RPT), the scaling fit and plot, the ablation table and the breakdown by line
   kind; `study.json` holds every number.

Each filter's RL run lives in `<workdir>/study/<filter>/` with links to the run's tokenizer and
pretrained policy (a local workdir). Everything resumes: finished evaluations are files, RL runs
resume from their checkpoints, prepared records are reused.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Sequence

import numpy as np

from rpt_jax import report as report_lib
from rpt_jax import scaling


# What the curve and the ablation read: the mean reward of `eval_samples` sampled answers per
# position, the same expectation as the accuracy of one sampled answer (the paper's metric) with
# 1/eval_samples of its sampling variance.
METRIC = "reasoning_mean_reward"


@dataclasses.dataclass(frozen=True)
class StudyConfig:
  """eval_points: evaluations along the RPT run (>= 3 to fit the scaling law; the paper's
  curve has ~6+). filters: position filters of the ablation (`rpt_jax.data.filtering.FILTERS`),
  each trained for the same RL steps. eval_samples: answers sampled per held-out position at
  every study evaluation (the curve's points and each filter's final one); their mean reward
  (`METRIC`) is what the fit and the ablation compare."""

  eval_points: int = 6
  filters: tuple[str, ...] = ("entropy", "proxy_miss", "random", "all")
  eval_samples: int = 4

  def __post_init__(self):
    object.__setattr__(self, "filters", tuple(self.filters))
    if self.eval_points < 3:
      raise ValueError(f"study.eval_points={self.eval_points} must be >= 3 (the scaling law "
                       "has 3 parameters).")
    if self.eval_samples < 1:
      raise ValueError(f"study.eval_samples={self.eval_samples} must be >= 1.")
    from rpt_jax.data import filtering  # pylint: disable=g-import-not-at-top
    unknown = [f for f in self.filters if f not in filtering.FILTERS]
    if unknown or not self.filters or len(set(self.filters)) != len(self.filters):
      raise ValueError(f"study.filters={self.filters}: name distinct filters of "
                       f"{tuple(filtering.FILTERS)}.")


# The paper's curve spans RL steps 100..1200: the first point at 1/12 of the last.
SCHEDULE_SPAN = 12.0


def eval_schedule(steps: int, points: int) -> tuple[int, ...]:
  """`points` increasing RL steps evenly spaced in log(step) from steps / SCHEDULE_SPAN to
  `steps` (rounded, kept distinct; every step 1..steps when `steps` <= `points`)."""
  if steps < 1:
    raise ValueError(f"train.steps={steps}: the study needs >= 1 RL step.")
  if steps <= points:
    return tuple(range(1, steps + 1))
  chosen = [int(round(x)) for x in np.geomspace(max(steps / SCHEDULE_SPAN, 1.0), steps, points)]
  for i in range(points):  # distinct and >= 1: each above the one before ...
    chosen[i] = max(chosen[i], chosen[i - 1] + 1 if i else 1)
  chosen[-1] = steps
  for i in range(points - 2, -1, -1):  # ... and below the one after
    chosen[i] = min(chosen[i], chosen[i + 1] - 1)
  return tuple(chosen)


def cumulative_flops(step_flops: Sequence[float], steps: Sequence[int]) -> list[float]:
  """Cumulative compute after each of `steps` (1-based) from per-step FLOPs [S]."""
  total = np.cumsum(np.asarray(step_flops, np.float64))
  return [float(total[s - 1]) for s in steps]


def _read_jsonl(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def train_step_flops(run, steps: int) -> list[float]:
  """Model FLOPs of each RL step 0..steps-1 of `run`, from its metrics.jsonl mean response
  lengths (the static `max_new_tokens` where a step's row is missing)."""
  rpt = run.spec.rpt
  lengths = {}
  for row in _read_jsonl(os.path.join(run.files, "metrics.jsonl")):
    if row.get("mode") == "train" and "reward/mean_response_length" in row:
      lengths[int(row["step"])] = float(row["reward/mean_response_length"])
  prompt_len = max(run.spec.loader.prompt_buckets)  # the sampler's static prompt width
  out = []
  for s in range(steps):
    length = lengths.get(s, rpt.max_new_tokens)
    out.append(scaling.rl_step_flops(
        run.model_config, contexts=rpt.batch_contexts, generations=rpt.num_generations,
        prompt_len=prompt_len, response_len=int(round(length if math.isfinite(length)
                                                      else rpt.max_new_tokens)),
        shared_prefix=rpt.shared_prefix))
  return out


def run_study(run, config: StudyConfig) -> str:
  """Runs the study over `run` (a `rpt_jax.pipeline.Run`); returns report.md's text."""
  out_dir = os.path.join(run.files, "study")
  os.makedirs(out_dir, exist_ok=True)
  _ = run.tokenizer
  run.pretrain()
  run.prepare()
  before = run._read_eval("before_rpt") or run.evaluate_full("before_rpt")  # pylint: disable=protected-access
  steps = run.spec.rpt.steps
  schedule = eval_schedule(steps, config.eval_points)
  main_filter = run.spec.prepare.filter
  filters = [main_filter] + [f for f in config.filters if f != main_filter]
  finals, flops, curve = {}, {}, []
  for name in filters:
    # Every filter gets its own records without the per-document cap: a cap that every filter
    # reaches would make them all keep the same positions' count from the same documents.
    sub = run.filter_run(name, os.path.join(out_dir, name), max_positions_per_document=None,
                         eval_samples=config.eval_samples)
    sub.prepare()
    labels = {s: f"step_{s}" for s in schedule} if name == main_filter else {}

    def on_step(step: int, _metrics: dict, sub=sub, labels=labels) -> None:
      if step in labels:
        sub.evaluate_full(labels[step], records_dir=run.records_dir)

    sub.train(on_step=on_step)
    for s, label in labels.items():  # any evaluation a stop before it left undone
      if sub._read_eval(label) is None:  # pylint: disable=protected-access
        raise RuntimeError(f"study: no evaluation at step {s} in {sub.files}; delete that "
                           "folder's checkpoints to rerun it.")
    finals[name] = (sub._read_eval("after_rpt")  # pylint: disable=protected-access
                    or sub.evaluate_full("after_rpt", records_dir=run.records_dir))
    per_step = train_step_flops(sub, steps)
    flops[name] = float(np.sum(per_step))
    if name == main_filter:
      compute = cumulative_flops(per_step, schedule)
      curve = [(c, sub._read_eval(labels[s])["report"])  # pylint: disable=protected-access
               for c, s in zip(compute, schedule)]
  fits = scaling.scaling_report(curve, out_dir, metric=METRIC)
  after = finals[main_filter]
  plot = report_lib.plot_report({"before RPT": before["report"], "after RPT": after["report"]},
                                os.path.join(out_dir, "before_after.png"))
  ablation = {name: {"train_positions": _train_positions(run, name, out_dir),
                     "rl_flops": flops[name], "report": finals[name]["report"]}
              for name in filters}
  study = {"steps": steps, "schedule": list(schedule), "eval_samples": config.eval_samples,
           "metric": METRIC, "before": before, "after": after,
           "curve": [{"compute": c, "step": s, "report": r} for (c, r), s in zip(curve, schedule)],
           "scaling": fits, "ablation": ablation}
  report_lib.write_report(study, out_dir, "study")
  text = study_markdown(study, main_filter, os.path.basename(fits.get("plot") or ""),
                        os.path.basename(plot))
  with open(os.path.join(out_dir, "report.md"), "w") as f:
    f.write(text)
  return text


def _train_positions(run, name: str, out_dir: str) -> int | None:
  """Training positions the filter kept (from its records' manifest)."""
  from rpt_jax.data.pipeline import read_manifest  # pylint: disable=g-import-not-at-top
  folder = os.path.join(out_dir, name, "records")
  try:
    counts = read_manifest(folder)["counts"]["train"]
  except (OSError, KeyError, ValueError):
    return None
  return int(counts.get("records", 0))


def _cell(v: Any) -> str:
  return "-" if v is None else f"{v:.2f}"


def study_markdown(study: dict[str, Any], main_filter: str, scaling_png: str,
                   before_after_png: str) -> str:
  """report.md: Table 1 shape, scaling fit + plot, ablation at equal RL compute, breakdown."""
  before, after = study["before"]["report"], study["after"]["report"]
  splits = report_lib.split_order(after)
  head = "| | " + " | ".join(f"{s} (n={after[s]['num_positions']})" for s in splits) + " |"
  rule = "|---|" + "---|" * len(splits)
  rows = [("standard next-token prediction (argmax), before RPT", before, "standard_accuracy"),
          ("next-token reasoning, before RPT", before, METRIC),
          ("standard next-token prediction (argmax), after RPT", after, "standard_accuracy"),
          (f"next-token reasoning, after RPT ({study['steps']} steps)", after,
           METRIC)]
  lines = ["# RPT study", "", "Accuracy (%) on held-out positions (the paper's Table 1 shape):",
           "", head, rule]
  lines += [f"| {name} | " + " | ".join(_cell(r[s].get(key)) for s in splits) + " |"
            for name, r, key in rows]
  lines += ["", f"![before and after RPT]({before_after_png})", "",
            "## Scaling: P(C) = A / C^alpha + P*", "",
            f"Next-token-reasoning accuracy at RL steps {study['schedule']} against cumulative "
            "RL training FLOPs (`rpt_jax.scaling`), each point the mean reward of "
            f"{study['eval_samples']} sampled answers per position:", "",
            "| split | points | A | alpha | P* | R^2 |", "|---|---|---|---|---|---|"]
  for split in splits:
    fit = study["scaling"].get(split, {})
    if "error" in fit or not fit:
      lines.append(f"| {split} | {fit.get('num_points', 0)} | {fit.get('error', '-')} | | | |")
    else:
      lines.append(f"| {split} | {fit['num_points']} | {fit['A']:.4g} | {fit['alpha']:.3g} | "
                   f"{fit['p_star']:.2f} | {fit['r2']:.3f} |")
  lines += ["", "| step | compute (FLOPs) | " + " | ".join(splits) + " |",
            "|---|---|" + "---|" * len(splits)]
  lines += [f"| {p['step']} | {p['compute']:.3g} | " + " | ".join(
      _cell(p["report"][s].get(METRIC)) for s in splits) + " |"
            for p in study["curve"]]
  if scaling_png:
    lines += ["", f"![scaling]({scaling_png})"]
  lines += ["", f"## Position filters at equal RL compute ({study['steps']} steps each)", "",
            "Next-token-reasoning accuracy (%, the mean reward of "
            f"{study['eval_samples']} sampled answers per position) on the same held-out "
            "positions:", "",
            "| filter | training positions | RL FLOPs | " + " | ".join(splits) + " |",
            "|---|---|---|" + "---|" * len(splits)]
  for name, a in study["ablation"].items():
    mark = " (the run's)" if name == main_filter else ""
    lines.append(f"| {name}{mark} | {a['train_positions']} | {a['rl_flops']:.3g} | " + " | ".join(
        _cell(a["report"][s].get(METRIC)) for s in splits) + " |")
  if "breakdown" in study["after"]:
    lines += ["", "## Where reasoning helps", "",
              report_lib.breakdown_table(study["before"].get("breakdown", {}),
                                         study["after"]["breakdown"])]
  return "\n".join(lines) + "\n"
