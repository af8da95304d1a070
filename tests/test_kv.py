"""Page allocator invariants and bit-exact page moves between meshes."""

import jax
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import pdserve_jax as pdj
from pdserve_jax.core.pages import OutOfPages, PageAllocator
from pdserve_jax.kv.pool import PagePool, transfer_pages
from pdserve_jax.model import sharding

CFG = pdj.get_preset("tiny").replace(num_heads=8, num_kv_heads=4, head_dim=8)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["ensure", "free"]), st.integers(0, 5),
                          st.integers(1, 90)), max_size=60))
def test_allocator_invariant_under_random_ops(ops):
  alloc = PageAllocator(num_pages=24, page_size=8, reserved=1)
  for op, owner, tokens in ops:
    if op == "ensure":
      before = len(alloc.pages(owner))
      try:
        pages = alloc.ensure(owner, tokens)
        assert len(pages) >= -(-tokens // 8)
      except OutOfPages:
        assert len(alloc.pages(owner)) == before  # a failed grow takes nothing
    else:
      alloc.free(owner)
    alloc.check()
    assert 0 not in [p for o in alloc.owners() for p in alloc.pages(o)]
  for o in alloc.owners():
    alloc.free(o)
  assert alloc.num_free == alloc.capacity


def test_out_of_pages_message():
  alloc = PageAllocator(num_pages=5, page_size=4, reserved=1)
  alloc.ensure("a", 12)
  with pytest.raises(OutOfPages, match="'b' needs 2 more pages for 8 tokens; 1 of 4 free"):
    alloc.ensure("b", 8)
  alloc.check()


@pytest.mark.parametrize("src_tp,dst_tp", [(1, 2), (4, 2), (2, 4)])
def test_transfer_between_meshes_is_bit_identical(src_tp, dst_tp):
  src_mesh, dst_mesh = sharding.split_devices([src_tp, dst_tp])
  src = PagePool(CFG, src_mesh, num_pages=12, page_size=8)
  dst = PagePool(CFG, dst_mesh, num_pages=12, page_size=8)
  rng = np.random.default_rng(src_tp * 10 + dst_tp)
  fill = {k: rng.standard_normal(src.shape).astype(np.float32) for k in ("k", "v")}
  src.arrays = jax.device_put(fill, src.pool_shardings)
  src_pages, dst_pages = np.array([3, 7, 1, 0]), np.array([5, 2, 9, 0])
  moved = transfer_pages(src, src_pages, dst, dst_pages)
  assert {s.device for buf in moved for a in buf.values() for s in a.addressable_shards} == set(
      dst_mesh.devices.flat)
  got = dst.read_pages(dst_pages[:3])
  for k in ("k", "v"):
    np.testing.assert_array_equal(got[k], fill[k][:, :, src_pages[:3]])
  # Pages not named stay untouched (zero).
  untouched = [p for p in range(1, 12) if p not in dst_pages]
  assert not np.asarray(dst.read_pages(untouched)["k"]).any()


@pytest.mark.parametrize("src_stages,dst_stages", [(1, 2), (2, 1), (2, 2)])
def test_transfer_between_pipelines_of_any_depth(src_stages, dst_stages):
  """Stage pools hold consecutive layers; every layer lands once, in its stage."""
  cfg = CFG.replace(num_layers=4)
  meshes = sharding.split_devices([1] * (src_stages + dst_stages))

  def stages(n, ms):
    per = cfg.num_layers // n
    return [PagePool(cfg.replace(num_layers=per), m, num_pages=10, page_size=4,
                     first_layer=i * per) for i, m in enumerate(ms)]

  src, dst = stages(src_stages, meshes[:src_stages]), stages(dst_stages, meshes[src_stages:])
  rng = np.random.default_rng(src_stages * 10 + dst_stages)
  full = {k: rng.standard_normal((4,) + src[0].shape[1:]).astype(np.float32) for k in "kv"}
  for p in src:
    p.arrays = jax.device_put({k: a[p.layers.start:p.layers.stop] for k, a in full.items()},
                              p.pool_shardings)
  src_pages, dst_pages = np.array([2, 5, 9, 0]), np.array([7, 1, 3, 0])
  transfer_pages(src, src_pages, dst, dst_pages)
  for p in dst:
    got = p.read_pages(dst_pages[:3])
    for k in "kv":
      np.testing.assert_array_equal(
          got[k], full[k][p.layers.start:p.layers.stop][:, :, src_pages[:3]])
