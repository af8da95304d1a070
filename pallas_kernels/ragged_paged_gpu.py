"""Ragged paged attention as a Pallas kernel for GPUs (Triton lowering).

One call serves a packed token axis holding decode rows, prompt chunks at any
offset and whole prompts, each row reading its K/V straight from its pages of
the pool (no gather copy of the context).

Layout: the query heads sharing a KV head are folded into rows, q becoming
[Hkv, T * G', D] (row t * G' + g is token t, head g; G' is the group padded to
a power of two), so a program's query block is one [rows, D] tile.

Grid: (KV head, query block of `block_tokens` tokens). A query block may hold
the tokens of several rows: XLA finds, before the call, the first and last row
touching each block, and the program loops over those rows; for each it walks
the row's page table `pages_per_block` pages at a time up to the last position
its tokens may see, loading the pages by gathering rows of the pool through
the page ids, with an online softmax. A row's mask covers only its own tokens,
and tokens belong to one row, so one softmax state per block carries across
the rows; tokens no row owns end with nothing admitted and are written as 0.
Every program writes its whole block, so no output is left unwritten.

Limits: page_size, head_dim, block_tokens and pages_per_block must be powers of
two (Triton tensors are power-of-two sized), head_dim >= 16, and q/k/v must
share a dtype. A block's rows (block_tokens * G') are at least 16, Triton's
smallest dot, so a block of decode rows computes mostly masked rows (the K/V
loads, which bound decode, are not repeated). kv_lens are clamped to
max_pages * page_size; page ids must lie in [0, num_pages). Rows' token ranges
must not overlap; they need not be sorted, but rows sorted by q_start (as the
engine packs them) keep each block's row range tight.
"""

import functools

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
import jax.numpy as jnp

from pallas_kernels import validation

_MIN_DOT = 16  # Triton's tl.dot needs every operand dim >= 16.


def _ragged_kernel(first_row_ref, last_row_ref, q_starts_ref, q_lens_ref, kv_lens_ref,
                   page_ids_ref, q_ref, k_pages_ref, v_pages_ref, o_ref, *, scale, group,
                   block_tokens, page_size, pages_per_block, table_width, max_kv,
                   precision):
  rows, head_dim = q_ref.shape
  block_kv = pages_per_block * page_size
  blk0 = pl.program_id(1) * block_tokens
  q = q_ref[...]
  r_idx = jnp.arange(rows, dtype=jnp.int32)[:, None]
  kv_idx = jnp.arange(block_kv, dtype=jnp.int32)

  def row_body(r, carry):
    qs, ql, kl = q_starts_ref[r], q_lens_ref[r], kv_lens_ref[r]
    first_tok = jnp.maximum(qs, blk0)
    end_tok = jnp.minimum(qs + ql, blk0 + block_tokens)
    # Positions this row's tokens in the block may see: up to its last one's.
    kv_end = jnp.minimum(kl - ql + (end_tok - qs), jnp.minimum(kl, max_kv))
    kv_end = jnp.where(end_tok > first_tok, jnp.maximum(kv_end, 0), 0)
    # Block row i is token blk0 + i // G'; the row owns block rows
    # [row_lo, row_hi), and token t sits at position offset + (t - blk0).
    row_lo = (qs - blk0) * group
    row_hi = (qs + ql - blk0) * group
    offset = kl - ql - qs + blk0
    mine = (r_idx >= row_lo) & (r_idx < row_hi)

    def kv_body(j, carry):
      acc, m_prev, l_prev = carry
      ids = page_ids_ref[pl.ds(r * table_width + j * pages_per_block, pages_per_block)]
      k = k_pages_ref[ids].reshape(block_kv, head_dim)
      v = v_pages_ref[ids].reshape(block_kv, head_dim)
      pos = j * block_kv + kv_idx
      # Causality without dividing by G': pos <= offset + i // G' is
      # (pos - offset) * G' <= i for integers.
      mask = mine & (pos[None, :] < kv_end) & ((pos[None, :] - offset) * group <= r_idx)
      s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=precision,
                          preferred_element_type=jnp.float32) * scale
      s = jnp.where(mask, s, -jnp.inf)
      m_new = jnp.maximum(m_prev, jnp.max(s, axis=1))
      # Rows of other rows' tokens (or with nothing admissible yet) keep
      # m = -inf; shift them by 0 so the exps give 0 rather than nan.
      m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
      alpha = jnp.exp(m_prev - m_safe)
      p = jnp.exp(s - m_safe[:, None])
      # Slots past kv_end (stale tails, other pages of the table) may hold
      # non-finite values; 0 * nan would poison the row.
      v = jnp.where((pos < kv_end)[:, None], v, jnp.zeros((), v.dtype))
      pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                           precision=precision, preferred_element_type=jnp.float32)
      return acc * alpha[:, None] + pv, m_new, l_prev * alpha + jnp.sum(p, axis=1)

    return lax.fori_loop(0, pl.cdiv(kv_end, block_kv), kv_body, carry)

  init = (jnp.zeros((rows, head_dim), jnp.float32),
          jnp.full((rows,), -jnp.inf, jnp.float32),
          jnp.zeros((rows,), jnp.float32))
  acc, _, l = lax.fori_loop(first_row_ref[0], last_row_ref[0] + 1, row_body, init)
  out = acc / jnp.where(l > 0, l, 1.0)[:, None]
  o_ref[...] = jnp.where(l[:, None] > 0, out, 0.0).astype(o_ref.dtype)


def row_ranges(q_starts, q_lens, *, num_tokens, block_tokens):
  """First and last row touching each query block (last < first: none)."""
  rows = q_starts.shape[0]
  block_start = jnp.arange(pl.cdiv(num_tokens, block_tokens), dtype=jnp.int32) * block_tokens
  touches = ((q_lens > 0)[None, :] & (q_starts[None, :] < block_start[:, None] + block_tokens)
             & ((q_starts + q_lens)[None, :] > block_start[:, None]))  # [blocks, R]
  any_row = jnp.any(touches, axis=1)
  first = jnp.argmax(touches, axis=1).astype(jnp.int32)
  last = (rows - 1 - jnp.argmax(touches[:, ::-1], axis=1)).astype(jnp.int32)
  return jnp.where(any_row, first, 0), jnp.where(any_row, last, -1)


@functools.partial(
    jax.jit,
    static_argnames=("scale", "block_tokens", "pages_per_block", "num_warps", "num_stages",
                     "interpret"))
def ragged_paged_attention(q, k_pages, v_pages, q_starts, q_lens, kv_lens, page_tables, *,
                           scale=None, block_tokens=None, pages_per_block=None, num_warps=4,
                           num_stages=2, interpret=False):
  """Ragged paged attention; see `reference.ragged_paged_attention_ref`.

  Args:
    q, k_pages, v_pages, q_starts, q_lens, kv_lens, page_tables, scale: as in
      the reference.
    block_tokens: query tokens per program (power of two); default gives 64
      rows (tokens * padded group), and it is raised to reach 16 rows.
    pages_per_block: pages loaded per inner-loop step (power of two); default
      aims at 64 tokens per step, and it is raised to reach 16 tokens.
    num_warps, num_stages: Triton launch parameters.
    interpret: run through the Pallas interpreter (any backend).

  Returns:
    [T, Hq, D] in q.dtype.
  """
  validation.check_ragged_args(q, k_pages, v_pages, q_starts, q_lens, kv_lens, page_tables)
  num_tokens, num_q_heads, head_dim = q.shape
  num_kv_heads, _, page_size, _ = k_pages.shape
  rows, max_pages = page_tables.shape
  group = num_q_heads // num_kv_heads
  scale = validation.default_scale(scale, head_dim)
  for name, value in (("page_size", page_size), ("head_dim", head_dim),
                      ("block_tokens", block_tokens or 1),
                      ("pages_per_block", pages_per_block or 1)):
    if not validation.is_power_of_2(value):
      raise ValueError(f"GPU ragged paged attention needs a power-of-two {name}, got {value}.")
  if head_dim < _MIN_DOT:
    raise ValueError(
        f"GPU ragged paged attention needs head_dim >= {_MIN_DOT}, got {head_dim}.")
  if num_tokens == 0 or rows == 0:
    return jnp.zeros_like(q)
  group_p = pl.next_power_of_2(group)
  if block_tokens is None:
    block_tokens = max(1, 64 // group_p)
    block_tokens = min(block_tokens, pl.next_power_of_2(num_tokens))
  # Triton's dot needs at least 16 query rows; extra tokens are padding.
  block_tokens = max(block_tokens, pl.cdiv(_MIN_DOT, group_p))
  if pages_per_block is None:
    pages_per_block = max(1, 64 // page_size)
  pages_per_block = min(pages_per_block, pl.next_power_of_2(max_pages))
  # Triton's dot needs at least 16 keys per step; extra pages are masked.
  pages_per_block = max(pages_per_block, pl.cdiv(_MIN_DOT, page_size))

  num_q_blocks = pl.cdiv(num_tokens, block_tokens)
  padded_tokens = num_q_blocks * block_tokens
  block_rows = block_tokens * group_p
  # Every table row padded to whole blocks; padded entries are never read as
  # data (past every kv_end) but must still be in-bounds addresses.
  table_width = pl.cdiv(max_pages, pages_per_block) * pages_per_block
  page_ids = jnp.pad(page_tables, ((0, 0), (0, table_width - max_pages))).reshape(-1)
  first_row, last_row = row_ranges(q_starts, q_lens, num_tokens=num_tokens,
                                   block_tokens=block_tokens)
  # Fold each KV head's query heads into rows: [Hkv, T * G', D], token-major.
  qg = q.reshape(num_tokens, num_kv_heads, group, head_dim)
  qg = jnp.pad(qg, ((0, padded_tokens - num_tokens), (0, 0), (0, group_p - group), (0, 0)))
  qg = jnp.swapaxes(qg, 0, 1).reshape(num_kv_heads, padded_tokens * group_p, head_dim)

  precision = lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
  kernel = functools.partial(
      _ragged_kernel, scale=scale, group=group_p, block_tokens=block_tokens,
      page_size=page_size, pages_per_block=pages_per_block, table_width=table_width,
      max_kv=max_pages * page_size, precision=precision)
  whole = lambda n: pl.BlockSpec((n,), lambda h, b: (0,))
  block_scalar = pl.BlockSpec((1,), lambda h, b: (b,))
  pool_spec = pl.BlockSpec((None, *k_pages.shape[1:]), lambda h, b: (h, 0, 0, 0))
  q_spec = pl.BlockSpec((None, block_rows, head_dim), lambda h, b: (h, b, 0))
  out = pl.pallas_call(
      kernel,
      grid=(num_kv_heads, num_q_blocks),
      in_specs=[block_scalar, block_scalar, whole(rows), whole(rows), whole(rows),
                whole(page_ids.shape[0]), q_spec, pool_spec, pool_spec],
      out_specs=q_spec,
      out_shape=jax.ShapeDtypeStruct(qg.shape, q.dtype),
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret,
      name="ragged_paged_gpu",
  )(first_row, last_row, q_starts, q_lens, kv_lens, page_ids, qg, k_pages, v_pages)
  out = out.reshape(num_kv_heads, padded_tokens, group_p, head_dim)[:, :num_tokens, :group]
  return jnp.swapaxes(out, 0, 1).reshape(num_tokens, num_q_heads, head_dim)
