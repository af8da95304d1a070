"""Causal flash attention for prefill as a Pallas kernel for TPUs (Mosaic).

Grid: (batch, query head, query block, key block), the key-block axis
innermost and sequential, with the online-softmax state in VMEM scratch.
q_offsets and kv_lengths are scalar-prefetched so the k/v index maps can clamp
every key block past the last one a query block may see onto that last block:
the pipeline then skips the copy and the kernel skips the compute, so fully
masked blocks cost only a grid step. Query head h reads KV head
h // (Hq // Hkv) directly (no GQA repeat).

Layout: with head_dim a multiple of 128 the [B, T, H, D] inputs are viewed as
[B, T, H*D] (a free reshape) and a head is a lane-aligned column block; other
head dims are transposed to [B, H, T, D] first, since a block may not slice
the sublane (head) dim of [.., H, D].

Limits: block_q/block_k must be multiples of 8 unless they cover the whole
sequence (16 is better for bfloat16); q/k/v must share a dtype. kv_lengths are
clamped to Tk; q_offsets are assumed >= 0.
"""

import functools

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
import jax.numpy as jnp

from pallas_kernels import tpu_flash, validation

_NT_DIMS = (((1,), (1,)), ((), ()))


def _num_needed_blocks(b, qi, q_offsets_ref, kv_lengths_ref, *, q_len,
                       block_q, block_k):
  """Key blocks that hold at least one key visible to query block qi."""
  last_pos = q_offsets_ref[b] + jnp.minimum((qi + 1) * block_q, q_len)
  hi = jnp.maximum(jnp.minimum(kv_lengths_ref[b], last_pos), 0)
  return pl.cdiv(hi, block_k)


def _prefill_kernel(q_offsets_ref, kv_lengths_ref, q_ref, k_ref, v_ref, o_ref,
                    m_ref, l_ref, acc_ref, *, scale, q_len, block_q, block_k,
                    precision):
  b, qi, kj = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  needed = _num_needed_blocks(b, qi, q_offsets_ref, kv_lengths_ref,
                              q_len=q_len, block_q=block_q, block_k=block_k)

  @pl.when(kj == 0)
  def _init():
    tpu_flash.init(m_ref, l_ref, acc_ref)

  @pl.when(kj < needed)
  def _compute():
    kv_length = kv_lengths_ref[b]
    q_pos = (q_offsets_ref[b] + qi * block_q
             + lax.broadcasted_iota(jnp.int32, (block_q, block_k), 0))
    k_pos = kj * block_k + lax.broadcasted_iota(jnp.int32,
                                                (block_q, block_k), 1)
    s = lax.dot_general(q_ref[...], k_ref[...], _NT_DIMS, precision=precision,
                        preferred_element_type=jnp.float32) * scale
    s = jnp.where((k_pos < kv_length) & (k_pos <= q_pos), s, -jnp.inf)
    v = v_ref[...]
    v_pos = kj * block_k + lax.broadcasted_iota(jnp.int32, v.shape, 0)
    # Rows past kv_length (or past Tk in the edge block) hold arbitrary data.
    v = jnp.where(v_pos < kv_length, v, jnp.zeros((), v.dtype))
    tpu_flash.update(m_ref, l_ref, acc_ref, s, v, precision)

  @pl.when(kj == pl.num_programs(3) - 1)
  def _finalize():
    tpu_flash.finalize(o_ref, l_ref, acc_ref)


def _block_size(name, block, length):
  if block >= length:
    return length  # one block spanning the whole dim is always legal
  if block % 8:
    raise ValueError(
        f"TPU flash prefill needs {name} to be a multiple of 8 (or >= the "
        f"sequence length {length}), got {block}.")
  return block


def _interpret_params(interpret):
  if interpret is True:
    return pltpu.InterpretParams()
  return interpret


@functools.partial(
    jax.jit, static_argnames=("scale", "block_q", "block_k", "interpret"))
def prefill_attention(q, k, v, q_offsets, kv_lengths, *, scale=None,
                      block_q=128, block_k=128, interpret=False):
  """Causal prefill attention; see `reference.prefill_attention_ref`.

  Args:
    q, k, v, q_offsets, kv_lengths, scale: as in the reference.
    block_q, block_k: query rows and keys per grid step.
    interpret: False, True (TPU interpret mode with default
      `pltpu.InterpretParams`) or a `pltpu.InterpretParams`.

  Returns:
    [B, T, Hq, D] in q.dtype.
  """
  validation.check_prefill_args(q, k, v, q_offsets, kv_lengths)
  batch, q_len, num_q_heads, head_dim = q.shape
  _, kv_len, num_kv_heads, _ = k.shape
  group = num_q_heads // num_kv_heads
  scale = validation.default_scale(scale, head_dim)
  if q_len == 0 or kv_len == 0:
    return jnp.zeros_like(q)
  block_q = _block_size("block_q", block_q, q_len)
  block_k = _block_size("block_k", block_k, kv_len)
  kv_lengths = jnp.minimum(kv_lengths, kv_len)
  needed = functools.partial(_num_needed_blocks, q_len=q_len, block_q=block_q,
                             block_k=block_k)

  def kv_block(b, i, j, q_offsets_ref, kv_lengths_ref):
    last = jnp.maximum(needed(b, i, q_offsets_ref, kv_lengths_ref) - 1, 0)
    return jnp.minimum(j, last)

  lane_layout = head_dim % 128 == 0
  if lane_layout:
    q_in = q.reshape(batch, q_len, num_q_heads * head_dim)
    k_in = k.reshape(batch, kv_len, num_kv_heads * head_dim)
    v_in = v.reshape(batch, kv_len, num_kv_heads * head_dim)
    q_spec = pl.BlockSpec((None, block_q, head_dim),
                          lambda b, h, i, j, *_: (b, i, h))
    kv_spec = pl.BlockSpec(
        (None, block_k, head_dim),
        lambda b, h, i, j, *refs: (b, kv_block(b, i, j, *refs), h // group))
  else:
    q_in = jnp.swapaxes(q, 1, 2)
    k_in = jnp.swapaxes(k, 1, 2)
    v_in = jnp.swapaxes(v, 1, 2)
    q_spec = pl.BlockSpec((None, None, block_q, head_dim),
                          lambda b, h, i, j, *_: (b, h, i, 0))
    kv_spec = pl.BlockSpec(
        (None, None, block_k, head_dim),
        lambda b, h, i, j, *refs: (b, h // group, kv_block(b, i, j, *refs), 0))

  precision = lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
  kernel = functools.partial(_prefill_kernel, scale=scale, q_len=q_len,
                             block_q=block_q, block_k=block_k,
                             precision=precision)
  out = pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2,
          grid=(batch, num_q_heads, pl.cdiv(q_len, block_q),
                pl.cdiv(kv_len, block_k)),
          in_specs=[q_spec, kv_spec, kv_spec],
          out_specs=q_spec,
          scratch_shapes=[
              pltpu.VMEM((block_q, 1), jnp.float32),
              pltpu.VMEM((block_q, 1), jnp.float32),
              pltpu.VMEM((block_q, head_dim), jnp.float32),
          ],
      ),
      out_shape=jax.ShapeDtypeStruct(q_in.shape, q.dtype),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=(pltpu.PARALLEL, pltpu.PARALLEL,
                               pltpu.PARALLEL, pltpu.ARBITRARY)),
      interpret=_interpret_params(interpret),
      name="flash_prefill_tpu",
  )(q_offsets, kv_lengths, q_in, k_in, v_in)
  if lane_layout:
    return out.reshape(q.shape)
  return jnp.swapaxes(out, 1, 2)
