"""Every notebook runs top to bottom with its small default parameters (issue 8)."""

import os
import pathlib

import nbclient
import nbformat
import pytest

from keras_aevb.data import default_data_dir

NOTEBOOKS = sorted((pathlib.Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path, monkeypatch):
    nb = nbformat.read(path, as_version=4)
    assert any("parameters" in c.metadata.get("tags", []) for c in nb.cells), (
        f"{path.name} has no cell tagged 'parameters' holding its budget"
    )
    data_dir = default_data_dir("mnist")
    if data_dir is None:
        pytest.skip("the MNIST IDX files are not found (set KERAS_AEVB_DATA_DIR)")
    # The kernel runs in tmp_path, where the search from the working directory finds nothing.
    monkeypatch.setenv("KERAS_AEVB_DATA_DIR", str(pathlib.Path(data_dir).resolve()))
    # Files a notebook writes (exports, figures) land in tmp_path, not in the checkout.
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
    monkeypatch.setenv("KERAS_AEVB_NOTEBOOK_OUTPUT", str(tmp_path))
    client = nbclient.NotebookClient(
        nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError naming the failing cell
    errors = [
        o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"
    ]
    assert not errors


def test_notebooks_are_committed_with_outputs():
    # Readers on a web view see the plots: every notebook carries the outputs of a real run.
    assert NOTEBOOKS, "no notebooks found"
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        images = [
            o
            for c in nb.cells
            if c.cell_type == "code"
            for o in c.outputs
            if "image/png" in o.get("data", {})
        ]
        assert images, f"{path.name} holds no plot output: run it and commit it with outputs"
        assert os.path.getsize(path) < 5_000_000, f"{path.name} is over 5 MB"
