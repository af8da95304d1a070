"""Executes every notebook in colabs/ top to bottom in a real Jupyter kernel (nbclient),
in a scratch directory, and fails on the first cell that raises.

The kernel inherits this process's environment (8 virtual CPU devices, CPU only);
the notebooks' install cell finds the package installed and does nothing.
"""

import glob
import os

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "colabs", "*.ipynb")))


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs(path, tmp_path):
  nb = nbformat.read(path, as_version=4)
  NotebookClient(nb, timeout=900, kernel_name="python3",
                 resources={"metadata": {"path": str(tmp_path)}}).execute()
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert code and all(c.execution_count for c in code), "a cell did not run"
  outputs = [o for c in code for o in c.outputs]
  assert not [o for o in outputs if o.output_type == "error"]
  text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
  assert "Traceback" not in text
  # Figures the notebook displayed were written where it ran.
  shown = [o for o in outputs if "image/png" in o.get("data", {})]
  assert len(shown) == len(glob.glob(str(tmp_path / "figures" / "*.png")))


def test_there_are_notebooks():
  assert len(NOTEBOOKS) >= 2
