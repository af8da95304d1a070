"""Ragged paged attention as a Pallas kernel for TPUs (Mosaic lowering).

One call serves a packed token axis holding decode rows, prompt chunks at any
offset and whole prompts, each row reading its K/V straight from its pages of
the pool (no gather copy of the context).

Layout: the query heads sharing a KV head are folded into rows, q becoming
[Hkv, T * G, D] (row t * G + g is token t, head g), and the token axis is cut
into query blocks of `block_tokens` tokens. A query block may hold the tokens
of several rows, so the work is a list of (query block, row) pairs, built in
XLA from the scalar arguments before the call (every query block gets at least
one pair, so tokens no row owns are still written, as 0). Rows' token ranges
are disjoint, so there are at most cdiv(T, block_tokens) + R pairs: that is
the grid's static length, and pairs past the real count repeat the last one
(same blocks, so the pipeline copies nothing) and compute nothing.

Grid: (KV head, pair, KV block). The pair list and the page table are
scalar-prefetched into SMEM, so the BlockSpec index maps can read them: the
k/v pools are passed `pages_per_block` times, operand i fetching page i of the
pair's current KV block, so Pallas' pipeline DMAs exactly the row's pages. KV
blocks past the last one the pair's tokens may see are clamped onto it; the
pipeline sees an unchanged block index and skips the copy, and the kernel
skips the compute. Pairs of one query block are consecutive, so the output
block stays resident across them and the online-softmax state (VMEM scratch)
carries from row to row: a row's mask covers only its own tokens, so each
token's state is updated by its row alone.

Limits: q/k/v must share a dtype; block_tokens * G must be a whole number of
sublane tiles (8 rows in float32, 16 in bfloat16) unless one block covers all
tokens. The page table (and 9 words per pair) live in SMEM, so R * max_pages
is bounded by SMEM capacity (tens of thousands of entries); each page is its
own DMA. kv_lens are clamped to max_pages * page_size; page ids must lie in
[0, num_pages). Rows' token ranges must not overlap (pairs past the bound
would be dropped); they need not be sorted, but rows sorted by q_start (as
the engine packs them) keep the pair list short.
"""

import functools
import math

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
import jax.numpy as jnp

from pallas_kernels import tpu_flash, validation

_NT_DIMS = (((1,), (1,)), ((), ()))  # contract the last dims: q @ k.T

# Fields of one pair's entry in the flat pair table.
_ROW, _BLOCK, _NEEDED, _LAST_PAGE, _KV_END, _ROW_LO, _ROW_HI, _OFFSET, _FLAGS = range(9)
_FIELDS = 9
_FIRST, _LAST = 1, 2  # _FLAGS bits: first / last pair of its query block


def build_pairs(q_starts, q_lens, kv_lens, *, num_tokens, block_tokens, group,
                page_size, max_pages, block_kv):
  """The (query block, row) work list: int32 [pairs * _FIELDS], flattened.

  Per pair: the row (R is a phantom empty row, for query blocks no row
  touches), the query block, the KV blocks and last page the pair needs, the
  end of the KV positions it reads, the block rows (token * group + head) its
  row owns, the position offset of its tokens, and the first/last flags.
  """
  rows = q_starts.shape[0]
  num_blocks = pl.cdiv(num_tokens, block_tokens)
  num_pairs = num_blocks + rows
  q_ends = q_starts + q_lens
  block_start = jnp.arange(num_blocks, dtype=jnp.int32) * block_tokens
  touches = ((q_lens > 0)[None, :] & (q_starts[None, :] < block_start[:, None] + block_tokens)
             & (q_ends[None, :] > block_start[:, None]))  # [blocks, R]
  untouched = ~jnp.any(touches, axis=1, keepdims=True)
  # Row-major nonzero keeps a query block's pairs together, blocks in order.
  flat = jnp.concatenate([touches, untouched], axis=1).reshape(-1)
  count = jnp.sum(flat, dtype=jnp.int32)
  (idx,) = jnp.nonzero(flat, size=num_pairs, fill_value=0)
  idx = idx.astype(jnp.int32)
  p = jnp.arange(num_pairs, dtype=jnp.int32)
  valid = p < count
  # Padding pairs repeat the last real one, so their blocks need no copy.
  idx = jnp.where(valid, idx, idx[jnp.maximum(count - 1, 0)])
  block, row = idx // (rows + 1), idx % (rows + 1)

  pad = lambda a: jnp.concatenate([a, jnp.zeros((1,), jnp.int32)])
  qs, ql, kl = pad(q_starts)[row], pad(q_lens)[row], pad(kv_lens)[row]
  blk0 = block * block_tokens
  first_tok = jnp.maximum(qs, blk0)
  end_tok = jnp.minimum(jnp.minimum(qs + ql, blk0 + block_tokens), num_tokens)
  # Positions this pair reads: up to its last token's, within the context.
  last_pos = kl - ql + (end_tok - 1 - qs)
  kv_end = jnp.minimum(last_pos + 1, jnp.minimum(kl, max_pages * page_size))
  kv_end = jnp.where(valid & (end_tok > first_tok), jnp.maximum(kv_end, 0), 0)
  needed = pl.cdiv(kv_end, block_kv)
  last_page = jnp.maximum(pl.cdiv(kv_end, page_size) - 1, 0)
  # Block row i is token blk0 + i // G; the row owns block rows
  # [row_lo, row_hi), and token t sits at position offset + (t - blk0).
  block_rows = block_tokens * group
  row_lo = jnp.clip((qs - blk0) * group, 0, block_rows)
  row_hi = jnp.clip((qs + ql - blk0) * group, 0, block_rows)
  offset = kl - ql - qs + blk0
  prev = jnp.concatenate([jnp.full((1,), -1, jnp.int32), block[:-1]])
  nxt = jnp.concatenate([block[1:], jnp.full((1,), -1, jnp.int32)])
  flags = (jnp.where(valid & (block != prev), _FIRST, 0)
           | jnp.where(valid & ((p == count - 1) | (block != nxt)), _LAST, 0))
  meta = jnp.stack([row, block, needed, last_page, kv_end, row_lo, row_hi, offset, flags],
                   axis=1)
  return meta.astype(jnp.int32).reshape(-1)


def _ragged_kernel(meta_ref, page_ids_ref, q_ref, *refs, scale, group, page_size,
                   pages_per_block, precision):
  k_refs = refs[:pages_per_block]
  v_refs = refs[pages_per_block:2 * pages_per_block]
  o_ref, m_ref, l_ref, acc_ref, k_stage, v_stage = refs[2 * pages_per_block:]
  p, j = pl.program_id(1), pl.program_id(2)
  field = lambda f: meta_ref[p * _FIELDS + f]
  flags = field(_FLAGS)
  block_kv = pages_per_block * page_size
  rows = q_ref.shape[0]

  @pl.when((j == 0) & (flags & _FIRST != 0))
  def _init():
    tpu_flash.init(m_ref, l_ref, acc_ref)

  @pl.when(j < field(_NEEDED))
  def _compute():
    tpu_flash.stage_pages(k_refs, v_refs, k_stage, v_stage, page_size)
    kv_end = field(_KV_END)
    q = q_ref[...].astype(k_stage.dtype)
    s = lax.dot_general(q, k_stage[...], _NT_DIMS, precision=precision,
                        preferred_element_type=jnp.float32) * scale
    r = lax.broadcasted_iota(jnp.int32, (rows, block_kv), 0)
    pos = j * block_kv + lax.broadcasted_iota(jnp.int32, (rows, block_kv), 1)
    # Causality without dividing by G: pos <= offset + r // G is
    # (pos - offset) * G <= r for integers.
    mask = ((r >= field(_ROW_LO)) & (r < field(_ROW_HI)) & (pos < kv_end)
            & ((pos - field(_OFFSET)) * group <= r))
    # Rows of other rows' tokens have no admissible key here: update keeps them at 0.
    s = jnp.where(mask, s, -jnp.inf)
    v = v_stage[...]
    v_pos = j * block_kv + lax.broadcasted_iota(jnp.int32, v.shape, 0)
    # Slots past kv_end: stale tails, pages repeated by the clamp.
    v = jnp.where(v_pos < kv_end, v, jnp.zeros((), v.dtype))
    tpu_flash.update(m_ref, l_ref, acc_ref, s, v, precision)

  @pl.when((j == pl.num_programs(2) - 1) & (flags & _LAST != 0))
  def _finalize():
    tpu_flash.finalize(o_ref, l_ref, acc_ref)


def _page_index_map(i, *, pages_per_block, table_width):
  """Index map of operand i: page i of the pair's KV block, clamped to its end."""

  def index_map(h, p, j, meta_ref, page_ids_ref):
    base = p * _FIELDS
    block = jnp.minimum(j, jnp.maximum(meta_ref[base + _NEEDED] - 1, 0))
    page = jnp.minimum(block * pages_per_block + i, meta_ref[base + _LAST_PAGE])
    return (h, page_ids_ref[meta_ref[base + _ROW] * table_width + page], 0, 0)

  return index_map


def _interpret_params(interpret):
  if interpret is True:
    return pltpu.InterpretParams()
  return interpret


def _tokens_per_block(block_tokens, num_tokens, group, tile_rows):
  """Query tokens per block: a whole number of sublane tiles of rows."""
  step = tile_rows // math.gcd(group, tile_rows)  # tokens per whole tile of rows
  if block_tokens is None:
    block_tokens = pl.cdiv(max(1, 128 // group), step) * step  # ~128 rows
  if block_tokens >= num_tokens:
    return num_tokens  # one block spanning every token is always legal
  if block_tokens % step:
    raise ValueError(
        f"TPU ragged paged attention needs block_tokens * (q heads per KV head = "
        f"{group}) to be a multiple of {tile_rows} (a sublane tile), or block_tokens "
        f">= the {num_tokens} tokens; got block_tokens={block_tokens}.")
  return block_tokens


@functools.partial(
    jax.jit, static_argnames=("scale", "block_tokens", "pages_per_block", "interpret"))
def ragged_paged_attention(q, k_pages, v_pages, q_starts, q_lens, kv_lens, page_tables, *,
                           scale=None, block_tokens=None, pages_per_block=None,
                           interpret=False):
  """Ragged paged attention; see `reference.ragged_paged_attention_ref`.

  Args:
    q, k_pages, v_pages, q_starts, q_lens, kv_lens, page_tables, scale: as in
      the reference.
    block_tokens: query tokens per block; default gives about 128 rows
      (tokens * q heads per KV head), rounded to whole sublane tiles.
    pages_per_block: pages per grid step (each its own DMA); default gives
      128 tokens per step (lane-dense scores), at most 16 pages.
    interpret: False, True (TPU interpret mode with default
      `pltpu.InterpretParams`) or a `pltpu.InterpretParams`.

  Returns:
    [T, Hq, D] in q.dtype.
  """
  validation.check_ragged_args(q, k_pages, v_pages, q_starts, q_lens, kv_lens, page_tables)
  num_tokens, num_q_heads, head_dim = q.shape
  num_kv_heads, _, page_size, _ = k_pages.shape
  rows, max_pages = page_tables.shape
  group = num_q_heads // num_kv_heads
  scale = validation.default_scale(scale, head_dim)
  if num_tokens == 0 or rows == 0:
    return jnp.zeros_like(q)
  # Sublane tile height: 8 rows of a 32-bit type, 16 of a 16-bit one.
  tile_rows = 8 * max(1, 4 // q.dtype.itemsize)
  block_tokens = _tokens_per_block(block_tokens, num_tokens, group, tile_rows)
  if pages_per_block is None:
    pages_per_block = min(16, max(1, 128 // page_size))
  pages_per_block = max(1, min(pages_per_block, max_pages))
  block_kv = pages_per_block * page_size
  num_q_blocks = pl.cdiv(num_tokens, block_tokens)
  padded_tokens = num_q_blocks * block_tokens
  block_rows = block_tokens * group
  # Pages are staged at row offsets i * page_size; when a page is not a whole
  # number of tiles (bf16 with 8-token pages) stage in float32 so every copy
  # stays tile aligned.
  stage_dtype = q.dtype if page_size % tile_rows == 0 else jnp.float32

  meta = build_pairs(q_starts, q_lens, kv_lens, num_tokens=num_tokens,
                     block_tokens=block_tokens, group=group, page_size=page_size,
                     max_pages=max_pages, block_kv=block_kv)
  num_pairs = num_q_blocks + rows
  # The phantom row R (query blocks no row touches) reads page 0, never used.
  # 1-D so SMEM is not padded to a 2-D tile per row.
  page_ids = jnp.concatenate([page_tables, jnp.zeros((1, max_pages), jnp.int32)]).reshape(-1)
  # Fold each KV head's query heads into rows: [Hkv, T * G, D], token-major.
  qg = q.reshape(num_tokens, num_kv_heads, group, head_dim)
  qg = jnp.pad(qg, ((0, padded_tokens - num_tokens), (0, 0), (0, 0), (0, 0)))
  qg = jnp.swapaxes(qg, 0, 1).reshape(num_kv_heads, padded_tokens * group, head_dim)

  # bf16 data staged as float32 is exact at default precision.
  precision = lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
  kernel = functools.partial(
      _ragged_kernel, scale=scale, group=group, page_size=page_size,
      pages_per_block=pages_per_block, precision=precision)
  page_specs = [
      pl.BlockSpec((None, None, page_size, head_dim),
                   _page_index_map(i, pages_per_block=pages_per_block,
                                   table_width=max_pages))
      for i in range(pages_per_block)
  ]
  q_spec = pl.BlockSpec((None, block_rows, head_dim),
                        lambda h, p, j, meta_ref, _: (h, meta_ref[p * _FIELDS + _BLOCK], 0))
  out = pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2,
          grid=(num_kv_heads, num_pairs, pl.cdiv(max_pages, pages_per_block)),
          in_specs=[q_spec, *page_specs, *page_specs],
          out_specs=q_spec,
          scratch_shapes=[
              pltpu.VMEM((block_rows, 1), jnp.float32),
              pltpu.VMEM((block_rows, 1), jnp.float32),
              pltpu.VMEM((block_rows, head_dim), jnp.float32),
              pltpu.VMEM((block_kv, head_dim), stage_dtype),
              pltpu.VMEM((block_kv, head_dim), stage_dtype),
          ],
      ),
      out_shape=jax.ShapeDtypeStruct(qg.shape, q.dtype),
      compiler_params=pltpu.CompilerParams(
          # Consecutive pairs share an output block: the pair axis is sequential.
          dimension_semantics=(pltpu.PARALLEL, pltpu.ARBITRARY, pltpu.ARBITRARY)),
      interpret=_interpret_params(interpret),
      name="ragged_paged_tpu",
  )(meta, page_ids, qg, *([k_pages] * pages_per_block), *([v_pages] * pages_per_block))
  out = out.reshape(num_kv_heads, padded_tokens, group, head_dim)[:, :num_tokens]
  return jnp.swapaxes(out, 0, 1).reshape(num_tokens, num_q_heads, head_dim)
