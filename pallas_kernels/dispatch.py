"""Picks an attention implementation for the current backend and runs it.

`impl` selects the implementation:
  "auto"                  Pallas GPU kernel on GPU, Pallas TPU kernel on TPU,
                          the jnp reference elsewhere (CPU). If the env var
                          PDSERVE_PALLAS_INTERPRET is "gpu" or "tpu", "auto"
                          instead runs that kernel in interpret mode.
  "reference"             the jnp reference, any backend.
  "pallas_gpu"            Triton kernel; GPU backend only.
  "pallas_tpu"            Mosaic kernel; TPU backend only.
  "pallas_gpu_interpret"  the GPU kernel in the Pallas interpreter, any backend.
  "pallas_tpu_interpret"  the TPU kernel in TPU interpret mode, any backend.

There is no silent fallback: a kernel asked for on the wrong backend, or
shapes a kernel cannot handle, raise ValueError. The choice (and the env var)
is read at trace time, so under `jax.jit` pass `impl` as a static argument.
"""

import os

import jax

from pallas_kernels import flash_prefill_gpu
from pallas_kernels import flash_prefill_tpu
from pallas_kernels import paged_decode_gpu
from pallas_kernels import paged_decode_tpu
from pallas_kernels import ragged_paged_gpu
from pallas_kernels import ragged_paged_tpu
from pallas_kernels import reference
from pallas_kernels import validation

IMPLS = ("auto", "reference", "pallas_gpu", "pallas_tpu",
         "pallas_gpu_interpret", "pallas_tpu_interpret")
INTERPRET_ENV_VAR = "PDSERVE_PALLAS_INTERPRET"


def traced_platform() -> str:
  """The platform being traced for: the abstract mesh's, when one is set (compiling
  for devices that are not here, e.g. a TPU topology on a CPU host), else JAX's
  default backend."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is not None and not mesh.empty:
    device = getattr(mesh, "abstract_device", None)
    if device is not None and device.platform:
      return device.platform
  return jax.default_backend()


def resolve_impl(impl: str) -> str:
  """Maps `impl` to a concrete implementation name; raises ValueError."""
  if impl not in IMPLS:
    raise ValueError(f"Unknown attention impl {impl!r}; expected one of "
                     f"{', '.join(IMPLS)}.")
  backend = traced_platform()
  if impl == "auto":
    forced = os.environ.get(INTERPRET_ENV_VAR, "").strip().lower()
    if forced:
      if forced not in ("gpu", "tpu"):
        raise ValueError(f"{INTERPRET_ENV_VAR} must be 'gpu' or 'tpu', got "
                         f"{forced!r}.")
      return f"pallas_{forced}_interpret"
    return {"gpu": "pallas_gpu", "tpu": "pallas_tpu"}.get(backend, "reference")
  if impl in ("pallas_gpu", "pallas_tpu"):
    needed = impl.removeprefix("pallas_")
    if backend != needed:
      raise ValueError(
          f"impl={impl!r} needs a {needed} backend, but the JAX backend is "
          f"{backend!r}; use impl='reference' or impl='{impl}_interpret'.")
  return impl


def paged_decode_attention(q, k_pages, v_pages, lengths, page_tables, *,
                           scale=None, impl="auto"):
  """Decode attention over a paged KV cache.

  Shapes and semantics: see `reference.paged_decode_attention_ref`
  (q [B, Hq, D]; k_pages/v_pages [Hkv, P, S, D]; int32 lengths [B];
  int32 page_tables [B, max_pages]; returns [B, Hq, D] in q.dtype).
  """
  validation.check_decode_args(q, k_pages, v_pages, lengths, page_tables)
  impl = resolve_impl(impl)
  args = (q, k_pages, v_pages, lengths, page_tables)
  if impl == "reference":
    return reference.paged_decode_attention_ref(*args, scale=scale)
  interpret = impl.endswith("_interpret")
  if impl.startswith("pallas_gpu"):
    return paged_decode_gpu.paged_decode_attention(
        *args, scale=scale, interpret=interpret)
  return paged_decode_tpu.paged_decode_attention(
      *args, scale=scale, interpret=interpret)


def ragged_paged_attention(q, k_pages, v_pages, q_starts, q_lens, kv_lens, page_tables, *,
                           scale=None, impl="auto"):
  """Attention of a packed batch of query tokens (decode rows, prompt chunks at any
  offset, whole prompts) straight from the page pool.

  Shapes and semantics: see `reference.ragged_paged_attention_ref` (q [T, Hq, D];
  k_pages/v_pages [Hkv, P, S, D]; int32 q_starts, q_lens, kv_lens [R]; int32
  page_tables [R, max_pages]; returns [T, Hq, D] in q.dtype).
  """
  validation.check_ragged_args(q, k_pages, v_pages, q_starts, q_lens, kv_lens, page_tables)
  impl = resolve_impl(impl)
  args = (q, k_pages, v_pages, q_starts, q_lens, kv_lens, page_tables)
  if impl == "reference":
    return reference.ragged_paged_attention_ref(*args, scale=scale)
  interpret = impl.endswith("_interpret")
  if impl.startswith("pallas_gpu"):
    return ragged_paged_gpu.ragged_paged_attention(*args, scale=scale, interpret=interpret)
  return ragged_paged_tpu.ragged_paged_attention(*args, scale=scale, interpret=interpret)


def prefill_attention(q, k, v, q_offsets, kv_lengths, *, scale=None,
                      impl="auto"):
  """Causal (optionally chunked) prefill attention.

  Shapes and semantics: see `reference.prefill_attention_ref`
  (q [B, T, Hq, D]; k/v [B, Tk, Hkv, D]; int32 q_offsets, kv_lengths [B];
  returns [B, T, Hq, D] in q.dtype).
  """
  validation.check_prefill_args(q, k, v, q_offsets, kv_lengths)
  impl = resolve_impl(impl)
  args = (q, k, v, q_offsets, kv_lengths)
  if impl == "reference":
    return reference.prefill_attention_ref(*args, scale=scale)
  interpret = impl.endswith("_interpret")
  if impl.startswith("pallas_gpu"):
    return flash_prefill_gpu.prefill_attention(
        *args, scale=scale, interpret=interpret)
  return flash_prefill_tpu.prefill_attention(
      *args, scale=scale, interpret=interpret)
