"""The GPU kernels compiled for A100 (sm_80) and H100/H200 (sm_90) without a GPU: shared
memory, registers and spills of each, against each GPU's limits.

`pallas_kernels.gpu_compile` takes the Triton IR jax emits for CUDA and compiles it with
the `triton` package and its ptxas. The shapes are a Llama-3-8B layer's attention
(32 query heads, 8 KV heads, head_dim 128, pages of 16) as the engine calls the kernels,
with their default tunings: a packed ragged step, a decode batch, a whole-prompt
prefill; `--tests` adds every shape of the kernel tests. Per row: warps/stages, the
grid, shared memory per block against the GPU's opt-in limit, registers per thread,
stack frame and spill stores/loads per thread (local memory), and whether XLA would
launch it. float32 kernels compile for minutes: `--dtypes bfloat16` skips them.

  python benchmarks/gpu_kernels_compile.py [--dtypes bfloat16,float32] [--tests]
"""

import argparse
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if __package__ is None and __name__ == "__main__":
  sys.path.insert(0, ROOT)  # run from a checkout without an install

import jax.numpy as jnp  # noqa: E402

from pallas_kernels import flash_prefill_gpu  # noqa: E402
from pallas_kernels import gpu_compile  # noqa: E402
from pallas_kernels import paged_decode_gpu  # noqa: E402
from pallas_kernels import ragged_paged_gpu  # noqa: E402

LLAMA = dict(kv_heads=8, group=4, head_dim=128)
DECODE = paged_decode_gpu.paged_decode_attention
PREFILL = flash_prefill_gpu.prefill_attention
RAGGED = ragged_paged_gpu.ragged_paged_attention


def serving_cases(dtype):
  """(label, kernel, args): the engine's calls for Llama-3-8B, default tunings."""
  return [
      ("ragged T=512 rows=16 ctx=2048", RAGGED, gpu_compile.ragged_args(
          tokens=512, rows=16, page_size=16, max_pages=128, num_pages=4096, dtype=dtype,
          **LLAMA)),
      ("decode B=32 ctx=2048", DECODE, gpu_compile.decode_args(
          batch=32, page_size=16, max_pages=128, num_pages=4096, dtype=dtype, **LLAMA)),
      ("decode B=8 ctx=8192", DECODE, gpu_compile.decode_args(
          batch=8, page_size=16, max_pages=512, num_pages=4096, dtype=dtype, **LLAMA)),
      ("prefill B=1 T=2048", PREFILL, gpu_compile.prefill_args(
          batch=1, q_len=2048, kv_len=2048, dtype=dtype, **LLAMA)),
  ]


def test_cases(dtype):
  """Every shape of test_kernels.py and test_ragged_kernels.py."""
  sys.path.insert(0, os.path.join(ROOT, "tests"))
  from test_kernels import DECODE_SHAPES, PREFILL_SHAPES
  from test_ragged_kernels import RAGGED_SHAPES

  cases = []
  for p in DECODE_SHAPES:
    b, h, g, s, d, m = p.values[0]
    cases.append((f"decode {p.id}", DECODE, gpu_compile.decode_args(
        batch=b, kv_heads=h, group=g, page_size=s, head_dim=d, max_pages=m, dtype=dtype)))
  for p in PREFILL_SHAPES:
    b, t, tk, h, g, d = p.values[0]
    cases.append((f"prefill {p.id}", PREFILL, gpu_compile.prefill_args(
        batch=b, q_len=t, kv_len=tk, kv_heads=h, group=g, head_dim=d, dtype=dtype)))
  for p in RAGGED_SHAPES:
    h, g, s, d, m = p.values[0]
    cases.append((f"ragged {p.id}", RAGGED, gpu_compile.ragged_args(
        tokens=40, rows=6, kv_heads=h, group=g, page_size=s, head_dim=d, max_pages=m,
        num_pages=6 * m + 3, dtype=dtype)))
  return cases


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--dtypes", default="bfloat16,float32")
  parser.add_argument("--tests", action="store_true", help="add the kernel tests' shapes")
  args = parser.parse_args(argv)
  why_not = gpu_compile.available()
  if why_not is not None:
    print(f"gpu_kernels_compile.py: cannot compile here: {why_not}")
    return 0
  import triton

  from triton.backends.nvidia import compiler as nvidia

  print(f"triton {triton.__version__}, ptxas {nvidia.get_ptxas(80).version}; limits: "
        + "; ".join(f"{g.name} {g.smem_per_block // 1024} KiB smem/block, "
                    f"{g.regs_per_thread} regs/thread" for g in gpu_compile.TARGETS))
  header = (f"{'kernel and shape':<38}{'dtype':<9}{'GPU':<8}{'w/s':>4}{'grid':>14}"
            f"{'smem KiB':>10}{'limit':>7}{'regs':>6}{'stack B':>9}{'spill st/ld B':>15}"
            "  launches")
  print(header)
  print("-" * len(header))
  start = time.perf_counter()
  for dtype_name in args.dtypes.split(","):
    dtype = jnp.dtype(dtype_name)
    cases = serving_cases(dtype) + (test_cases(dtype) if args.tests else [])
    for label, fn, fn_args in cases:
      for b in gpu_compile.compile_fn(fn, fn_args):
        grid = "x".join(str(n) for n in b.call.grid)
        print(f"{label:<38}{dtype_name:<9}{'sm_%d' % b.gpu.capability:<8}"
              f"{b.call.num_warps:>2}/{b.call.num_stages:<1}{grid:>14}"
              f"{b.shared_bytes / 1024:>10.1f}{b.gpu.smem_per_block // 1024:>7}"
              f"{b.registers:>6}{b.stack_bytes:>9}"
              f"{f'{b.spill_store_bytes}/{b.spill_load_bytes}':>15}"
              f"  {'yes' if b.problem() is None else 'NO: over the smem limit'}",
              flush=True)
  print(f"compiled in {time.perf_counter() - start:.0f} s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
