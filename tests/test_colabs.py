"""Executes every notebook in colabs/ on CPU, code cells in order in one namespace.

Shell (`!`) and magic (`%`) lines are skipped: they are Colab set-up, and the test
environment already has the package installed.
"""

import glob
import json
import os

import pytest

NOTEBOOKS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "colabs", "*.ipynb")))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs(path):
  with open(path) as f:
    nb = json.load(f)
  namespace = {"__name__": "__main__"}
  cells = [c for c in nb["cells"] if c["cell_type"] == "code"]
  assert cells, f"{path} has no code"
  for i, cell in enumerate(cells):
    src = "".join(l for l in cell["source"] if not l.lstrip().startswith(("!", "%")))
    exec(compile(src, f"{os.path.basename(path)}[cell {i}]", "exec"), namespace)


def test_there_are_notebooks():
  assert NOTEBOOKS
