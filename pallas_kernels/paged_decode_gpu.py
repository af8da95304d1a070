"""Paged decode attention as a Pallas kernel for GPUs (Triton lowering).

Grid: (batch, kv head, split). Each program owns one KV head of one sequence
and a contiguous slice of its page table (split-K, "flash decoding"); it walks
that slice `pages_per_block` pages at a time with an online softmax, loading
the pages by gathering rows of the page pool through the page ids. All query
heads that share the KV head are processed together as one [rows, D] block,
padded up to `min_block_rows` rows because Triton's dot needs M >= 16. Splits
are merged in plain XLA afterwards.

Limits: page_size, head_dim and pages_per_block must be powers of two (Triton
tensors are power-of-two sized), head_dim >= 16, and q/k/v must share a dtype.
Lengths are clamped to max_pages * page_size; page ids must lie in
[0, num_pages). Splits are merged with their (max, sum) softmax statistics.
"""

import functools

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
import jax.numpy as jnp

from pallas_kernels import validation

_MIN_DOT = 16  # Triton's tl.dot needs every operand dim >= 16.

# Launch enough programs to cover the SMs of a large GPU a couple of times
# when picking the number of splits automatically.
_TARGET_PROGRAMS = 256


def _decode_kernel(lengths_ref, page_ids_ref, q_ref, k_pages_ref, v_pages_ref,
                   acc_ref, m_ref, l_ref, *, scale, page_size, pages_per_block,
                   blocks_per_split, precision):
  split = pl.program_id(2)
  length = lengths_ref[0]
  block_tokens = pages_per_block * page_size
  rows, head_dim = q_ref.shape

  first_page = split * blocks_per_split * pages_per_block
  seq_pages = pl.cdiv(length, page_size)
  # Only blocks holding at least one valid token are visited, so every visited
  # block has a finite row max and empty splits cost nothing.
  num_blocks = jnp.clip(
      pl.cdiv(seq_pages - first_page, pages_per_block), 0, blocks_per_split)

  q = q_ref[...]

  def body(i, carry):
    acc, m_prev, l_prev = carry
    ids = page_ids_ref[pl.ds(i * pages_per_block, pages_per_block)]
    k = k_pages_ref[ids].reshape(block_tokens, head_dim)
    v = v_pages_ref[ids].reshape(block_tokens, head_dim)
    start = (first_page + i * pages_per_block) * page_size
    valid = start + jnp.arange(block_tokens, dtype=jnp.int32) < length

    s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=precision,
                        preferred_element_type=jnp.float32) * scale
    s = jnp.where(valid[None, :], s, -jnp.inf)
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1))
    alpha = jnp.exp(m_prev - m_new)
    p = jnp.exp(s - m_new[:, None])
    # Slots past the length may hold stale or non-finite values; 0 * nan would
    # poison the row, so zero them rather than rely on p == 0.
    v = jnp.where(valid[:, None], v, jnp.zeros((), v.dtype))
    pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                         precision=precision,
                         preferred_element_type=jnp.float32)
    return (acc * alpha[:, None] + pv, m_new,
            l_prev * alpha + jnp.sum(p, axis=1))

  init = (jnp.zeros((rows, head_dim), jnp.float32),
          jnp.full((rows,), -jnp.inf, jnp.float32),
          jnp.zeros((rows,), jnp.float32))
  acc, m, l = lax.fori_loop(0, num_blocks, body, init)
  acc_ref[...] = acc
  m_ref[...] = m
  l_ref[...] = l


def _merge_splits(acc, m, l):
  """Combines per-split partial softmax states: [K, ...] -> normalised [...]."""
  m_max = jnp.max(m, axis=0)
  m_max = jnp.where(jnp.isfinite(m_max), m_max, 0.0)
  w = jnp.exp(m - m_max[None])  # empty splits have m = -inf -> weight 0
  l_tot = jnp.sum(w * l, axis=0)
  o = jnp.sum(w[..., None] * acc, axis=0)
  return jnp.where(l_tot[..., None] > 0,
                   o / jnp.where(l_tot > 0, l_tot, 1.0)[..., None], 0.0)


def _auto_splits(batch, num_kv_heads, num_blocks):
  programs = batch * num_kv_heads
  return max(1, min(num_blocks, -(-_TARGET_PROGRAMS // programs)))


@functools.partial(
    jax.jit,
    static_argnames=("scale", "pages_per_block", "num_splits",
                     "min_block_rows", "num_warps", "num_stages", "interpret"))
def paged_decode_attention(q, k_pages, v_pages, lengths, page_tables, *,
                           scale=None, pages_per_block=None, num_splits=None,
                           min_block_rows=16, num_warps=4, num_stages=2,
                           interpret=False):
  """Paged decode attention; see `reference.paged_decode_attention_ref`.

  Args:
    q, k_pages, v_pages, lengths, page_tables, scale: as in the reference.
    pages_per_block: pages loaded per inner-loop step (power of two); default
      aims at 64 tokens per step, and it is raised to reach 16 tokens.
    num_splits: page-table splits per sequence (split-K); default fills about
      256 programs.
    min_block_rows: query rows per program are padded up to at least this
      (and never below 16, Triton's minimum dot size).
    num_warps, num_stages: Triton launch parameters.
    interpret: run through the Pallas interpreter (any backend).

  Returns:
    [B, Hq, D] in q.dtype.
  """
  validation.check_decode_args(q, k_pages, v_pages, lengths, page_tables)
  batch, num_q_heads, head_dim = q.shape
  num_kv_heads, _, page_size, _ = k_pages.shape
  max_pages = page_tables.shape[1]
  group = num_q_heads // num_kv_heads
  scale = validation.default_scale(scale, head_dim)
  for name, value in (("page_size", page_size), ("head_dim", head_dim),
                      ("pages_per_block", pages_per_block or 1)):
    if not validation.is_power_of_2(value):
      raise ValueError(
          f"GPU paged decode needs a power-of-two {name}, got {value}.")
  if head_dim < _MIN_DOT:
    raise ValueError(
        f"GPU paged decode needs head_dim >= {_MIN_DOT}, got {head_dim}.")
  if pages_per_block is None:
    pages_per_block = max(1, 64 // page_size)
  pages_per_block = min(pages_per_block, pl.next_power_of_2(max_pages))
  # Triton's dot needs at least 16 keys per step; extra pages are masked.
  pages_per_block = max(pages_per_block, pl.cdiv(_MIN_DOT, page_size))

  num_blocks = pl.cdiv(max_pages, pages_per_block)
  if num_splits is None:
    num_splits = _auto_splits(batch, num_kv_heads, num_blocks)
  num_splits = max(1, min(num_splits, num_blocks))
  blocks_per_split = pl.cdiv(num_blocks, num_splits)
  num_splits = pl.cdiv(num_blocks, blocks_per_split)  # drop splits left empty
  pages_per_split = blocks_per_split * pages_per_block
  padded_pages = num_splits * pages_per_split

  rows = pl.next_power_of_2(max(group, min_block_rows, _MIN_DOT))
  qg = q.reshape(batch, num_kv_heads, group, head_dim)
  qg = jnp.pad(qg, ((0, 0), (0, 0), (0, rows - group), (0, 0)))
  # Padded table entries are never read as data (their tokens are past every
  # length) but must still be in-bounds addresses for the gather.
  page_ids = jnp.pad(page_tables, ((0, 0), (0, padded_pages - max_pages)))
  lengths = jnp.minimum(lengths, max_pages * page_size)

  precision = lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
  kernel = functools.partial(
      _decode_kernel, scale=scale, page_size=page_size,
      pages_per_block=pages_per_block, blocks_per_split=blocks_per_split,
      precision=precision)
  pool_spec = pl.BlockSpec((None, *k_pages.shape[1:]),
                           lambda b, h, s: (h, 0, 0, 0))
  state_shape = (num_splits, batch, num_kv_heads, rows)
  acc, m, l = pl.pallas_call(
      kernel,
      grid=(batch, num_kv_heads, num_splits),
      in_specs=[
          pl.BlockSpec((1,), lambda b, h, s: (b,)),
          pl.BlockSpec((None, pages_per_split), lambda b, h, s: (b, s)),
          pl.BlockSpec((None, None, rows, head_dim),
                       lambda b, h, s: (b, h, 0, 0)),
          pool_spec,
          pool_spec,
      ],
      out_specs=[
          pl.BlockSpec((None, None, None, rows, head_dim),
                       lambda b, h, s: (s, b, h, 0, 0)),
          pl.BlockSpec((None, None, None, rows), lambda b, h, s: (s, b, h, 0)),
          pl.BlockSpec((None, None, None, rows), lambda b, h, s: (s, b, h, 0)),
      ],
      out_shape=[
          jax.ShapeDtypeStruct((*state_shape, head_dim), jnp.float32),
          jax.ShapeDtypeStruct(state_shape, jnp.float32),
          jax.ShapeDtypeStruct(state_shape, jnp.float32),
      ],
      compiler_params=plgpu.CompilerParams(num_warps=num_warps,
                                           num_stages=num_stages),
      interpret=interpret,
      name="paged_decode_gpu",
  )(lengths, page_ids, qg, k_pages, v_pages)

  o = _merge_splits(acc, m, l)[:, :, :group]
  return o.reshape(batch, num_q_heads, head_dim).astype(q.dtype)
