"""Pure-jnp attention references: the ground truth and the CPU implementation.

Both functions materialise the full score matrix in float32, so memory grows
with batch * heads * q_len * kv_len; they are meant for CPU engines and tests,
not for long contexts on accelerators. Positions past a sequence's length are
masked out of both the scores and the values, so stale or non-finite data in
unused cache slots cannot leak into the output.
"""

import jax
from jax import lax
import jax.numpy as jnp

from pallas_kernels import validation


def _precision(dtype):
  # XLA on GPU would otherwise run float32 matmuls in TF32; the reference must
  # stay exact in float32.
  return lax.Precision.HIGHEST if dtype == jnp.float32 else None


def _masked_softmax_weights(s, mask):
  """Unnormalised exp-weights and their row sums; fully masked rows give 0."""
  s = jnp.where(mask, s, -jnp.inf)
  m = jnp.max(s, axis=-1, keepdims=True)
  # A fully masked row has m = -inf; shifting by 0 keeps exp(-inf) = 0 there
  # instead of exp(nan).
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.exp(s - m)
  return p, jnp.sum(p, axis=-1, keepdims=True)


def _normalise(o, l):
  return jnp.where(l > 0, o / jnp.where(l > 0, l, 1.0), 0.0)


@jax.named_call
def paged_decode_attention_ref(q, k_pages, v_pages, lengths, page_tables, *,
                               scale=None):
  """One-token attention against a paged KV cache.

  Args:
    q: [B, Hq, D] queries of the token being decoded.
    k_pages, v_pages: [Hkv, P, S, D] one layer of the page pool.
    lengths: int32 [B] valid tokens per sequence (the current one included);
      0 marks an empty slot whose output is 0. Clamped to max_pages * S.
    page_tables: int32 [B, max_pages] page ids in sequence order.
    scale: softmax scale, default D**-0.5.

  Returns:
    [B, Hq, D] in q.dtype.
  """
  validation.check_decode_args(q, k_pages, v_pages, lengths, page_tables)
  batch, num_q_heads, head_dim = q.shape
  num_kv_heads, _, page_size, _ = k_pages.shape
  group = num_q_heads // num_kv_heads
  max_tokens = page_tables.shape[1] * page_size
  scale = validation.default_scale(scale, head_dim)
  prec = _precision(q.dtype)

  # One gather per operand for the whole batch: [Hkv, B, max_pages, S, D].
  k = jnp.take(k_pages, page_tables, axis=1, mode="clip")
  v = jnp.take(v_pages, page_tables, axis=1, mode="clip")
  k = k.reshape(num_kv_heads, batch, max_tokens, head_dim)
  v = v.reshape(num_kv_heads, batch, max_tokens, head_dim)

  valid = jnp.arange(max_tokens)[None, :] < lengths[:, None]  # [B, T]
  v = jnp.where(valid[None, :, :, None], v, jnp.zeros((), v.dtype))

  qg = q.reshape(batch, num_kv_heads, group, head_dim)
  s = jnp.einsum("bhgd,hbtd->bhgt", qg, k, precision=prec,
                 preferred_element_type=jnp.float32) * scale
  p, l = _masked_softmax_weights(s, valid[:, None, None, :])
  # Normalised before the product (fully masked rows stay 0): the output is then the
  # product itself, which XLA:CPU hands to the output projection as a buffer. A
  # normalisation after it was fused into that projection's one-row matmul and
  # recomputed for every output column (llama-100m decode step at batch 1: 19.8 ->
  # 18.9 ms on the 2-core host, timed alternately in one process).
  p = p / jnp.where(l > 0, l, 1.0)
  o = jnp.einsum("bhgt,hbtd->bhgd", p, v.astype(jnp.float32),
                 precision=lax.Precision.HIGHEST,
                 preferred_element_type=jnp.float32)
  return o.reshape(batch, num_q_heads, head_dim).astype(q.dtype)


@jax.named_call
def prefill_attention_ref(q, k, v, q_offsets, kv_lengths, *, scale=None):
  """Causal attention of a block of queries against (possibly cached) keys.

  Query row i of batch b sits at absolute position q_offsets[b] + i and key j
  at position j; row i may attend key j iff j < kv_lengths[b] and
  j <= q_offsets[b] + i. Rows with no admissible key return 0.

  Args:
    q: [B, T, Hq, D].
    k, v: [B, Tk, Hkv, D].
    q_offsets: int32 [B] absolute position of query row 0.
    kv_lengths: int32 [B] valid keys per sequence.
    scale: softmax scale, default D**-0.5.

  Returns:
    [B, T, Hq, D] in q.dtype.
  """
  validation.check_prefill_args(q, k, v, q_offsets, kv_lengths)
  batch, q_len, num_q_heads, head_dim = q.shape
  _, kv_len, num_kv_heads, _ = k.shape
  group = num_q_heads // num_kv_heads
  scale = validation.default_scale(scale, head_dim)
  prec = _precision(q.dtype)

  q_pos = q_offsets[:, None] + jnp.arange(q_len)[None, :]  # [B, T]
  k_pos = jnp.arange(kv_len)
  key_valid = k_pos[None, :] < kv_lengths[:, None]  # [B, Tk]
  mask = key_valid[:, None, :] & (k_pos[None, None, :] <= q_pos[:, :, None])
  v = jnp.where(key_valid[:, :, None, None], v, jnp.zeros((), v.dtype))

  qg = q.reshape(batch, q_len, num_kv_heads, group, head_dim)
  s = jnp.einsum("bthgd,bshd->bhgts", qg, k, precision=prec,
                 preferred_element_type=jnp.float32) * scale
  p, l = _masked_softmax_weights(s, mask[:, None, None, :, :])
  o = jnp.einsum("bhgts,bshd->bhgtd", p, v.astype(jnp.float32),
                 precision=lax.Precision.HIGHEST,
                 preferred_element_type=jnp.float32)
  o = _normalise(o, l)  # [B, Hkv, G, T, D]
  o = jnp.transpose(o, (0, 3, 1, 2, 4))
  return o.reshape(batch, q_len, num_q_heads, head_dim).astype(q.dtype)


@jax.named_call
def ragged_paged_attention_ref(q, k_pages, v_pages, q_starts, q_lens, kv_lens, page_tables,
                               *, scale=None, block_tokens=64):
  """Causal attention of a packed batch of query tokens, each row reading its own
  pages of the pool.

  Row r owns query tokens q_starts[r] .. q_starts[r] + q_lens[r] - 1 of the token
  axis; its context holds kv_lens[r] tokens (this step's included), laid out in
  the pages page_tables[r] in sequence order, so its query token j sits at position
  kv_lens[r] - q_lens[r] + j and attends positions 0 .. that position. One call
  carries decode rows (q_lens 1), prompt chunks at any offset and whole prompts.
  Rows with q_lens 0 are empty; tokens no row owns return 0. Rows' token ranges
  must not overlap.

  Args:
    q: [T, Hq, D] packed query tokens.
    k_pages, v_pages: [Hkv, P, S, D] one layer of the page pool.
    q_starts, q_lens, kv_lens: int32 [R].
    page_tables: int32 [R, max_pages] page ids in sequence order.
    scale: softmax scale, default D**-0.5.
    block_tokens: query tokens gathered at once (bounds memory to
      block_tokens * max_pages * S * Hkv * D per operand).

  Returns:
    [T, Hq, D] in q.dtype.
  """
  validation.check_ragged_args(q, k_pages, v_pages, q_starts, q_lens, kv_lens, page_tables)
  num_tokens, num_q_heads, head_dim = q.shape

  # The row owning each token, and the token's position in its sequence.
  t = jnp.arange(num_tokens, dtype=jnp.int32)
  ends = q_starts + q_lens
  owned = (t[None, :] >= q_starts[:, None]) & (t[None, :] < ends[:, None])  # [R, T]
  has_row = jnp.any(owned, axis=0)
  row = jnp.argmax(owned, axis=0)
  pos = kv_lens[row] - q_lens[row] + (t - q_starts[row])
  pos = jnp.where(has_row, pos, -1)  # attends nothing

  bt = min(block_tokens, num_tokens)
  pad = -num_tokens % bt
  blocks = lambda a, fill: jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1),
                                   constant_values=fill).reshape(-1, bt, *a.shape[1:])

  def attend(args):
    # A token is one decode query over its row's pages, its keys the positions up to
    # its own (pos < kv_lens for an owned token; pos = -1 attends nothing).
    qb, rb, pb = args  # [bt, Hq, D], [bt], [bt]
    return paged_decode_attention_ref(qb, k_pages, v_pages, pb + 1, page_tables[rb],
                                      scale=scale)

  out = lax.map(attend, (blocks(q, 0), blocks(row, 0), blocks(pos, -1)))
  return out.reshape(-1, num_q_heads, head_dim)[:num_tokens]
