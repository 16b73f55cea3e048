"""The notebooks run fresh, without error, and save their figures as PNG files.

Executed with nbclient on a kernel of this interpreter (the project's .venv): a kernelspec
pointing at ``sys.executable`` is written to a temporary JUPYTER_PATH, so a system-wide
"python3" kernel can never stand in. Figures go to ``results/notebooks/`` (gitignored).
Committed notebooks carry no outputs (``make strip-notebooks`` clears them).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NB_DIR = ROOT / "notebooks"
RESULTS = ROOT / "results" / "notebooks"
NOTEBOOKS = sorted(NB_DIR.glob("*.ipynb"))

#: PNGs each notebook must (re)write
FIGURES = {
    "01-export-and-explore.ipynb": [
        "01-block-histograms.png", "01-slice-bodies-supervoxels.png", "01-largest-bodies.png",
    ],
    "02-body-analysis.ipynb": [
        "02-body-footprint.png", "02-body-blocks.png", "02-body-size-per-scale.png",
    ],
    "03-precomputed-view.ipynb": ["03-precomputed-slices.png"],
}


@pytest.fixture(scope="module")
def kernel_name(tmp_path_factory, monkeypatch_module):
    d = tmp_path_factory.mktemp("jupyter") / "kernels" / "dvidetl-venv"
    d.mkdir(parents=True)
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "dvidetl (.venv)", "language": "python"}
    (d / "kernel.json").write_text(json.dumps(spec))
    monkeypatch_module.setenv("JUPYTER_PATH", str(d.parents[1]))
    return "dvidetl-venv"


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_notebooks_are_listed():
    assert [p.name for p in NOTEBOOKS] == sorted(FIGURES)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_committed_notebook_has_no_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    dirty = [i for i, c in enumerate(nb.cells)
             if c.cell_type == "code" and (c.outputs or c.execution_count is not None)]
    assert not dirty, f"{path.name}: cells {dirty} carry outputs; run `make strip-notebooks`"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_and_saves_figures(path, kernel_name):
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    t0 = time.time()
    NotebookClient(nb, timeout=600, kernel_name=kernel_name,
                   resources={"metadata": {"path": str(NB_DIR)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
              if o.output_type == "error"]
    assert not errors
    for name in FIGURES[path.name]:
        png = RESULTS / name
        assert png.exists(), f"{path.name} did not save {png}"
        assert png.stat().st_mtime >= t0 - 1, f"{png} is stale"
        data = png.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, f"{png} is not a real PNG"
