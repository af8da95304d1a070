"""Tests for pallas_kernels: kernels (interpret mode) against the references.

Every run draws fresh inputs; the seed is in each assertion message and can be
pinned with PDSERVE_TEST_SEED=<seed> to reproduce a failure. Outputs are
poisoned: the Pallas HLO interpreter (GPU kernels) fills every output buffer
with NaN before the kernel runs, and TPU interpret mode is run with
uninitialized_memory="nan"; `test_interpreters_poison_unwritten_outputs`
checks that this really happens, so an element a kernel never writes cannot
pass the isfinite + error-bound checks. Unused cache slots are filled with NaN
too, so any leak of masked data also fails.
"""

import contextlib
import functools
import os

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels
from pallas_kernels import flash_prefill_gpu
from pallas_kernels import flash_prefill_tpu
from pallas_kernels import paged_decode_gpu
from pallas_kernels import paged_decode_tpu
from pallas_kernels import reference

F32_TOL = 1e-5
BF16_TOL = 2e-2


@pytest.fixture
def seed():
  env = os.environ.get("PDSERVE_TEST_SEED")
  return int(env) if env else int(np.random.SeedSequence().entropy)


@pytest.fixture(autouse=True)
def _clean_tpu_interpreter():
  yield
  # A failing interpreted TPU kernel leaves global simulator state behind.
  pltpu.reset_tpu_interpret_mode_state()


def _tpu_params(seed):
  # Random order along "parallel" grid dims catches accidental dependence on
  # the iteration order; NaN-filled buffers catch unwritten output.
  return pltpu.InterpretParams(uninitialized_memory="nan",
                               random_seed=seed % (2**31))


def _assert_close(out, ref, seed, tol, what):
  out = np.asarray(out, np.float32)
  ref = np.asarray(ref, np.float32)
  msg = f"{what} seed={seed}"
  assert out.shape == ref.shape, msg
  bad = np.argwhere(~np.isfinite(out))
  assert bad.size == 0, f"{msg}: non-finite output at {bad[:5].tolist()}"
  assert np.all(np.isfinite(ref)), f"{msg}: non-finite reference"
  denom = max(float(np.max(np.abs(ref))), 1e-30)
  err = float(np.max(np.abs(out - ref))) / denom
  assert err < tol, f"{msg}: max relative error {err:.3e} >= {tol}"
  return err


# --------------------------------------------------------------------------
# Input builders.


def _poisoned_pool(rng, lengths, *, kv_heads, page_size, head_dim, max_pages, free_pages):
  """K and V pools (numpy float64) and page tables for rows of `lengths` tokens: each
  row owns `max_pages` pages in random order, NaN in every slot past its length and
  in the `free_pages` pages nobody owns; table entries past a row's pages are
  arbitrary valid ids. A kernel that reads a slot it should not returns NaN."""
  rows = len(lengths)
  num_pages = rows * max_pages + free_pages
  order = rng.permutation(num_pages)
  used = order[:rows * max_pages].reshape(rows, max_pages)
  page_tables = used.copy()
  k = rng.standard_normal((kv_heads, num_pages, page_size, head_dim))
  v = rng.standard_normal((kv_heads, num_pages, page_size, head_dim))
  for r in range(rows):
    n = int(lengths[r])
    for p in range(max_pages):
      tail = slice(max(n - p * page_size, 0), page_size)
      k[:, used[r, p], tail] = np.nan
      v[:, used[r, p], tail] = np.nan
    n_pages = -(-n // page_size)
    page_tables[r, n_pages:] = rng.integers(0, num_pages, max_pages - n_pages)
  k[:, order[rows * max_pages:]] = np.nan
  v[:, order[rows * max_pages:]] = np.nan
  return k, v, page_tables


def _decode_inputs(rng, *, batch, kv_heads, group, page_size, head_dim,
                   max_pages, dtype=jnp.float32):
  """Random paged-decode inputs with permuted pages and NaN in unused slots."""
  full = max_pages * page_size
  # Ragged lengths: always a length-1 and a full sequence, an empty slot when
  # batch > 2, the rest random and never a page multiple.
  lengths = [full, 1, 0][:batch]
  while len(lengths) < batch:
    n = int(rng.integers(2, full))
    lengths.append(n if n % page_size else n - 1)
  lengths = rng.permutation(np.array(lengths, np.int32))

  k, v, page_tables = _poisoned_pool(rng, lengths, kv_heads=kv_heads, page_size=page_size,
                                     head_dim=head_dim, max_pages=max_pages, free_pages=3)
  q = rng.standard_normal((batch, kv_heads * group, head_dim))
  return (jnp.asarray(q, dtype), jnp.asarray(k, dtype), jnp.asarray(v, dtype),
          jnp.asarray(lengths, jnp.int32),
          jnp.asarray(page_tables, jnp.int32))


def _prefill_inputs(rng, *, batch, q_len, kv_len, kv_heads, group, head_dim,
                    dtype=jnp.float32):
  """Random prefill inputs (chunked when kv_len > q_len), NaN past lengths."""
  if kv_len == q_len:
    q_offsets = np.zeros(batch, np.int32)
    kv_lengths = [q_len, 1, 0][:batch]
    kv_lengths += list(rng.integers(1, q_len + 1, batch - len(kv_lengths)))
  else:
    q_offsets = rng.integers(0, kv_len - q_len + 1, batch).astype(np.int32)
    q_offsets[0] = kv_len - q_len
    # A chunk may be padded: its valid keys end anywhere inside the chunk.
    kv_lengths = [int(o) + int(rng.integers(1, q_len + 1)) for o in q_offsets]
    kv_lengths[0] = kv_len
    if batch > 2:
      kv_lengths[-1] = 0
  kv_lengths = np.array(kv_lengths, np.int32)
  q = rng.standard_normal((batch, q_len, kv_heads * group, head_dim))
  k = rng.standard_normal((batch, kv_len, kv_heads, head_dim))
  v = rng.standard_normal((batch, kv_len, kv_heads, head_dim))
  for b in range(batch):
    k[b, kv_lengths[b]:] = np.nan
    v[b, kv_lengths[b]:] = np.nan
  return (jnp.asarray(q, dtype), jnp.asarray(k, dtype), jnp.asarray(v, dtype),
          jnp.asarray(q_offsets), jnp.asarray(kv_lengths))


# --------------------------------------------------------------------------
# Reference sanity: the references themselves against a naive numpy loop.


def _naive_decode(q, k_pages, v_pages, lengths, page_tables, scale=None):
  q, k_pages, v_pages = (np.asarray(x, np.float64) for x in
                         (q, k_pages, v_pages))
  batch, num_q_heads, head_dim = q.shape
  scale = head_dim**-0.5 if scale is None else scale
  group = num_q_heads // k_pages.shape[0]
  out = np.zeros_like(q)
  for b in range(batch):
    n = int(lengths[b])
    for h in range(num_q_heads):
      kh = k_pages[h // group][np.asarray(page_tables[b])].reshape(-1, head_dim)
      vh = v_pages[h // group][np.asarray(page_tables[b])].reshape(-1, head_dim)
      if n == 0:
        continue
      s = kh[:n] @ q[b, h] * scale
      w = np.exp(s - s.max())
      out[b, h] = w @ vh[:n] / w.sum()
  return out


def _naive_prefill(q, k, v, q_offsets, kv_lengths, scale=None):
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  batch, q_len, num_q_heads, head_dim = q.shape
  scale = head_dim**-0.5 if scale is None else scale
  group = num_q_heads // k.shape[2]
  out = np.zeros_like(q)
  for b in range(batch):
    for i in range(q_len):
      n = min(int(kv_lengths[b]), int(q_offsets[b]) + i + 1)
      for h in range(num_q_heads):
        if n <= 0:
          continue
        s = k[b, :n, h // group] @ q[b, i, h] * scale
        w = np.exp(s - s.max())
        out[b, i, h] = w @ v[b, :n, h // group] / w.sum()
  return out


def test_decode_reference_matches_naive(seed):
  rng = np.random.default_rng(seed)
  args = _decode_inputs(rng, batch=4, kv_heads=2, group=4, page_size=8,
                        head_dim=64, max_pages=3)
  out = reference.paged_decode_attention_ref(*args)
  _assert_close(out, _naive_decode(*args), seed, F32_TOL, "decode ref")
  assert np.all(np.asarray(out)[np.asarray(args[3]) == 0] == 0)


def test_prefill_reference_matches_naive(seed):
  rng = np.random.default_rng(seed)
  for q_len, kv_len in ((7, 7), (5, 12)):
    args = _prefill_inputs(rng, batch=3, q_len=q_len, kv_len=kv_len,
                           kv_heads=2, group=4, head_dim=64)
    out = reference.prefill_attention_ref(*args)
    _assert_close(out, _naive_prefill(*args), seed, F32_TOL, "prefill ref")


# --------------------------------------------------------------------------
# Paged decode kernels.

# (batch, kv_heads, group, page_size, head_dim, max_pages)
DECODE_SHAPES = [
    pytest.param((4, 2, 1, 8, 64, 5), id="B4-mha-S8-D64"),
    pytest.param((3, 1, 4, 16, 128, 4), id="B3-gqa4-S16-D128"),
    pytest.param((4, 2, 8, 8, 128, 6), id="B4-gqa8-S8-D128"),
    pytest.param((2, 1, 8, 16, 64, 3), id="B2-gqa8-S16-D64"),
    pytest.param((1, 2, 4, 8, 64, 4), id="B1-gqa4-S8-D64"),
    pytest.param((3, 2, 1, 16, 128, 2), id="B3-mha-S16-D128"),
]


def _decode_case(seed, shape, dtype=jnp.float32):
  batch, kv_heads, group, page_size, head_dim, max_pages = shape
  rng = np.random.default_rng(seed)
  args = _decode_inputs(rng, batch=batch, kv_heads=kv_heads, group=group,
                        page_size=page_size, head_dim=head_dim,
                        max_pages=max_pages, dtype=dtype)
  return args, reference.paged_decode_attention_ref(*args)


def _check_empty_slots(out, lengths, seed):
  empty = np.asarray(lengths) == 0
  assert np.all(np.asarray(out, np.float32)[empty] == 0), (
      f"empty slot output not exactly 0, seed={seed}")


# Default tunings are covered by the bf16, dispatcher, jit and scan tests.
@pytest.mark.parametrize("tuning", [
    pytest.param({"pages_per_block": 1}, id="ppb1-autosplit"),
    pytest.param({"pages_per_block": 2, "num_splits": 3}, id="ppb2-split3"),
])
@pytest.mark.parametrize("shape", DECODE_SHAPES)
def test_paged_decode_gpu_interpret(seed, shape, tuning):
  args, ref = _decode_case(seed, shape)
  out = paged_decode_gpu.paged_decode_attention(*args, interpret=True,
                                                **tuning)
  _assert_close(out, ref, seed, F32_TOL, f"gpu decode {shape} {tuning}")
  _check_empty_slots(out, args[3], seed)


@pytest.mark.parametrize("pages_per_block", [1, 3])
@pytest.mark.parametrize("shape", DECODE_SHAPES)
def test_paged_decode_tpu_interpret(seed, shape, pages_per_block):
  args, ref = _decode_case(seed, shape)
  out = paged_decode_tpu.paged_decode_attention(
      *args, pages_per_block=pages_per_block, interpret=_tpu_params(seed))
  _assert_close(out, ref, seed, F32_TOL,
                f"tpu decode {shape} ppb={pages_per_block}")
  _check_empty_slots(out, args[3], seed)


@pytest.mark.parametrize("page_size", [8, 16])
@pytest.mark.parametrize("kernel", ["gpu", "tpu"])
def test_paged_decode_bf16(seed, kernel, page_size):
  args, ref = _decode_case(seed, (3, 2, 4, page_size, 128, 3),
                           dtype=jnp.bfloat16)
  if kernel == "gpu":
    out = paged_decode_gpu.paged_decode_attention(*args, interpret=True)
  else:
    out = paged_decode_tpu.paged_decode_attention(
        *args, interpret=_tpu_params(seed))
  assert out.dtype == jnp.bfloat16
  _assert_close(out, ref, seed, BF16_TOL, f"{kernel} decode bf16")


def test_paged_decode_tpu_force_interpret_mode(seed):
  """The kernel also runs under the global `force_tpu_interpret_mode`."""
  args, ref = _decode_case(seed, (2, 1, 4, 8, 64, 3))
  with pltpu.force_tpu_interpret_mode(_tpu_params(seed)):
    out = paged_decode_tpu.paged_decode_attention(*args)
  _assert_close(out, ref, seed, F32_TOL, "tpu decode forced interpret")


# --------------------------------------------------------------------------
# Flash prefill kernels.

# (batch, q_len, kv_len, kv_heads, group, head_dim)
PREFILL_SHAPES = [
    pytest.param((3, 13, 13, 2, 1, 64), id="causal-B3-T13-mha-D64"),
    pytest.param((2, 40, 40, 1, 4, 128), id="causal-B2-T40-gqa4-D128"),
    pytest.param((3, 9, 37, 1, 8, 64), id="chunked-B3-T9-Tk37-gqa8-D64"),
    pytest.param((4, 16, 48, 2, 4, 128), id="chunked-B4-T16-Tk48-gqa4-D128"),
    pytest.param((1, 1, 21, 2, 8, 128), id="chunked-B1-T1-Tk21-gqa8-D128"),
]


def _prefill_case(seed, shape, dtype=jnp.float32):
  batch, q_len, kv_len, kv_heads, group, head_dim = shape
  rng = np.random.default_rng(seed)
  args = _prefill_inputs(rng, batch=batch, q_len=q_len, kv_len=kv_len,
                         kv_heads=kv_heads, group=group, head_dim=head_dim,
                         dtype=dtype)
  return args, reference.prefill_attention_ref(*args)


@pytest.mark.parametrize("blocks", [(16, 16), (64, 64)], ids=["b16", "b64"])
@pytest.mark.parametrize("shape", PREFILL_SHAPES)
def test_flash_prefill_gpu_interpret(seed, shape, blocks):
  args, ref = _prefill_case(seed, shape)
  out = flash_prefill_gpu.prefill_attention(
      *args, block_q=blocks[0], block_k=blocks[1], interpret=True)
  _assert_close(out, ref, seed, F32_TOL, f"gpu prefill {shape} {blocks}")
  _check_empty_slots(out, args[4], seed)


@pytest.mark.parametrize("blocks", [(16, 8), (128, 128)],
                         ids=["q16k8", "q128k128"])
@pytest.mark.parametrize("shape", PREFILL_SHAPES)
def test_flash_prefill_tpu_interpret(seed, shape, blocks):
  args, ref = _prefill_case(seed, shape)
  out = flash_prefill_tpu.prefill_attention(
      *args, block_q=blocks[0], block_k=blocks[1],
      interpret=_tpu_params(seed))
  _assert_close(out, ref, seed, F32_TOL, f"tpu prefill {shape} {blocks}")
  _check_empty_slots(out, args[4], seed)


@pytest.mark.parametrize("kernel", ["gpu", "tpu"])
def test_flash_prefill_bf16(seed, kernel):
  args, ref = _prefill_case(seed, (2, 24, 40, 2, 4, 128), dtype=jnp.bfloat16)
  if kernel == "gpu":
    out = flash_prefill_gpu.prefill_attention(*args, block_q=16, block_k=16,
                                              interpret=True)
  else:
    out = flash_prefill_tpu.prefill_attention(
        *args, block_q=16, block_k=16, interpret=_tpu_params(seed))
  assert out.dtype == jnp.bfloat16
  _assert_close(out, ref, seed, BF16_TOL, f"{kernel} prefill bf16")


# --------------------------------------------------------------------------
# The poisoning the kernel tests rely on.


def _half_writer(x_ref, o_ref):
  o_ref[:8] = x_ref[:8]


@pytest.mark.parametrize("mode", ["gpu", "tpu"])
def test_interpreters_poison_unwritten_outputs(seed, mode):
  x = jnp.ones((16, 128), jnp.float32)
  interpret = True if mode == "gpu" else _tpu_params(seed)
  out = pl.pallas_call(_half_writer,
                       out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
                       interpret=interpret)(x)
  out = np.asarray(out)
  assert np.all(out[:8] == 1)
  assert np.all(np.isnan(out[8:])), "unwritten output was not poisoned"


# --------------------------------------------------------------------------
# Lowering for the real backends (compilation needs the hardware).


@contextlib.contextmanager
def _fake_tpu():
  device = jax.sharding.AbstractDevice(device_kind="TPU v5e", num_cores=1,
                                       platform="tpu")
  mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)
  with jax.sharding.use_abstract_mesh(mesh):
    yield


def _lower(fn, platform, *shapes):
  ctx = _fake_tpu() if platform == "tpu" else contextlib.nullcontext()
  with ctx:
    return jax.jit(fn).trace(*shapes).lower(
        lowering_platforms=(platform,)).as_text()


def _export_cuda(fn, *shapes):
  """`jax.export` for CUDA. The Triton call has no serialization guarantee, so the
  export is lowered, not serialized: its safety check for that target is waived."""
  from jax import export

  waive = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
  return export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=waive)(*shapes)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16],
                         ids=["f32", "bf16"])
def test_kernels_lower_for_gpu_and_tpu(dtype):
  sds = jax.ShapeDtypeStruct
  i32 = jnp.int32
  decode = (sds((4, 16, 128), dtype), sds((4, 64, 16, 128), dtype),
            sds((4, 64, 16, 128), dtype), sds((4,), i32), sds((4, 9), i32))
  prefill = (sds((2, 200, 8, 128), dtype), sds((2, 300, 2, 128), dtype),
             sds((2, 300, 2, 128), dtype), sds((2,), i32), sds((2,), i32))
  prefill_d64 = (sds((2, 24, 4, 64), dtype), sds((2, 24, 4, 64), dtype),
                 sds((2, 24, 4, 64), dtype), sds((2,), i32), sds((2,), i32))
  for fn, args in ((paged_decode_gpu.paged_decode_attention, decode),
                   (flash_prefill_gpu.prefill_attention, prefill)):
    exp = _export_cuda(fn, *args)
    assert exp.platforms == ("cuda",) and "__gpu$xla.gpu.triton" in exp.mlir_module()
    assert exp.out_avals[0].shape == args[0].shape
  tpu = _lower(paged_decode_tpu.paged_decode_attention, "tpu", *decode)
  assert "tpu_custom_call" in tpu
  for args in (prefill, prefill_d64):
    assert "tpu_custom_call" in _lower(flash_prefill_tpu.prefill_attention,
                                       "tpu", *args)


# --------------------------------------------------------------------------
# Dispatcher.


@pytest.fixture
def no_interpret_env(monkeypatch):
  monkeypatch.delenv(pallas_kernels.INTERPRET_ENV_VAR, raising=False)


def test_auto_uses_reference_on_cpu(seed, no_interpret_env):
  assert jax.default_backend() == "cpu"
  assert pallas_kernels.resolve_impl("auto") == "reference"
  args, ref = _decode_case(seed, (3, 2, 4, 8, 64, 3))
  out = pallas_kernels.paged_decode_attention(*args)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))
  pargs, pref = _prefill_case(seed, (3, 9, 20, 2, 4, 64))
  out = pallas_kernels.prefill_attention(*pargs)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(pref))


@pytest.mark.parametrize("kernel", ["gpu", "tpu"])
def test_interpret_env_var_redirects_auto(seed, monkeypatch, kernel):
  monkeypatch.setenv(pallas_kernels.INTERPRET_ENV_VAR, kernel)
  assert pallas_kernels.resolve_impl("auto") == f"pallas_{kernel}_interpret"
  args, ref = _decode_case(seed, (2, 1, 4, 8, 64, 3))
  out = pallas_kernels.paged_decode_attention(*args)
  _assert_close(out, ref, seed, F32_TOL, f"env {kernel} decode")
  pargs, pref = _prefill_case(seed, (2, 8, 8, 1, 4, 64))
  out = pallas_kernels.prefill_attention(*pargs)
  _assert_close(out, pref, seed, F32_TOL, f"env {kernel} prefill")


def test_interpret_env_var_rejects_unknown(monkeypatch):
  monkeypatch.setenv(pallas_kernels.INTERPRET_ENV_VAR, "cuda")
  with pytest.raises(ValueError, match=pallas_kernels.INTERPRET_ENV_VAR):
    pallas_kernels.resolve_impl("auto")


@pytest.mark.parametrize("impl", ["pallas_gpu", "pallas_tpu"])
def test_forcing_kernel_on_cpu_raises(seed, impl):
  args, _ = _decode_case(seed, (2, 1, 4, 8, 64, 3))
  with pytest.raises(ValueError, match=rf"{impl}.*'cpu'"):
    pallas_kernels.paged_decode_attention(*args, impl=impl)
  pargs, _ = _prefill_case(seed, (2, 8, 8, 1, 4, 64))
  with pytest.raises(ValueError, match=rf"{impl}.*'cpu'"):
    pallas_kernels.prefill_attention(*pargs, impl=impl)


def test_unknown_impl_raises(seed):
  args, _ = _decode_case(seed, (2, 1, 4, 8, 64, 3))
  with pytest.raises(ValueError, match="triton"):
    pallas_kernels.paged_decode_attention(*args, impl="triton")


def _f32(*shape):
  return np.zeros(shape, np.float32)


def _i32(*shape):
  return np.zeros(shape, np.int32)


_GOOD_DECODE = dict(q=_f32(2, 8, 64), k_pages=_f32(2, 5, 8, 64),
                    v_pages=_f32(2, 5, 8, 64), lengths=_i32(2),
                    page_tables=_i32(2, 3))


@pytest.mark.parametrize("name,bad", [
    ("q", _f32(2, 64)),
    ("q", _i32(2, 8, 64)),
    ("k_pages", _f32(5, 8, 64)),
    ("k_pages", _f32(3, 5, 8, 64)),  # 8 query heads over 3 KV heads
    ("k_pages", _f32(2, 5, 8, 32)),  # head dim mismatch
    ("v_pages", _f32(2, 5, 16, 64)),
    ("lengths", np.zeros(2, np.int64)),
    ("lengths", _i32(3)),
    ("lengths", _f32(2)),
    ("page_tables", _i32(6)),
    ("page_tables", _f32(2, 3)),
    ("page_tables", _i32(3, 3)),
])
def test_decode_bad_args_name_the_argument(name, bad):
  args = dict(_GOOD_DECODE, **{name: bad})
  if name == "k_pages":
    args["v_pages"] = bad
  for impl in ("reference", "pallas_gpu_interpret", "pallas_tpu_interpret"):
    with pytest.raises(ValueError, match=f"`{name}`"):
      pallas_kernels.paged_decode_attention(*args.values(), impl=impl)


_GOOD_PREFILL = dict(q=_f32(2, 4, 8, 64), k=_f32(2, 6, 2, 64),
                     v=_f32(2, 6, 2, 64), q_offsets=_i32(2),
                     kv_lengths=_i32(2))


@pytest.mark.parametrize("name,bad", [
    ("q", _f32(2, 4, 64)),
    ("k", _f32(2, 6, 3, 64)),  # 8 query heads over 3 KV heads
    ("k", _f32(3, 6, 2, 64)),  # batch mismatch
    ("v", _f32(2, 7, 2, 64)),
    ("q_offsets", _f32(2)),
    ("q_offsets", _i32(2, 1)),
    ("kv_lengths", _i32(5)),
    ("kv_lengths", np.zeros(2, np.int64)),
])
def test_prefill_bad_args_name_the_argument(name, bad):
  args = dict(_GOOD_PREFILL, **{name: bad})
  if name == "k":
    args["v"] = bad
  for impl in ("reference", "pallas_gpu_interpret", "pallas_tpu_interpret"):
    with pytest.raises(ValueError, match=f"`{name}`"):
      pallas_kernels.prefill_attention(*args.values(), impl=impl)


# Every other test runs the default scale, head_dim**-0.5: a kernel (or a dispatcher
# path) that ignored `scale` would pass them. Here each implementation gets a scale
# that is not its head dim's default, at a head dim the other tests do not use, and
# is held against the naive loops above, not against the module's reference.
SCALE, HEAD_DIM = 0.3, 32


@pytest.mark.parametrize("impl", ["reference", "pallas_gpu_interpret",
                                  "pallas_tpu_interpret"])
def test_dispatch_under_jit_honours_scale(seed, impl):
  assert SCALE != HEAD_DIM**-0.5
  rng = np.random.default_rng(seed)
  args = _decode_inputs(rng, batch=3, kv_heads=2, group=4, page_size=8, head_dim=HEAD_DIM,
                        max_pages=3)
  decode = jax.jit(pallas_kernels.paged_decode_attention,
                   static_argnames=("impl", "scale"))
  out = decode(*args, impl=impl, scale=SCALE)
  _assert_close(out, _naive_decode(*args, scale=SCALE), seed, F32_TOL, f"jit decode {impl}")
  _check_empty_slots(out, args[3], seed)
  pargs = _prefill_inputs(rng, batch=2, q_len=9, kv_len=20, kv_heads=2, group=4,
                          head_dim=HEAD_DIM)
  prefill = jax.jit(functools.partial(pallas_kernels.prefill_attention, impl=impl,
                                      scale=SCALE))
  _assert_close(prefill(*pargs), _naive_prefill(*pargs, scale=SCALE), seed, F32_TOL,
                f"jit prefill {impl}")


@pytest.mark.parametrize("impl", ["reference", "pallas_gpu_interpret",
                                  "pallas_tpu_interpret"])
def test_dispatch_under_scan(seed, impl):
  """Per-layer attention inside `lax.scan`, as the engines call it."""
  rng = np.random.default_rng(seed)
  q, k, v, lengths, tables = _decode_inputs(
      rng, batch=2, kv_heads=1, group=4, page_size=8, head_dim=64,
      max_pages=3)
  # Layers share lengths and tables (one sequence per slot); NaN-poisoned
  # slots stay in place under these per-layer transforms.
  stacked = (jnp.stack([q, -q]), jnp.stack([k, 0.5 * k]),
             jnp.stack([v, -v]))

  def decode_step(carry, xs):
    q, k, v = xs
    return carry, pallas_kernels.paged_decode_attention(
        q, k, v, lengths, tables, impl=impl)

  _, outs = jax.jit(lambda xs: lax.scan(decode_step, 0, xs))(stacked)
  for i in range(2):
    q, k, v = (s[i] for s in stacked)
    ref = _naive_decode(q, k, v, lengths, tables)
    _assert_close(outs[i], ref, seed, F32_TOL, f"scan decode {impl} layer {i}")

  pargs, _ = _prefill_case(seed, (2, 8, 12, 1, 4, 64))
  q, k, v, q_offsets, kv_lengths = pargs
  qs = jnp.stack([q, -q])

  def prefill_step(carry, q):
    return carry, pallas_kernels.prefill_attention(q, k, v, q_offsets,
                                                   kv_lengths, impl=impl)

  _, outs = jax.jit(lambda qs: lax.scan(prefill_step, 0, qs))(qs)
  for i in range(2):
    ref = _naive_prefill(qs[i], k, v, q_offsets, kv_lengths)
    _assert_close(outs[i], ref, seed, F32_TOL, f"scan prefill {impl} {i}")
