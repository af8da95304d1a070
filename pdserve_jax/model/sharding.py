"""Meshes and the mapping from logical axes to mesh axes.

One instance runs on one mesh with a `tp` axis. Attention heads, MLP columns and the
vocabulary of the LM head are split over `tp` (Megatron style). An axis whose size
`tp` does not divide is replicated instead (e.g. 2 KV heads on a 4-way mesh: each
device keeps all KV heads, as vLLM does), so any `tp` runs any model.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

TP = "tp"

# Logical axis -> mesh axis.
RULES: Dict[str, Optional[str]] = {
    "q_heads": TP,
    "kv_heads": TP,
    "mlp": TP,
    "vocab": TP,
    "vocab_in": None,
    "embed": None,
    "head_dim": None,
    "layers": None,
    "pages": None,
    "page_slot": None,
    "batch": None,
}


def make_mesh(devices: Sequence[jax.Device]) -> Mesh:
  """A 1-D `tp` mesh over `devices`."""
  return Mesh(np.asarray(devices), (TP,))


def split_devices(sizes: Sequence[int], devices: Optional[Sequence[jax.Device]] = None):
  """Carves consecutive groups of `sizes` devices into meshes."""
  devices = list(jax.devices() if devices is None else devices)
  if sum(sizes) > len(devices):
    raise ValueError(f"meshes of sizes {list(sizes)} need {sum(sizes)} devices; "
                     f"{len(devices)} available")
  meshes, start = [], 0
  for n in sizes:
    if n <= 0:
      raise ValueError(f"a mesh needs at least one device, got size {n}")
    meshes.append(make_mesh(devices[start:start + n]))
    start += n
  return meshes


def logical_sharding(mesh: Mesh, axes: P, shape: Sequence[int]) -> NamedSharding:
  """NamedSharding for an array with logical `axes`, replicating indivisible axes."""
  spec = []
  for name, size in zip(tuple(axes) + (None,) * (len(shape) - len(axes)), shape):
    mesh_axis = RULES.get(name) if name is not None else None
    if mesh_axis is not None and size % mesh.shape[mesh_axis] != 0:
      mesh_axis = None
    spec.append(mesh_axis)
  return NamedSharding(mesh, P(*spec))


def tree_shardings(mesh: Mesh, axes_tree, shapes_tree):
  """Shardings for a tree of arrays (or ShapeDtypeStructs) given its logical axes."""
  return jax.tree.map(lambda a, s: logical_sharding(mesh, a, s.shape), axes_tree, shapes_tree,
                      is_leaf=lambda x: isinstance(x, P))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())
