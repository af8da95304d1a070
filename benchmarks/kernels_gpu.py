"""Times the pallas_kernels GPU kernels against JAX's own Pallas GPU ops.

Decode: our paged kernel vs `jax.experimental.pallas.ops.gpu.paged_attention`
(paged, same pool layout) and `...ops.gpu.decode_attention.gqa` (contiguous
[B, T, Hkv, D] cache, so it measures the cost of paging), plus the XLA
reference. Prefill: our flash kernel vs the XLA reference. Prints
milliseconds (median of several runs) and ratios against our kernel, and the
max abs difference to the reference as a sanity check.

Needs a GPU backend; anywhere else it prints a message and exits 0.
Usage: python benchmarks/kernels_gpu.py [--iters N]
"""

import argparse
import functools
import importlib.util
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

if importlib.util.find_spec("pallas_kernels") is None:
  # Run from a checkout without an install: use the repo root.
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
      __file__))))

from pallas_kernels import flash_prefill_gpu  # noqa: E402
from pallas_kernels import paged_decode_gpu  # noqa: E402
from pallas_kernels import reference  # noqa: E402

# (batch, q_heads, kv_heads, head_dim, context, page_size)
DECODE_SHAPES = [
    (32, 32, 8, 128, 2048, 16),
    (8, 32, 8, 128, 8192, 16),
    (64, 32, 8, 128, 1024, 16),
    (32, 32, 32, 128, 2048, 16),
]
# (batch, q_len, kv_len, q_heads, kv_heads, head_dim); q_len < kv_len is a
# chunked-prefill step on top of cached context.
PREFILL_SHAPES = [
    (2, 2048, 2048, 32, 8, 128),
    (1, 4096, 4096, 32, 8, 128),
    (4, 512, 4096, 32, 8, 128),
]


def _time_ms(fn, *args, iters):
  jax.block_until_ready(fn(*args))  # compile + warm up
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append((time.perf_counter() - start) * 1e3)
  return statistics.median(times)


def _report(title, rows):
  print(f"\n{title}")
  base = rows[0][1]
  for name, ms, err in rows:
    ratio = "" if ms is None else f"{ms / base:6.2f}x"
    ms_txt = "   failed" if ms is None else f"{ms:9.3f}"
    err_txt = "" if err is None else f"  max|diff vs ref|={err:.2e}"
    print(f"  {name:<34} {ms_txt} ms  {ratio}{err_txt}")


def _run(name, fn, args, ref, iters):
  try:
    out = jax.jit(fn)(*args)
    err = float(jnp.max(jnp.abs(out.astype(jnp.float32)
                                - ref.astype(jnp.float32))))
    return name, _time_ms(jax.jit(fn), *args, iters=iters), err
  except Exception as e:  # keep the table going; say what broke
    print(f"  [{name}] failed: {type(e).__name__}: {str(e)[:200]}")
    return name, None, None


def bench_decode(shape, iters, dtype=jnp.bfloat16):
  from jax.experimental.pallas.ops.gpu import decode_attention
  from jax.experimental.pallas.ops.gpu import paged_attention

  batch, q_heads, kv_heads, head_dim, context, page_size = shape
  rng = np.random.default_rng(0)
  max_pages = context // page_size
  num_pages = batch * max_pages
  q = jnp.asarray(rng.standard_normal((batch, q_heads, head_dim)), dtype)
  k_pages = jnp.asarray(rng.standard_normal(
      (kv_heads, num_pages, page_size, head_dim)), dtype)
  v_pages = jnp.asarray(rng.standard_normal(
      (kv_heads, num_pages, page_size, head_dim)), dtype)
  tables = jnp.asarray(rng.permutation(num_pages).reshape(batch, max_pages),
                       jnp.int32)
  lengths = jnp.asarray(rng.integers(context // 2, context + 1, batch),
                        jnp.int32)
  scale = head_dim**-0.5
  args = (q, k_pages, v_pages, lengths, tables)
  ref = jax.jit(reference.paged_decode_attention_ref)(*args)

  # The same cache, contiguous, for the non-paged kernel.
  def contiguous(pages):
    x = jnp.take(pages, tables, axis=1)  # [Hkv, B, max_pages, S, D]
    return jnp.moveaxis(x.reshape(kv_heads, batch, context, head_dim), 0, 2)
  k_flat, v_flat = contiguous(k_pages), contiguous(v_pages)

  rows = [
      _run("ours paged_decode_gpu", paged_decode_gpu.paged_decode_attention,
           args, ref, iters),
      _run("jax ops.gpu.paged_attention",
           # Takes no scale: fold it into q.
           lambda q, k, v, l, t: paged_attention.paged_attention(
               q * jnp.asarray(scale, q.dtype), k, v, t, l),
           args, ref, iters),
      _run("jax ops.gpu.decode_attention.gqa",
           functools.partial(decode_attention.gqa, sm_scale=scale),
           (q, k_flat, v_flat, None, lengths), ref, iters),
      _run("XLA reference", reference.paged_decode_attention_ref, args, ref,
           iters),
  ]
  _report(f"decode B={batch} Hq={q_heads} Hkv={kv_heads} D={head_dim} "
          f"ctx={context} page={page_size} {jnp.dtype(dtype).name}", rows)


def bench_prefill(shape, iters, dtype=jnp.bfloat16):
  batch, q_len, kv_len, q_heads, kv_heads, head_dim = shape
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.standard_normal((batch, q_len, q_heads, head_dim)),
                  dtype)
  k = jnp.asarray(rng.standard_normal((batch, kv_len, kv_heads, head_dim)),
                  dtype)
  v = jnp.asarray(rng.standard_normal((batch, kv_len, kv_heads, head_dim)),
                  dtype)
  q_offsets = jnp.full((batch,), kv_len - q_len, jnp.int32)
  kv_lengths = jnp.full((batch,), kv_len, jnp.int32)
  args = (q, k, v, q_offsets, kv_lengths)
  ref = jax.jit(reference.prefill_attention_ref)(*args)
  rows = [
      _run("ours flash_prefill_gpu", flash_prefill_gpu.prefill_attention,
           args, ref, iters),
      _run("ours flash_prefill_gpu bq=128", functools.partial(
          flash_prefill_gpu.prefill_attention, block_q=128, num_warps=8),
           args, ref, iters),
      _run("XLA reference", reference.prefill_attention_ref, args, ref,
           iters),
  ]
  _report(f"prefill B={batch} T={q_len} Tk={kv_len} Hq={q_heads} "
          f"Hkv={kv_heads} D={head_dim} {jnp.dtype(dtype).name}", rows)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--iters", type=int, default=20)
  args = parser.parse_args(argv)
  backend = jax.default_backend()
  if backend != "gpu":
    print(f"kernels_gpu.py: needs a GPU backend, but the JAX backend is "
          f"{backend!r}; nothing to benchmark.")
    return 0
  print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}")
  for shape in DECODE_SHAPES:
    bench_decode(shape, args.iters)
  for shape in PREFILL_SHAPES:
    bench_prefill(shape, args.iters)
  return 0


if __name__ == "__main__":
  sys.exit(main())
