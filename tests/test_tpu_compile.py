"""The TPU kernels compiled for real TPUs, on this CPU-only machine.

`libtpu` (the test extra pins the version `jax[tpu]` does) gives compile-only TPU
devices through `jax.experimental.topologies.get_topology_desc`; tracing under
`jax.sharding.use_abstract_mesh` makes Pallas see the TPU kind, so `compile()` runs
Mosaic and XLA:TPU as a TPU host would. Every shape of the kernel tests
(`test_kernels.py`, where the interpreters check the numbers) and a few ragged paged
attention shapes are compiled for TPU v4, v5e, v5p and v6e in float32, and in bfloat16
for v5e; and the engine's whole Llama-3-8B programs for a v5e-8 at tp=8 and tp=4,
checked to fit a chip's HBM. Skipped, saying why, where libtpu is not installed.
"""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from pallas_kernels import flash_prefill_tpu, paged_decode_tpu, ragged_paged_tpu
from test_kernels import DECODE_SHAPES, PREFILL_SHAPES

pytestmark = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                reason="libtpu is not installed (pip install -e '.[test]')")

# Topology names get_topology_desc takes, and the device kind each reports.
GENERATIONS = {"v4:2x2x1": "TPU v4", "v5e:2x2": "TPU v5 lite", "v5p:2x2x1": "TPU v5",
               "v6e:2x2": "TPU v6 lite"}


@pytest.fixture(scope="module", params=sorted(GENERATIONS))
def tpu(request):
  from jax.experimental import topologies

  topo = topologies.get_topology_desc(request.param, "tpu")
  assert topo.devices[0].device_kind == GENERATIONS[request.param]
  return request.param, Mesh(np.array(topo.devices[:1]), ("x",))


def _compile(mesh, fn, shapes):
  rep = NamedSharding(mesh, P())
  args = [jax.ShapeDtypeStruct(s, d, sharding=rep) for s, d in shapes]
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
    return jax.jit(fn).lower(*args).compile()


def _dtypes(name):
  return [jnp.float32, jnp.bfloat16] if name.startswith("v5e") else [jnp.float32]


@pytest.mark.slow
@pytest.mark.parametrize("shape", DECODE_SHAPES)
def test_paged_decode_compiles_for_tpu(tpu, shape):
  name, mesh = tpu
  batch, kv_heads, group, page_size, head_dim, max_pages = shape
  num_pages = batch * max_pages + 1
  for dt in _dtypes(name):
    c = _compile(mesh, paged_decode_tpu.paged_decode_attention, [
        ((batch, kv_heads * group, head_dim), dt),
        ((kv_heads, num_pages, page_size, head_dim), dt),
        ((kv_heads, num_pages, page_size, head_dim), dt),
        ((batch,), jnp.int32), ((batch, max_pages), jnp.int32)])
    mem = c.memory_analysis()
    assert "tpu_custom_call" in c.as_text() and mem.generated_code_size_in_bytes > 0
    # TPU layouts pad to whole tiles: at least the logical bytes.
    assert mem.output_size_in_bytes >= batch * kv_heads * group * head_dim * dt(0).itemsize


@pytest.mark.slow
@pytest.mark.parametrize("shape", PREFILL_SHAPES)
def test_flash_prefill_compiles_for_tpu(tpu, shape):
  name, mesh = tpu
  batch, q_len, kv_len, kv_heads, group, head_dim = shape
  for dt in _dtypes(name):
    c = _compile(mesh, flash_prefill_tpu.prefill_attention, [
        ((batch, q_len, kv_heads * group, head_dim), dt),
        ((batch, kv_len, kv_heads, head_dim), dt), ((batch, kv_len, kv_heads, head_dim), dt),
        ((batch,), jnp.int32), ((batch,), jnp.int32)])
    assert "tpu_custom_call" in c.as_text()
    assert c.memory_analysis().output_size_in_bytes >= (
        batch * q_len * kv_heads * group * head_dim * dt(0).itemsize)


# (tokens, rows, kv_heads, group, page_size, head_dim, max_pages): one query block and
# several (the default 128-row blocks), GQA 1/4/8, pages 8/16/32.
RAGGED_SHAPES = [
    pytest.param((40, 6, 2, 1, 8, 64, 4), id="T40-R6-mha-S8-D64"),
    pytest.param((300, 9, 1, 4, 16, 128, 6), id="T300-R9-gqa4-S16-D128"),
    pytest.param((96, 5, 2, 8, 32, 128, 3), id="T96-R5-gqa8-S32-D128"),
]


@pytest.mark.parametrize("shape", RAGGED_SHAPES)
def test_ragged_paged_compiles_for_tpu(tpu, shape):
  name, mesh = tpu
  tokens, rows, kv_heads, group, page_size, head_dim, max_pages = shape
  num_pages = rows * max_pages + 1
  for dt in _dtypes(name):
    c = _compile(mesh, ragged_paged_tpu.ragged_paged_attention, [
        ((tokens, kv_heads * group, head_dim), dt),
        ((kv_heads, num_pages, page_size, head_dim), dt),
        ((kv_heads, num_pages, page_size, head_dim), dt),
        ((rows,), jnp.int32), ((rows,), jnp.int32), ((rows,), jnp.int32),
        ((rows, max_pages), jnp.int32)])
    mem = c.memory_analysis()
    assert "tpu_custom_call" in c.as_text() and mem.generated_code_size_in_bytes > 0
    assert mem.output_size_in_bytes >= tokens * kv_heads * group * head_dim * dt(0).itemsize


# v5e HBM per chip (Google Cloud's TPU v5e documentation: 16 GiB).
V5E_HBM = 16 * 2**30


# About 40 s per tp on 2 cores (libtpu's compiler; XLA_FLAGS' LLVM level barely moves
# it): `make test` compiles the whole v5e-8, `make test-tpu` also half of it.
@pytest.mark.slow
@pytest.mark.parametrize("tp", [8, pytest.param(4, marks=pytest.mark.tpu_extra)])
def test_llama3_8b_programs_compile_for_v5e_8_and_fit(tp):
  """The engine's whole packed and decode programs for Llama-3-8B in bfloat16, with a
  pool of 4,096 16-token pages (64k tokens, 8 GiB of K and V), compiled for a v5e-8
  topology with the Mosaic kernels per tp shard of the heads; each fits a chip's HBM."""
  from jax.experimental import topologies

  from pdserve_jax.model import sharding
  from pdserve_jax.model.config import get_preset
  from pdserve_jax.runtime.buckets import RunnerShape
  from pdserve_jax.runtime.cost import peak_bytes
  from pdserve_jax.runtime.programs import lower_programs

  devices = topologies.get_topology_desc("v5e:2x4", "tpu").devices
  assert len(devices) == 8 and devices[0].device_kind == "TPU v5 lite"
  shape = RunnerShape(page_size=16, num_pages=4096, max_rows=64, max_step_tokens=2048,
                      max_seq_len=2048, min_step_tokens=512)
  lowered = lower_programs(get_preset("llama3-8b"), sharding.make_mesh(devices[:tp]), shape,
                           jnp.bfloat16)
  for name, low in lowered.items():
    c = low.compile()
    assert "tpu_custom_call" in c.as_text(), name  # the Pallas kernels, not the reference
    m = c.memory_analysis()
    peak = peak_bytes(m)
    # Weights (16 GB / tp) and the pool (8 GiB / tp) at least; within one chip's HBM.
    assert (16e9 + 8 * 2**30) / tp < peak < V5E_HBM, (name, tp, peak / 2**30)
    assert c.cost_analysis()["flops"] > 0
