"""Per-step metrics: `metrics.jsonl` and TensorBoard event files in the workdir (process 0 only).

`metrics.jsonl` holds one JSON object per logged step, `{"step": s, "mode": ..., name: value}`;
a resumed run appends, dropping lines of steps at or past the resume step first, so the file
always reads as one uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Mapping

import jax
import numpy as np


def to_float(value: Any) -> float:
  """A Python float from a scalar jax/numpy value (NaN/Inf kept)."""
  return float(np.asarray(value))


class MetricsWriter:
  """Writes scalar metrics to JSON lines and TensorBoard; a no-op on processes other than 0."""

  def __init__(self, workdir: str, *, mode: str = "train", resume_step: int | None = None,
               tensorboard: bool = True):
    self.mode = mode
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if not self.enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    if resume_step is not None and os.path.exists(self.path):
      self._truncate(resume_step)
    if tensorboard:
      try:
        from tensorboardX import SummaryWriter
        self._tb = SummaryWriter(os.path.join(workdir, "tb", mode))
      except ImportError:  # TensorBoard files are optional; JSON lines always work.
        self._tb = None

  def _truncate(self, resume_step: int) -> None:
    """Keeps only lines of other modes or of steps before `resume_step`."""
    kept = []
    with open(self.path) as f:
      for line in f:
        try:
          row = json.loads(line)
        except json.JSONDecodeError:  # A line cut by a crash.
          continue
        if row.get("mode") != self.mode or row.get("step", -1) < resume_step:
          kept.append(line if line.endswith("\n") else line + "\n")
    tmp = self.path + ".tmp"
    with open(tmp, "w") as f:
      f.writelines(kept)
    os.replace(tmp, self.path)

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    row = {"step": int(step), "mode": self.mode, "time": time.time()}
    for name, value in metrics.items():
      value = to_float(value) if not isinstance(value, (str, bool)) else value
      row[name] = value if not isinstance(value, float) or math.isfinite(value) else str(value)
      if self._tb is not None and isinstance(value, float):
        self._tb.add_scalar(f"{self.mode}/{name}", value, step)
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")

  def flush(self) -> None:
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def read_metrics(workdir: str, mode: str | None = None) -> list[dict[str, Any]]:
  """The rows of `<workdir>/metrics.jsonl` (optionally of one mode)."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  return [r for r in rows if mode is None or r.get("mode") == mode]
