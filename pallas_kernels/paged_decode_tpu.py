"""Paged decode attention as a Pallas kernel for TPUs (Mosaic lowering).

Grid: (batch, kv head, page block). Lengths and the flattened page table are
scalar-prefetched into SMEM so the BlockSpec index maps can read them: the
k/v pools are passed `pages_per_block` times, operand i fetching page i of the
current block, so Pallas' pipeline DMAs exactly the sequence's pages (no manual
copies). Index maps clamp blocks past a sequence's end onto its last valid
block; the pipeline sees an unchanged block index and skips the copy, and the
kernel skips the compute. Each step stages its pages into one contiguous
[tokens, D] VMEM slab so the score and value matmuls are lane-dense. The
online-softmax state lives in VMEM scratch across the page-block axis, and the
query heads of one KV head are processed together as a [rows, D] block (rows
padded to the sublane tile).

Limits: q/k/v must share a dtype; the whole page table is prefetched into SMEM,
so batch * max_pages is bounded by SMEM capacity (tens of thousands of
entries); each page is its own DMA, so tiny pages mean many small copies.
Lengths are clamped to max_pages * page_size; page ids must lie in
[0, num_pages).
"""

import functools

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
import jax.numpy as jnp

from pallas_kernels import tpu_flash, validation

_NT_DIMS = (((1,), (1,)), ((), ()))  # contract the last dims: q @ k.T


def _decode_kernel(lengths_ref, page_ids_ref, q_ref, *refs, scale, page_size,
                   pages_per_block, precision):
  k_refs = refs[:pages_per_block]
  v_refs = refs[pages_per_block:2 * pages_per_block]
  o_ref, m_ref, l_ref, acc_ref, k_stage, v_stage = refs[2 * pages_per_block:]
  b, j = pl.program_id(0), pl.program_id(2)
  length = lengths_ref[b]
  block_tokens = pages_per_block * page_size
  start = j * block_tokens
  rows = q_ref.shape[0]

  @pl.when(j == 0)
  def _init():
    tpu_flash.init(m_ref, l_ref, acc_ref)

  @pl.when(start < length)
  def _compute():
    tpu_flash.stage_pages(k_refs, v_refs, k_stage, v_stage, page_size)
    q = q_ref[...].astype(k_stage.dtype)
    s = lax.dot_general(q, k_stage[...], _NT_DIMS, precision=precision,
                        preferred_element_type=jnp.float32) * scale
    pos = start + lax.broadcasted_iota(jnp.int32, (rows, block_tokens), 1)
    s = jnp.where(pos < length, s, -jnp.inf)
    v = v_stage[...]
    v_pos = start + lax.broadcasted_iota(jnp.int32, v.shape, 0)
    # Stale or non-finite values past the length.
    v = jnp.where(v_pos < length, v, jnp.zeros((), v.dtype))
    tpu_flash.update(m_ref, l_ref, acc_ref, s, v, precision)

  @pl.when(j == pl.num_programs(2) - 1)
  def _finalize():
    tpu_flash.finalize(o_ref, l_ref, acc_ref)


def _page_index_map(i, *, page_size, pages_per_block, table_width):
  """Index map of operand i: page i of the current block, clamped to the end."""

  def index_map(b, h, j, lengths_ref, page_ids_ref):
    last_page = jnp.maximum(pl.cdiv(lengths_ref[b], page_size) - 1, 0)
    block = jnp.minimum(j, last_page // pages_per_block)
    page = jnp.minimum(block * pages_per_block + i, last_page)
    return (h, page_ids_ref[b * table_width + page], 0, 0)

  return index_map


def _interpret_params(interpret):
  if interpret is True:
    return pltpu.InterpretParams()
  return interpret


@functools.partial(
    jax.jit, static_argnames=("scale", "pages_per_block", "interpret"))
def paged_decode_attention(q, k_pages, v_pages, lengths, page_tables, *,
                           scale=None, pages_per_block=None, interpret=False):
  """Paged decode attention; see `reference.paged_decode_attention_ref`.

  Args:
    q, k_pages, v_pages, lengths, page_tables, scale: as in the reference.
    pages_per_block: pages per grid step (each its own DMA); default gives
      128 tokens per step (lane-dense scores), at most 16 pages.
    interpret: False, True (TPU interpret mode with default
      `pltpu.InterpretParams`) or a `pltpu.InterpretParams`.

  Returns:
    [B, Hq, D] in q.dtype.
  """
  validation.check_decode_args(q, k_pages, v_pages, lengths, page_tables)
  batch, num_q_heads, head_dim = q.shape
  num_kv_heads, _, page_size, _ = k_pages.shape
  max_pages = page_tables.shape[1]
  group = num_q_heads // num_kv_heads
  scale = validation.default_scale(scale, head_dim)
  if pages_per_block is None:
    pages_per_block = min(16, max(1, 128 // page_size))
  pages_per_block = max(1, min(pages_per_block, max_pages))
  num_blocks = pl.cdiv(max_pages, pages_per_block)

  # Sublane tile height: 8 rows of a 32-bit type, 16 of a 16-bit one.
  tile_rows = 8 * max(1, 4 // q.dtype.itemsize)
  rows = pl.cdiv(group, tile_rows) * tile_rows  # pad the group to whole tiles
  # Pages are staged at row offsets i * page_size; when a page is not a whole
  # number of tiles (bf16 with 8-token pages) stage in float32 so every copy
  # stays tile aligned.
  stage_dtype = q.dtype if page_size % tile_rows == 0 else jnp.float32
  qg = q.reshape(batch, num_kv_heads, group, head_dim)
  qg = jnp.pad(qg, ((0, 0), (0, 0), (0, rows - group), (0, 0)))
  # 1-D so SMEM is not padded to a 2-D tile per row.
  page_ids = page_tables.reshape(-1)
  lengths = jnp.minimum(lengths, max_pages * page_size)

  # bf16 data staged as float32 is exact at default precision.
  precision = lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
  kernel = functools.partial(
      _decode_kernel, scale=scale, page_size=page_size,
      pages_per_block=pages_per_block, precision=precision)
  page_specs = [
      pl.BlockSpec((None, None, page_size, head_dim),
                   _page_index_map(i, page_size=page_size,
                                   pages_per_block=pages_per_block,
                                   table_width=max_pages))
      for i in range(pages_per_block)
  ]
  head_spec = pl.BlockSpec((None, None, rows, head_dim),
                           lambda b, h, j, *_: (b, h, 0, 0))
  out = pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2,
          grid=(batch, num_kv_heads, num_blocks),
          in_specs=[head_spec, *page_specs, *page_specs],
          out_specs=head_spec,
          scratch_shapes=[
              pltpu.VMEM((rows, 1), jnp.float32),
              pltpu.VMEM((rows, 1), jnp.float32),
              pltpu.VMEM((rows, head_dim), jnp.float32),
              pltpu.VMEM((pages_per_block * page_size, head_dim), stage_dtype),
              pltpu.VMEM((pages_per_block * page_size, head_dim), stage_dtype),
          ],
      ),
      out_shape=jax.ShapeDtypeStruct(qg.shape, q.dtype),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=(pltpu.PARALLEL, pltpu.PARALLEL,
                               pltpu.ARBITRARY)),
      interpret=_interpret_params(interpret),
      name="paged_decode_tpu",
  )(lengths, page_ids, qg, *([k_pages] * pages_per_block),
    *([v_pages] * pages_per_block))
  return out[:, :, :group].reshape(batch, num_q_heads, head_dim)
