"""Attention kernels for pdserve_jax: paged decode and causal prefill.

Entry points pick an implementation per backend (see `dispatch`): Pallas
Triton kernels on GPU, Pallas Mosaic kernels on TPU, pure-jnp references on
CPU. All run under `jax.jit` and `lax.scan`.
"""

from pallas_kernels.dispatch import IMPLS
from pallas_kernels.dispatch import INTERPRET_ENV_VAR
from pallas_kernels.dispatch import paged_decode_attention
from pallas_kernels.dispatch import prefill_attention
from pallas_kernels.dispatch import ragged_paged_attention
from pallas_kernels.dispatch import resolve_impl
from pallas_kernels.dispatch import traced_platform
from pallas_kernels.reference import paged_decode_attention_ref
from pallas_kernels.reference import prefill_attention_ref
from pallas_kernels.reference import ragged_paged_attention_ref

__all__ = [
    "IMPLS",
    "INTERPRET_ENV_VAR",
    "paged_decode_attention",
    "paged_decode_attention_ref",
    "prefill_attention",
    "prefill_attention_ref",
    "ragged_paged_attention",
    "ragged_paged_attention_ref",
    "resolve_impl",
    "traced_platform",
]
