"""The analysis notebooks run headless from a clean kernel, save their figures, and are committed clean.

Each notebook is executed with nbclient in a fresh kernel of this interpreter (a kernelspec written to
a temporary JUPYTER_PATH, so a fresh CI venv needs nothing registered and no other Python's
`python3` kernel can be picked up by mistake), with DITPLAN_NOTEBOOK_FIGURES pointing at a temporary
folder; a cell that raises fails the test, and every figure the notebook shows must land there as PNG.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS_DIR = Path(__file__).resolve().parents[2] / "notebooks"
# The committed notebooks; executed copies (`01_choose_a_plan-run.ipynb`, see notebooks/README.md) are not.
NOTEBOOKS = sorted(path for path in NOTEBOOKS_DIR.glob("[0-9][0-9]_*.ipynb") if re.fullmatch(r"\d\d_[a-z_]+", path.stem))
KERNEL = "ditplan-tests"
# Figures each notebook must save (file stems after its two-digit prefix); a notebook may save more.
EXPECTED_FIGURES = {
    "01": {"pareto_by_cluster", "methods_by_cluster"},
    "02": {"predicted_vs_published", "scaling_curves"},
    "03": {"timelines", "breakdown_2gpus", "breakdown_8gpus"},
    "04": {"measured_vs_predicted"},
}
# Seconds one cell may take: 04's sweep cell profiles the machine and runs four tiny pipelines (about
# a minute on an idle 2-core machine) when no fidelity CSV is there; the margin is for a loaded one.
CELL_TIMEOUT_S = 420


@pytest.fixture(scope="module")
def kernel_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A JUPYTER_PATH holding one kernelspec that starts ipykernel on this very interpreter."""
    root = tmp_path_factory.mktemp("jupyter")
    spec = root / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "ditplan tests", "language": "python",
    }))
    return root


def test_every_notebook_is_listed() -> None:
    assert [path.name[:2] for path in NOTEBOOKS] == sorted(EXPECTED_FIGURES)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_notebook_has_no_outputs(path: Path) -> None:
    notebook = nbformat.read(path, as_version=4)
    dirty = [index for index, cell in enumerate(notebook.cells)
             if cell.cell_type == "code" and (cell.outputs or cell.execution_count is not None)]
    assert not dirty, f"{path.name}: cells {dirty} carry outputs; clear them before committing"


@pytest.mark.timeout(480)
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_and_saves_its_figures(path: Path, kernel_path: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    figures = tmp_path / "figures"
    monkeypatch.setenv("JUPYTER_PATH", str(kernel_path))
    monkeypatch.setenv("DITPLAN_NOTEBOOK_FIGURES", str(figures))
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(notebook, kernel_name=KERNEL, timeout=CELL_TIMEOUT_S,
                            resources={"metadata": {"path": str(NOTEBOOKS_DIR)}})
    client.execute()  # raises CellExecutionError, naming the cell, if any cell raises

    prefix = path.name[:2]
    saved = {png.stem.removeprefix(f"{prefix}_") for png in figures.glob(f"{prefix}_*.png")}
    missing = EXPECTED_FIGURES[prefix] - saved
    assert not missing, f"{path.name} did not save {sorted(missing)} to DITPLAN_NOTEBOOK_FIGURES"
    assert all(png.stat().st_size > 10_000 for png in figures.glob("*.png")), "a saved figure is (nearly) empty"
    # The figures were shown in the notebook too, and it ends with its answer in words.
    images = sum("image/png" in output.get("data", {}) for cell in notebook.cells if cell.cell_type == "code"
                 for output in cell.outputs)
    assert images >= len(EXPECTED_FIGURES[prefix])
    last = notebook.cells[-1]
    answer = "".join(output.get("text", "") for output in last.outputs if output.get("name") == "stdout")
    assert len(answer.split()) >= 20, f"{path.name}: the last cell should print the answer in words"
