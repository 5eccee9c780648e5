"""The pruning notebook runs top to bottom (so it cannot rot)."""

from __future__ import annotations

from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).parents[2] / "notebooks" / "pruning_sensitivity.ipynb"


@pytest.mark.slow
def test_pruning_sensitivity_notebook_executes(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        notebook,
        timeout=900,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert (
        sum(o.output_type == "display_data" and "image/png" in o.get("data", {}) for o in outputs)
        >= 3
    )
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "non-embedding params kept" in text and "pruned:" in text
    assert "re-fit ppl:" in text
