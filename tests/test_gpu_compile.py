"""The GPU (Triton-lowered) kernels compiled for A100 (sm_80) and H100/H200 (sm_90) on
this machine, which has no GPU: `pallas_kernels.gpu_compile` takes the TTIR jax emits
for CUDA and runs the `triton` package's compiler and ptxas on it. Every shape of the
kernel tests (test_kernels.py, test_ragged_kernels.py, where the interpreter checks the
numbers) is compiled in bfloat16, the dtype a GPU serves in, and must fit each GPU's
shared memory per block, which XLA checks before it launches a Triton kernel. Skipped,
saying why, where `triton` is not installed. (float32 compiles take minutes:
benchmarks/gpu_kernels_compile.py prints them.)
"""

import functools

import jax.numpy as jnp
import pytest

from pallas_kernels import flash_prefill_gpu, gpu_compile, paged_decode_gpu, ragged_paged_gpu
from test_kernels import DECODE_SHAPES, PREFILL_SHAPES
from test_ragged_kernels import RAGGED_SHAPES

_why_not = gpu_compile.available()
pytestmark = pytest.mark.skipif(_why_not is not None, reason=str(_why_not))


def _decode(shape):
  batch, kv_heads, group, page_size, head_dim, max_pages = shape
  return gpu_compile.decode_args(batch=batch, kv_heads=kv_heads, group=group,
                                 page_size=page_size, head_dim=head_dim, max_pages=max_pages,
                                 dtype=jnp.bfloat16)


def _prefill(shape):
  batch, q_len, kv_len, kv_heads, group, head_dim = shape
  return gpu_compile.prefill_args(batch=batch, q_len=q_len, kv_len=kv_len, kv_heads=kv_heads,
                                  group=group, head_dim=head_dim, dtype=jnp.bfloat16)


def _ragged(shape):
  kv_heads, group, page_size, head_dim, max_pages = shape
  # test_ragged_kernels packs 6 rows into at most ~40 tokens.
  return gpu_compile.ragged_args(tokens=40, rows=6, kv_heads=kv_heads, group=group,
                                 page_size=page_size, head_dim=head_dim, max_pages=max_pages,
                                 num_pages=6 * max_pages + 3, dtype=jnp.bfloat16)


CASES = ([pytest.param(paged_decode_gpu.paged_decode_attention, _decode(p.values[0]),
                       id=f"decode-{p.id}") for p in DECODE_SHAPES]
         + [pytest.param(flash_prefill_gpu.prefill_attention, _prefill(p.values[0]),
                         id=f"prefill-{p.id}") for p in PREFILL_SHAPES]
         + [pytest.param(ragged_paged_gpu.ragged_paged_attention, _ragged(p.values[0]),
                         id=f"ragged-{p.id}") for p in RAGGED_SHAPES])


@pytest.mark.parametrize("fn,args", CASES)
def test_kernel_compiles_and_fits_a100_and_h100(fn, args):
  """Catches a kernel Triton cannot compile for a GPU generation (a block shape or an
  op its pipeline rejects) and one whose blocks outgrow the GPU's shared memory."""
  builds = gpu_compile.compile_fn(fn, args)
  assert [b.gpu for b in builds] == list(gpu_compile.TARGETS)  # one kernel, each GPU
  for b in builds:
    assert b.problem() is None, b.problem()
    assert 0 < b.shared_bytes and 0 < b.registers <= b.gpu.regs_per_thread, b


def test_shared_memory_over_a_gpus_limit_is_reported():
  """The check bites, per GPU: 256-key prefill blocks in four pipeline stages buffer
  three blocks of K and V ahead (3 x 64 KiB), over an A100's 163 KiB a block and under
  an H100's 227 KiB. Catches a check against the wrong limit, or none."""
  fn = functools.partial(flash_prefill_gpu.prefill_attention, block_q=16, block_k=256,
                         num_stages=4)
  args = gpu_compile.prefill_args(batch=1, q_len=512, kv_len=1024, kv_heads=1, group=1,
                                  head_dim=64, dtype=jnp.bfloat16)
  a100, h100 = gpu_compile.compile_fn(fn, args)
  assert a100.shared_bytes == h100.shared_bytes > gpu_compile.A100.smem_per_block
  assert "flash_prefill_gpu needs" in a100.problem() and "A100" in a100.problem()
  assert h100.problem() is None
