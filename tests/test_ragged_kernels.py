"""Tests for the ragged paged attention kernels (interpret mode) against the reference.

Each case packs, in ONE call, decode rows, prompt chunks at non-zero starts and
whole prompts, with empty rows and tokens no row owns between and around them;
context lengths are mostly not page multiples. Poisoning as in test_kernels.py:
outputs start as NaN (the GPU interpreter fills them, TPU interpret mode runs with
uninitialized_memory="nan"), and unused cache slots, free pages and table entries
past a row's pages hold NaN, so an unwritten element or a leak of masked data fails
the isfinite + relative-error checks. Every element of every output is compared;
tokens no row owns and empty rows must be exactly 0.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels
from pallas_kernels import ragged_paged_gpu
from pallas_kernels import ragged_paged_tpu
from pallas_kernels import reference
import test_kernels
from test_kernels import (BF16_TOL, F32_TOL, _assert_close, _export_cuda, _lower,
                          _poisoned_pool, _tpu_params)

# test_kernels' fixtures: the seed, and the TPU interpreter reset (autouse).
seed = test_kernels.seed
_clean_tpu_interpreter = test_kernels._clean_tpu_interpreter


def _ragged_inputs(rng, *, kv_heads, group, page_size, head_dim, max_pages,
                   dtype=jnp.float32, shuffle=False):
  """A packed step: (q, k_pages, v_pages, q_starts, q_lens, kv_lens, page_tables).

  Rows (in token order unless `shuffle`): a decode row, a chunk at a non-zero
  start, an empty row, a whole prompt, a decode row with a full table, and a
  second chunk; gaps of unowned tokens before, between and after them.
  """
  full = max_pages * page_size

  def not_multiple(lo, hi):
    n = int(rng.integers(lo, hi + 1))
    return n - 1 if n % page_size == 0 and n - 1 >= lo else n

  chunk = int(rng.integers(2, 8))
  prompt = not_multiple(2, min(full, 11))
  chunk2 = int(rng.integers(2, 6))
  rows = [  # (q_len, kv_len)
      (1, not_multiple(2, full)),
      (chunk, not_multiple(chunk + 1, full)),
      (0, int(rng.integers(0, full + 1))),
      (prompt, prompt),
      (1, full),
      (chunk2, not_multiple(chunk2 + 1, full)),
  ]
  q_starts, t = [], int(rng.integers(1, 3))  # token 0 is never owned
  for q_len, _ in rows:
    q_starts.append(t)
    t += q_len + int(rng.integers(0, 3))
  num_tokens = t + int(rng.integers(0, 3))
  q_lens = np.array([r[0] for r in rows], np.int32)
  kv_lens = np.array([r[1] for r in rows], np.int32)
  q_starts = np.array(q_starts, np.int32)
  if shuffle:
    order = rng.permutation(len(rows))
    q_starts, q_lens, kv_lens = q_starts[order], q_lens[order], kv_lens[order]

  k, v, page_tables = _poisoned_pool(rng, kv_lens, kv_heads=kv_heads, page_size=page_size,
                                     head_dim=head_dim, max_pages=max_pages, free_pages=3)
  q = rng.standard_normal((num_tokens, kv_heads * group, head_dim))
  return (jnp.asarray(q, dtype), jnp.asarray(k, dtype), jnp.asarray(v, dtype),
          jnp.asarray(q_starts), jnp.asarray(q_lens), jnp.asarray(kv_lens),
          jnp.asarray(page_tables, jnp.int32))


def _naive_ragged(q, k_pages, v_pages, q_starts, q_lens, kv_lens, page_tables, scale=None):
  q, k_pages, v_pages = (np.asarray(x, np.float64) for x in (q, k_pages, v_pages))
  num_q_heads, head_dim = q.shape[1:]
  scale = head_dim**-0.5 if scale is None else scale
  group = num_q_heads // k_pages.shape[0]
  out = np.zeros_like(q)
  for r in range(len(q_starts)):
    table = np.asarray(page_tables[r])
    for j in range(int(q_lens[r])):
      t, n = int(q_starts[r]) + j, int(kv_lens[r]) - int(q_lens[r]) + j + 1
      for h in range(num_q_heads):
        kh = k_pages[h // group][table].reshape(-1, head_dim)[:n]
        vh = v_pages[h // group][table].reshape(-1, head_dim)[:n]
        s = kh @ q[t, h] * scale
        w = np.exp(s - s.max())
        out[t, h] = w @ vh / w.sum()
  return out


def _unowned(args):
  q_starts, q_lens = np.asarray(args[3]), np.asarray(args[4])
  owned = np.zeros(args[0].shape[0], bool)
  for s, n in zip(q_starts, q_lens):
    owned[s:s + n] = True
  return ~owned


def _check(out, args, ref, seed, tol, what):
  assert out.shape == args[0].shape and out.dtype == args[0].dtype, what
  _assert_close(out, ref, seed, tol, what)
  unowned = _unowned(args)
  assert unowned.any(), "the case must hold tokens no row owns"
  assert np.all(np.asarray(out, np.float32)[unowned] == 0), (
      f"{what}: unowned tokens not exactly 0, seed={seed}")


def _case(seed, shape, dtype=jnp.float32, shuffle=False):
  kv_heads, group, page_size, head_dim, max_pages = shape
  rng = np.random.default_rng(seed)
  args = _ragged_inputs(rng, kv_heads=kv_heads, group=group, page_size=page_size,
                        head_dim=head_dim, max_pages=max_pages, dtype=dtype,
                        shuffle=shuffle)
  return args, reference.ragged_paged_attention_ref(*args)


def test_ragged_reference_matches_naive(seed):
  args, ref = _case(seed, (2, 4, 8, 64, 3))
  _assert_close(ref, _naive_ragged(*args), seed, F32_TOL, "ragged ref")
  assert np.all(np.asarray(ref)[_unowned(args)] == 0)


# (kv_heads, group, page_size, head_dim, max_pages): GQA 1/4/8, pages 8/16/32 and
# head dims 64/128 each at least once in float32, not the whole product; rows are
# shuffled out of token order where kv_heads == 2.
RAGGED_SHAPES = [
    pytest.param((2, 1, 8, 64, 4), id="mha-S8-D64"),
    pytest.param((1, 4, 16, 128, 3), id="gqa4-S16-D128"),
    pytest.param((2, 8, 32, 64, 2), id="gqa8-S32-D64"),
    pytest.param((1, 8, 8, 128, 5), id="gqa8-S8-D128"),
    pytest.param((2, 4, 32, 128, 2), id="gqa4-S32-D128"),
]


# Small query blocks and KV blocks split every row across several blocks; the
# default tunings are covered by the bf16 and dispatcher tests.
@pytest.mark.parametrize("shape", RAGGED_SHAPES)
def test_ragged_paged_gpu_interpret(seed, shape):
  args, ref = _case(seed, shape, shuffle=shape[0] == 2)
  group, page_size = shape[1], shape[2]
  out = ragged_paged_gpu.ragged_paged_attention(
      *args, block_tokens=max(1, 16 // group), pages_per_block=max(1, 16 // page_size),
      interpret=True)
  _check(out, args, ref, seed, F32_TOL, f"gpu ragged {shape}")


@pytest.mark.parametrize("shape", RAGGED_SHAPES)
def test_ragged_paged_tpu_interpret(seed, shape):
  args, ref = _case(seed, shape, shuffle=shape[0] == 2)
  group = shape[1]
  out = ragged_paged_tpu.ragged_paged_attention(
      *args, block_tokens=8 if group == 1 else 4, pages_per_block=2,
      interpret=_tpu_params(seed))
  _check(out, args, ref, seed, F32_TOL, f"tpu ragged {shape}")


# The TPU kernel stages 8-token bf16 pages in float32 (tile alignment), 16-token
# ones in bf16: both paths; the GPU kernel has one.
@pytest.mark.parametrize("kernel,page_size", [("gpu", 16), ("tpu", 8), ("tpu", 16)])
def test_ragged_paged_bf16(seed, kernel, page_size):
  args, ref = _case(seed, (2, 4, page_size, 128, 3), dtype=jnp.bfloat16)
  if kernel == "gpu":
    out = ragged_paged_gpu.ragged_paged_attention(*args, interpret=True)
  else:
    out = ragged_paged_tpu.ragged_paged_attention(*args, interpret=_tpu_params(seed))
  _check(out, args, ref, seed, BF16_TOL, f"{kernel} ragged bf16 S{page_size}")


# --------------------------------------------------------------------------
# Dispatcher and lowering.


# As test_kernels.test_dispatch_under_jit_honours_scale: a scale other than the head
# dim's default, at a head dim no other case uses, against the naive loop.
@pytest.mark.parametrize("impl", ["reference", "pallas_gpu_interpret", "pallas_tpu_interpret"])
def test_ragged_dispatch_under_jit_honours_scale(seed, impl):
  scale, head_dim = test_kernels.SCALE, test_kernels.HEAD_DIM
  args, _ = _case(seed, (1, 4, 8, head_dim, 3))
  fn = jax.jit(pallas_kernels.ragged_paged_attention, static_argnames=("impl", "scale"))
  out = fn(*args, impl=impl, scale=scale)
  _check(out, args, _naive_ragged(*args, scale=scale), seed, F32_TOL, f"jit ragged {impl}")


@pytest.mark.parametrize("impl", ["pallas_gpu", "pallas_tpu"])
def test_ragged_forcing_kernel_on_cpu_raises(seed, impl):
  args, _ = _case(seed, (1, 4, 8, 64, 3))
  with pytest.raises(ValueError, match=rf"{impl}.*'cpu'"):
    pallas_kernels.ragged_paged_attention(*args, impl=impl)


def test_ragged_unsupported_shapes_raise(seed):
  args, _ = _case(seed, (1, 4, 8, 64, 3))
  q, k, v = args[:3]
  bad_page = (q, k[:, :, :6], v[:, :, :6], *args[3:])
  with pytest.raises(ValueError, match="power-of-two page_size"):
    pallas_kernels.ragged_paged_attention(*bad_page, impl="pallas_gpu_interpret")
  with pytest.raises(ValueError, match="block_tokens"):
    ragged_paged_tpu.ragged_paged_attention(*args, block_tokens=3, interpret=True)
  with pytest.raises(ValueError, match="`kv_lens`"):
    pallas_kernels.ragged_paged_attention(*args[:5], args[5][:2], args[6],
                                          impl="pallas_tpu_interpret")


def test_ragged_kernels_lower_for_gpu_and_tpu():
  sds = jax.ShapeDtypeStruct
  i32 = jnp.int32
  for dtype in (jnp.float32, jnp.bfloat16):
    args = (sds((200, 16, 128), dtype), sds((4, 64, 16, 128), dtype),
            sds((4, 64, 16, 128), dtype), sds((6,), i32), sds((6,), i32), sds((6,), i32),
            sds((6, 9), i32))
    exp = _export_cuda(ragged_paged_gpu.ragged_paged_attention, *args)
    assert exp.platforms == ("cuda",) and "__gpu$xla.gpu.triton" in exp.mlir_module()
    assert exp.out_avals[0].shape == args[0].shape
    assert "tpu_custom_call" in _lower(ragged_paged_tpu.ragged_paged_attention, "tpu", *args)
