"""Causal flash attention for prefill as a Pallas kernel for GPUs (Triton).

Grid: (batch, query head, query block). Each program keeps its query block in
registers and loops over key blocks with an online softmax; the loop stops at
the last key block any of its rows may see (min of kv_length and the block's
last absolute query position), so fully masked key blocks are never loaded.
Query head h reads KV head h // (Hq // Hkv) straight from the [B, Tk, Hkv, D]
layout (no transposes, no GQA repeat). Ragged edges are handled with masked
loads and stores, so T and Tk need not be multiples of the block sizes.

Limits: head_dim, block_q and block_k must be powers of two >= 16 (Triton
tensors are power-of-two sized and its dot needs 16) and q/k/v must share a
dtype. kv_lengths are clamped
to Tk; q_offsets are assumed >= 0.
"""

import functools

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
import jax.numpy as jnp

from pallas_kernels import validation


def _prefill_kernel(q_offsets_ref, kv_lengths_ref, q_ref, k_ref, v_ref, o_ref,
                    *, scale, q_len, block_k, precision):
  block_q, head_dim = q_ref.shape
  qi = pl.program_id(2)
  q_offset = q_offsets_ref[0]
  kv_length = kv_lengths_ref[0]

  rows = qi * block_q + jnp.arange(block_q, dtype=jnp.int32)
  row_ok = rows < q_len
  q = plgpu.load(q_ref, mask=row_ok[:, None], other=0.0)
  q_pos = q_offset + rows

  # Keys past this bound are masked for every row of the block.
  last_pos = q_offset + jnp.minimum((qi + 1) * block_q, q_len)
  hi = jnp.maximum(jnp.minimum(kv_length, last_pos), 0)

  def body(j, carry):
    acc, m_prev, l_prev = carry
    cols = j * block_k + jnp.arange(block_k, dtype=jnp.int32)
    col_ok = cols < kv_length
    # Masked loads: past kv_length (and past Tk) nothing is read, so stale
    # cache values cannot reach 0 * v and the edge block stays in bounds.
    k = plgpu.load(k_ref.at[pl.ds(j * block_k, block_k), :],
                   mask=col_ok[:, None], other=0.0)
    v = plgpu.load(v_ref.at[pl.ds(j * block_k, block_k), :],
                   mask=col_ok[:, None], other=0.0)
    s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=precision,
                        preferred_element_type=jnp.float32) * scale
    allowed = col_ok[None, :] & (cols[None, :] <= q_pos[:, None])
    s = jnp.where(allowed, s, -jnp.inf)
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1))
    # A row with nothing admissible yet keeps m = -inf; shift it by 0 so the
    # exps give 0 rather than nan.
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    alpha = jnp.exp(m_prev - m_safe)
    p = jnp.exp(s - m_safe[:, None])
    pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                         precision=precision,
                         preferred_element_type=jnp.float32)
    return (acc * alpha[:, None] + pv, m_new,
            l_prev * alpha + jnp.sum(p, axis=1))

  init = (jnp.zeros((block_q, head_dim), jnp.float32),
          jnp.full((block_q,), -jnp.inf, jnp.float32),
          jnp.zeros((block_q,), jnp.float32))
  acc, _, l = lax.fori_loop(0, pl.cdiv(hi, block_k), body, init)
  out = acc / jnp.where(l > 0, l, 1.0)[:, None]
  out = jnp.where(l[:, None] > 0, out, 0.0)
  plgpu.store(o_ref, out.astype(o_ref.dtype), mask=row_ok[:, None])


@functools.partial(
    jax.jit,
    static_argnames=("scale", "block_q", "block_k", "num_warps", "num_stages",
                     "interpret"))
def prefill_attention(q, k, v, q_offsets, kv_lengths, *, scale=None,
                      block_q=64, block_k=64, num_warps=4, num_stages=2,
                      interpret=False):
  """Causal prefill attention; see `reference.prefill_attention_ref`.

  Args:
    q, k, v, q_offsets, kv_lengths, scale: as in the reference.
    block_q, block_k: query rows per program and keys per loop step (powers
      of two, >= 16 for Triton's dot).
    num_warps, num_stages: Triton launch parameters.
    interpret: run through the Pallas interpreter (any backend).

  Returns:
    [B, T, Hq, D] in q.dtype.
  """
  validation.check_prefill_args(q, k, v, q_offsets, kv_lengths)
  batch, q_len, num_q_heads, head_dim = q.shape
  _, kv_len, num_kv_heads, _ = k.shape
  group = num_q_heads // num_kv_heads
  scale = validation.default_scale(scale, head_dim)
  for name, value in (("head_dim", head_dim), ("block_q", block_q),
                      ("block_k", block_k)):
    if not validation.is_power_of_2(value) or value < 16:
      raise ValueError(
          f"GPU flash prefill needs {name} to be a power of two >= 16 "
          f"(Triton's dot), got {value}.")
  if q_len == 0 or kv_len == 0:
    return jnp.zeros_like(q)
  # Short inputs get smaller blocks, but never below Triton's 16-wide dot.
  block_q = min(block_q, max(16, pl.next_power_of_2(q_len)))
  block_k = min(block_k, max(16, pl.next_power_of_2(kv_len)))
  kv_lengths = jnp.minimum(kv_lengths, kv_len)

  precision = lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
  kernel = functools.partial(_prefill_kernel, scale=scale, q_len=q_len,
                             block_k=block_k, precision=precision)
  kv_spec = pl.BlockSpec((None, kv_len, None, head_dim),
                         lambda b, h, i: (b, 0, h // group, 0))
  scalar_spec = pl.BlockSpec((1,), lambda b, h, i: (b,))
  head_spec = pl.BlockSpec((None, block_q, None, head_dim),
                           lambda b, h, i: (b, i, h, 0))
  return pl.pallas_call(
      kernel,
      grid=(batch, num_q_heads, pl.cdiv(q_len, block_q)),
      in_specs=[scalar_spec, scalar_spec, head_spec, kv_spec, kv_spec],
      out_specs=head_spec,
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=plgpu.CompilerParams(num_warps=num_warps,
                                           num_stages=num_stages),
      interpret=interpret,
      name="flash_prefill_gpu",
  )(q_offsets, kv_lengths, q, k, v)
