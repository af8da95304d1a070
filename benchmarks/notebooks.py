"""Executes the notebooks in colabs/ and saves each in place with its outputs.

  python benchmarks/notebooks.py                 # all four (`make notebooks`)
  python benchmarks/notebooks.py colabs/semipd_burst.ipynb

Each notebook runs top to bottom in a real Jupyter kernel (nbclient, as
tests/test_colabs.py does) in a scratch folder, so the figures it writes land there;
its plots stay in the notebook as PNG outputs, which GitHub and Colab show before
anyone runs a cell. A notebook with a failing cell is left as it was and the script
exits non-zero naming the cell. No cell timing metadata is saved, so a rerun changes
only what the cells printed and drew.

The kernel inherits this environment, with JAX_PLATFORMS=cpu unless set: the outputs
are a CPU runtime's (8 virtual devices, set by the notebooks themselves). A few
minutes per engine notebook on 2 shared cores, about a minute for the others.
"""

import glob
import os
import sys
import tempfile
import time

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def execute(path: str) -> None:
  nb = nbformat.read(path, as_version=4)
  start = time.perf_counter()
  with tempfile.TemporaryDirectory(prefix="pdserve_nb_") as scratch:
    client = NotebookClient(nb, timeout=900, kernel_name="python3", record_timing=False,
                            resources={"metadata": {"path": scratch}})
    try:
      client.execute()
    except CellExecutionError as e:
      name = os.path.relpath(path, ROOT)
      raise SystemExit(f"notebooks: {name} failed, left unchanged:\n{e}") from None
  code = [c for c in nb.cells if c.cell_type == "code"]
  images = sum("image/png" in o.get("data", {}) for c in code for o in c.outputs)
  nbformat.validate(nb)
  nbformat.write(nb, path)
  print(f"{os.path.relpath(path, ROOT)}: {len(code)} code cells, {images} plots, "
        f"{time.perf_counter() - start:.0f} s, {os.path.getsize(path) / 1e3:.0f} kB", flush=True)


def main():
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  paths = sys.argv[1:] or sorted(glob.glob(os.path.join(ROOT, "colabs", "*.ipynb")))
  for path in paths:
    if not path.endswith(".ipynb") or not os.path.isfile(path):
      raise SystemExit(f"notebooks: {path}: not a notebook file")
    execute(os.path.abspath(path))


if __name__ == "__main__":
  main()
