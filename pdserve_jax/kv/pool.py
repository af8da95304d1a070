"""The paged KV pool on one mesh, and moving pages in and out of it.

`PagePool` holds K and V as `[layers, kv_heads, pages, page_size, head_dim]` arrays
(the per-layer slice is the `[kv_heads, pages, page_size, head_dim]` layout the
attention kernels read), with KV heads sharded over the mesh's `tp` axis. Layers
stay stacked so one gather moves a request's pages for every layer at once.
`gather_pages` / `scatter_pages` are jitted per mesh (the pool donated to the
scatter); `transfer_pages` is the in-process move between meshes with
`jax.device_put`, resharding from the source `tp` to the destination's. A
pipeline stage's pool holds only its layers (`first_layer` on): a transfer between
pipelines of different depths moves each overlap of layer ranges. Which pages
belong to whom is the host-side `PageAllocator`'s business, not this module's.
"""

from __future__ import annotations

from typing import Dict

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from pdserve_jax.model import sharding
from pdserve_jax.model.config import ModelConfig

Pool = Dict[str, jax.Array]  # {"k": ..., "v": ...}
POOL_AXES = P("layers", "kv_heads", "pages", "page_slot", "head_dim")
SCRATCH_PAGE = 0  # padded slots write here; the allocator never hands it out


class PagePool:
  """Device arrays of one instance's KV pages plus their jitted movers."""

  def __init__(self, cfg: ModelConfig, mesh: Mesh, num_pages: int, page_size: int,
               dtype=jnp.float32, first_layer: int = 0):
    """`cfg.num_layers` layers of the model, from `first_layer` on."""
    self.cfg, self.mesh = cfg, mesh
    self.layers = range(first_layer, first_layer + cfg.num_layers)
    self.num_pages, self.page_size, self.dtype = num_pages, page_size, jnp.dtype(dtype)
    self.shape = (cfg.num_layers, cfg.num_kv_heads, num_pages, page_size, cfg.head_dim)
    self.sharding = sharding.logical_sharding(mesh, POOL_AXES, self.shape)
    self.buffer_sharding = self.sharding  # a gathered buffer has the same layout
    self._zeros = jax.jit(lambda: jnp.zeros(self.shape, self.dtype),
                          out_shardings=self.sharding)
    self.arrays: Pool = {}
    self.reset()
    self._gather = jax.jit(_gather, static_argnums=(2,), out_shardings=self.sharding)
    self._scatter = jax.jit(_scatter, static_argnums=(3,), out_shardings=self.sharding,
                            donate_argnums=(0,))

  def reset(self) -> None:
    """Fresh zeroed pages: every request's KV here is gone."""
    self.arrays = {"k": self._zeros(), "v": self._zeros()}

  def lost(self) -> bool:
    """Whether the arrays were consumed (donated to a program that then failed) or
    hold a failed computation's result, so that no later program can read them."""
    try:
      if any(a.is_deleted() for a in self.arrays.values()):
        return True
      jax.block_until_ready(self.arrays)
    except Exception:  # noqa: BLE001 - any failure to read them means they are lost
      return True
    return False

  @property
  def pool_shardings(self):
    return {"k": self.sharding, "v": self.sharding}

  @property
  def bytes(self) -> int:
    return 2 * int(np.prod(self.shape)) * self.dtype.itemsize

  def gather(self, page_ids: np.ndarray, layers: range = None) -> Pool:
    """Copies the listed pages (of `layers`, model layer numbers; default all held
    here) into a contiguous buffer on this mesh."""
    return self._gather(self.arrays, np.asarray(page_ids, np.int32), self._local(layers))

  def scatter(self, buffer: Pool, page_ids: np.ndarray, layers: range = None) -> None:
    """Writes `buffer` (as made by `gather`, of `layers`) into the listed pages, in
    place."""
    self.arrays = self._scatter(self.arrays, buffer, np.asarray(page_ids, np.int32),
                                self._local(layers))

  def _local(self, layers):
    layers = self.layers if layers is None else layers
    return (layers.start - self.layers.start, layers.stop - self.layers.start)

  def read_pages(self, page_ids) -> Dict[str, np.ndarray]:
    """Host copy of some pages, for tests and debugging."""
    buf = self.gather(np.asarray(page_ids, np.int32))
    return {k: np.asarray(v) for k, v in buf.items()}


def _gather(pool: Pool, page_ids, layers):
  lo, hi = layers
  return {k: jnp.take(a[lo:hi], page_ids, axis=2) for k, a in pool.items()}


def _scatter(pool: Pool, buffer: Pool, page_ids, layers):
  lo, hi = layers
  return {k: a.at[lo:hi, :, page_ids].set(buffer[k]) for k, a in pool.items()}


def transfer_pages(src, src_pages, dst, dst_pages) -> list:
  """Copies pages from `src`'s pool into `dst`'s, across meshes, bit for bit.

  `src` and `dst` are a `PagePool` or a pipeline's stage pools (a list, layers in
  order); each overlap of a source and a destination stage's layers moves on its
  own. Both page lists have the same (bucketed) length; padding entries point at
  the scratch page on both sides. Returns at once (async dispatch) with the buffers
  as they landed on `dst`'s meshes: once they are ready, the source pages may be
  reused.
  """
  if len(src_pages) != len(dst_pages):
    raise ValueError(f"page lists differ in length: {len(src_pages)} vs {len(dst_pages)}")
  srcs = [src] if isinstance(src, PagePool) else list(src)
  dsts = [dst] if isinstance(dst, PagePool) else list(dst)
  moved = []
  for d in dsts:
    for s in srcs:
      layers = range(max(s.layers.start, d.layers.start), min(s.layers.stop, d.layers.stop))
      if layers:
        buf = jax.device_put(s.gather(src_pages, layers), d.pool_shardings)
        d.scatter(buf, dst_pages, layers)
        moved.append(buf)
  return moved
