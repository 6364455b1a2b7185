"""examples/quickstart.ipynb runs top to bottom on tiny local models."""

import os
from pathlib import Path

import nbformat
from nbclient import NotebookClient

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_notebook_runs(monkeypatch):
    notebook = nbformat.read(REPO_ROOT / "examples" / "quickstart.ipynb", as_version=4)
    # The kernel imports this checkout, offline; ipykernel's inline backend renders the plot as a PNG output.
    monkeypatch.delenv("MPLBACKEND", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    client = NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": REPO_ROOT}})
    client.execute()  # raises CellExecutionError, with the cell and traceback, if any cell fails

    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    text = "".join(o.get("text", "") + o.get("data", {}).get("text/plain", "") for o in outputs)
    assert "same as the tower: True" in text
    assert "torch.Size([3, 4])" in text
    assert "'antique copper sink'" in text and "->" in text
    assert any("image/png" in output.get("data", {}) for output in outputs), "the heatmap was not drawn"
