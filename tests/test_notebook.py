"""The Colab notebook: committed without outputs, and runs headless end to end (SMALL, on CPU).

The notebook is executed by a real Jupyter kernel (nbclient) on this interpreter, with its
`parameters` cell replaced by tiny settings; the printed before/after table is then checked
against the eval reports the run wrote, and the metrics file against the requested step count.
"""

from __future__ import annotations

import json
import os
import pathlib
import re

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
ipykernel_kernelspec = pytest.importorskip("ipykernel.kernelspec")

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "rpt_colab_tpu.ipynb"
RPT_STEPS = 3
PRETRAIN_STEPS = 10


def _read() -> nbformat.NotebookNode:
  return nbformat.read(NOTEBOOK, as_version=4)


def _parameters_cells(nb) -> list[int]:
  return [i for i, c in enumerate(nb.cells)
          if c.cell_type == "code" and "parameters" in c.metadata.get("tags", [])]


def _text(cell) -> str:
  """All text a cell printed or displayed (streams and text/plain, text/markdown results)."""
  parts = []
  for out in cell.get("outputs", []):
    if out.output_type == "stream":
      parts.append(out.text)
    elif out.output_type in ("execute_result", "display_data"):
      parts += [out.data.get("text/plain", ""), out.data.get("text/markdown", "")]
  return "".join(parts)


def test_committed_notebook_has_no_outputs_and_one_parameters_cell():
  nb = _read()
  nbformat.validate(nb)
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert code, "the notebook has no code cells"
  for i, cell in enumerate(code):
    assert cell.execution_count is None, f"code cell {i} was committed with an execution count"
    assert cell.outputs == [], f"code cell {i} was committed with outputs"
  params = _parameters_cells(nb)
  assert len(params) == 1, f"want exactly one cell tagged 'parameters', found {len(params)}"
  source = nb.cells[params[0]].source
  for name in ("HF_CHECKPOINT", "WORKDIR", "SMALL", "RPT_STEPS", "PRETRAIN_STEPS"):
    assert re.search(rf"^{name} = ", source, re.M), f"parameters cell lacks {name}"
  assert re.search(r"^SMALL = False$", source, re.M), "the committed default must be SMALL = False"


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
  """The notebook run by a python3 kernel on this interpreter, SMALL, on one CPU device."""
  tmp = tmp_path_factory.mktemp("notebook")
  workdir = tmp / "run"
  # A kernelspec whose argv is this interpreter, found first through JUPYTER_PATH.
  ipykernel_kernelspec.install(kernel_name="python3", prefix=str(tmp / "jupyter"))
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # conftest's 8 simulated devices are for the in-process tests
  env.update(JAX_PLATFORMS="cpu", MPLBACKEND="Agg", RPT_NOTEBOOK_SKIP_INSTALL="1",
             RPT_REPO_DIR=str(REPO), TOKENIZERS_PARALLELISM="false",
             PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
             JUPYTER_PATH=os.pathsep.join(
                 [str(tmp / "jupyter" / "share" / "jupyter"), env.get("JUPYTER_PATH", "")]
             ).rstrip(os.pathsep))
  nb = _read()
  (params,) = _parameters_cells(nb)
  nb.cells[params].source = "\n".join([
      'HF_CHECKPOINT = ""', f"WORKDIR = {str(workdir)!r}", "FRESH = False",
      f"PRETRAIN_STEPS = {PRETRAIN_STEPS}", f"RPT_STEPS = {RPT_STEPS}", "MAX_NEW_TOKENS = None",
      "SMALL = True"])
  old_path = os.environ.get("JUPYTER_PATH")
  os.environ["JUPYTER_PATH"] = env["JUPYTER_PATH"]  # read when the kernel spec is looked up
  try:
    client = nbclient.NotebookClient(
        nb, kernel_name="python3", timeout=300, allow_errors=False,
        resources={"metadata": {"path": str(REPO / "notebooks")}})
    try:
      client.execute(env=env)
    except nbclient.exceptions.CellExecutionError as e:
      pytest.fail(f"a notebook cell failed:\n{str(e)[-3000:]}")
  finally:
    if old_path is None:
      os.environ.pop("JUPYTER_PATH", None)
    else:
      os.environ["JUPYTER_PATH"] = old_path
  return nb, workdir


def test_every_code_cell_ran_without_errors(executed):
  nb, _ = executed
  code = [c for c in nb.cells if c.cell_type == "code"]
  counts = [c.execution_count for c in code]
  assert all(isinstance(n, int) for n in counts), f"cells without an execution count: {counts}"
  assert counts == sorted(counts) and len(set(counts)) == len(counts), counts
  errors = [o for c in code for o in c.outputs if o.output_type == "error"]
  assert not errors, [f"{o.ename}: {o.evalue}" for o in errors]


def test_ran_on_one_cpu_device_with_the_injected_small_settings(executed):
  nb, workdir = executed
  text = "".join(_text(c) for c in nb.cells if c.cell_type == "code")
  assert "RPT_NOTEBOOK_SKIP_INSTALL=1" in text  # the install was skipped: nothing fetched
  assert "| backend: cpu | devices: 1 |" in text
  assert f"RPT steps: {RPT_STEPS}" in text and f"pretrain steps: {PRETRAIN_STEPS}" in text
  # The run followed the parameters: exactly RPT_STEPS train rows, pretraining to step 10.
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows if r["mode"] == "train"] == list(range(RPT_STEPS))
  assert max(r["step"] for r in rows if r["mode"] == "pretrain") == PRETRAIN_STEPS
  assert [r["step"] for r in rows if r["mode"] == "eval"] == [0, RPT_STEPS]
  manifest_docs = sum(int(m) for m in re.findall(r"positions from (\d+) documents", text))
  assert manifest_docs == 200, text  # SMALL: 200 synthetic documents, train + eval
  for stage in ("tokenizer", "pretrain", "prepare", "eval before", "train", "eval after"):
    assert re.search(rf"\] {stage}: \d+\.\d s", text), f"stage {stage!r} did not report"


def test_plots_and_tables_match_the_written_reports(executed):
  nb, workdir = executed
  code = [c for c in nb.cells if c.cell_type == "code"]
  images = [o for c in code for o in c.outputs
            if o.output_type in ("display_data", "execute_result") and "image/png" in o.data]
  assert len(images) >= 2, "want the reward/length curves and the before/after accuracy bars"
  for name in ("rpt_curves.png", "before_after.png"):
    assert (workdir / "eval" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name

  final = _text(code[-1])
  assert "| mode (accuracy %) |" in final and "Next-token reasoning accuracy" in final
  # Each summary row (split, positions | standard before after | reasoning before after |
  # format before after | thought tokens before after) must equal the written eval reports.
  before = json.loads((workdir / "eval" / "before_rpt.json").read_text())["report"]
  after = json.loads((workdir / "eval" / "after_rpt.json").read_text())["report"]
  number = r"\s+([\d.]+)\s+([\d.]+)\s+\|"
  rows = re.findall(r"^(easy|medium|hard|all)\s+(\d+)\s+\|" + number * 3, final, re.M)
  assert sorted(r[0] for r in rows) == sorted(after), final  # the JSON keys are sorted
  for split, n, std_b, std_a, acc_b, acc_a, fmt_b, fmt_a in rows:
    assert int(n) == after[split]["num_positions"] > 0
    assert float(std_b) == pytest.approx(before[split]["standard_accuracy"], abs=0.006)
    assert float(std_a) == pytest.approx(after[split]["standard_accuracy"], abs=0.006)
    assert float(acc_b) == pytest.approx(before[split]["reasoning_accuracy"], abs=0.006)
    assert float(acc_a) == pytest.approx(after[split]["reasoning_accuracy"], abs=0.006)
    assert float(fmt_b) == pytest.approx(before[split]["format_rate"], abs=0.006)
    assert float(fmt_a) == pytest.approx(after[split]["format_rate"], abs=0.006)
  # The Table-1 row of standard (argmax) accuracy, one cell per split, from the after report.
  standard = re.search(r"^\| standard next-token prediction \(argmax\) \|(.*)\|$", final, re.M)
  assert standard, final
  header = re.search(r"^\| mode \(accuracy %\) \|(.*)\|$", final, re.M).group(1)
  splits = re.findall(r"(\w+) \(n=\d+\)", header)
  cells = [float(v) for v in standard.group(1).split("|")]
  assert sorted(splits) == sorted(after)
  assert cells == pytest.approx([after[s]["standard_accuracy"] for s in splits], abs=0.006)

