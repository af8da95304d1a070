"""The demo model shipped inside the package, and its loader.

A byte-level Llama of 0.86M parameters (3.3 MB) trained on two CPU cores in eight
minutes on the King James Bible, to 1.89 bits per byte on held-out verses; `python -m
pdserve_jax.cli.train_demo` makes it and writes `training.json` beside the weights
saying exactly how. It writes English words in the Bible's phrasing ("the son of the
LORD shall be"); greedy decoding soon loops on such phrases, sampling varies them.
That is all it is for: output a person can read, to show the engines at work without
downloading weights. Its tokenizer is `tokenizer.byte_tokenizer()`.

Importing this module loads no JAX; `load_demo` does.
"""

from __future__ import annotations

import os

DEMO_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "assets", "demo_model")
MAKE_COMMAND = "python -m pdserve_jax.cli.train_demo --config=train_demo"


def load_demo(mesh=None, dtype=None):
  """The demo `Model` (with its byte tokenizer, EOS 257), sharded over `mesh` if given."""
  from pdserve_jax.model import model  # jax loads here, not on import
  if not os.path.isfile(os.path.join(DEMO_DIR, model.CONFIG_FILE)):
    raise FileNotFoundError(f"no demo model at {DEMO_DIR}; make it with `{MAKE_COMMAND}` "
                            "(run from the repository root)")
  return model.load(DEMO_DIR, mesh=mesh, dtype=dtype)
