"""What the three TPU attention kernels share, inside their kernel bodies.

The online-softmax state lives in VMEM scratch across a row's KV blocks: m [rows, 1]
running max, l [rows, 1] running sum of exps and acc [rows, D] running P.V, all
float32. `init` before a row's first block, `update` once per block, `finalize`
after its last; a row that saw no admissible key gets 0. `stage_pages` copies a
block's pages into one [tokens, D] slab for the paged kernels.
"""

from jax import lax
from jax.experimental import pallas as pl
import jax.numpy as jnp

_NN_DIMS = (((1,), (0,)), ((), ()))


def init(m_ref, l_ref, acc_ref):
  m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
  l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
  acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)


def update(m_ref, l_ref, acc_ref, s, v, precision):
  """Folds one block in: scores s f32 [rows, n], -inf where a key is not admissible,
  and values v [n, D] whose slots past the valid keys the caller zeroed (they may
  hold stale or non-finite data, and 0 * nan would poison the row)."""
  m_prev = m_ref[...]
  m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
  # Rows with nothing admissible yet keep m = -inf; shift them by 0 so the exps
  # give 0 rather than nan.
  m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
  alpha = jnp.exp(m_prev - m_safe)
  p = jnp.exp(s - m_safe)
  m_ref[...] = m_new
  l_ref[...] = l_ref[...] * alpha + jnp.sum(p, axis=1, keepdims=True)
  acc_ref[...] = acc_ref[...] * alpha + lax.dot_general(
      p.astype(v.dtype), v, _NN_DIMS, precision=precision,
      preferred_element_type=jnp.float32)


def finalize(o_ref, l_ref, acc_ref):
  l = l_ref[...]
  out = acc_ref[...] / jnp.where(l > 0, l, 1.0)
  o_ref[...] = jnp.where(l > 0, out, 0.0).astype(o_ref.dtype)


def stage_pages(k_refs, v_refs, k_stage, v_stage, page_size: int):
  """Page i of the block (k_refs[i], v_refs[i]) into rows [i * page_size, ...) of
  the slabs, so both matmuls are lane-dense instead of page-sized slivers."""
  for i, (k_ref, v_ref) in enumerate(zip(k_refs, v_refs)):
    rows = pl.ds(i * page_size, page_size)
    k_stage[rows, :] = k_ref[...].astype(k_stage.dtype)
    v_stage[rows, :] = v_ref[...].astype(v_stage.dtype)
