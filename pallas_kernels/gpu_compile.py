"""Compiles the GPU (Triton-lowered) Pallas kernels for NVIDIA GPUs, with no GPU.

jax lowers a Triton `pallas_call` for platform "cuda" to a `__gpu$xla.gpu.triton`
custom call whose backend config holds the kernel as MLIR bytecode of a Triton-dialect
module (TTIR), with num_warps, num_stages and the grid; XLA compiles it only when the
GPU program is compiled, on a GPU host (jax/_src/pallas/triton/pallas_call_registration.py,
the jaxlib <= 0.10.2 branch). Here that TTIR is read back with jax's own MLIR bindings
(which know the Triton dialect), printed as text, and compiled by the `triton` package's
CUDA pipeline (make_ttir, make_ttgir, make_llir, make_ptx; the stages XLA's Triton
pipeline mirrors) for a `GPUTarget`, then by the `ptxas` the triton wheel ships. None of
it needs a device. Shared memory is Triton's allocation (the module's `ttg.shared`, which
XLA reads and rejects when it exceeds the device's opt-in limit per block); registers,
stack and spills are `ptxas -v`'s.

Limits: the `triton` wheel is not the Triton XLA links (another commit, another LLVM),
and XLA turns the LLVM IR into PTX with its own NVPTX back end and flags, so the figures
are those of the same TTIR through an equivalent pipeline, not XLA's bytes; a TTIR the
wheel's dialects cannot parse fails here with the parser's message. Needs `triton`
(`pip install triton`, CPU-only wheel with no torch); `available()` says why not.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import subprocess
import tempfile
from collections.abc import Callable, Sequence

import jax

_TRITON_CALL = "__gpu$xla.gpu.triton"


@dataclasses.dataclass(frozen=True)
class GpuLimits:
  """What one GPU generation grants a thread block (CUDA C Programming Guide, "Technical
  Specifications per Compute Capability": 8.0 and 9.0)."""
  name: str
  capability: int          # 80 = sm_80
  smem_per_block: int      # bytes, the opt-in maximum (cudaDevAttrMaxSharedMemoryPerBlockOptin)
  regs_per_thread: int = 255   # ptxas keeps to it (and to 65536 per block), spilling past it


# A100: 164 KiB of shared memory per SM, of which 163 KiB one block may opt in to.
A100 = GpuLimits("A100 (sm_80)", 80, 163 * 1024)
# H100 and H200 (the same GH100 SM): 228 KiB per SM, 227 KiB per block.
H100 = GpuLimits("H100/H200 (sm_90)", 90, 227 * 1024)
TARGETS = (A100, H100)


@dataclasses.dataclass(frozen=True)
class TritonCall:
  """One Triton kernel as jax emitted it for CUDA."""
  name: str
  ttir: str              # the Triton-dialect module, as text
  num_warps: int
  num_stages: int
  grid: tuple[int, int, int]


@dataclasses.dataclass(frozen=True)
class KernelBuild:
  """One kernel compiled for one GPU generation."""
  call: TritonCall
  gpu: GpuLimits
  shared_bytes: int       # dynamic shared memory the launch must request
  registers: int          # per thread
  stack_bytes: int
  spill_store_bytes: int
  spill_load_bytes: int
  global_scratch_bytes: int

  def problem(self) -> str | None:
    """Why this kernel cannot launch on `gpu` (XLA's own check: shared memory against
    the opt-in limit per block), or None. Registers never stop a launch: ptxas keeps to
    the limits and spills the rest to local memory, which costs time, not correctness."""
    if self.shared_bytes > self.gpu.smem_per_block:
      return (f"{self.call.name} needs {self.shared_bytes} B of shared memory per block; "
              f"{self.gpu.name} allows {self.gpu.smem_per_block} B")
    return None


def available() -> str | None:
  """None when kernels can be compiled here, else the reason they cannot."""
  if importlib.util.find_spec("triton") is None:
    return "the `triton` package is not installed (pip install triton)"
  try:
    _ptxas(80)
  except (ImportError, AttributeError, FileNotFoundError) as e:
    return f"triton's ptxas is unavailable: {e}"
  return None


def triton_calls(fn: Callable, *args: jax.ShapeDtypeStruct) -> list[TritonCall]:
  """Every Triton kernel in `jax.jit(fn)` lowered for CUDA at `args`' shapes."""
  from jax._src.lib.mlir import ir
  from jaxlib.triton import dialect as tt_dialect

  lowered = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
  found = []

  def walk(op):
    for region in op.regions:
      for block in region.blocks:
        for child in block.operations:
          if (child.operation.name == "stablehlo.custom_call" and ir.StringAttr(
              child.attributes["call_target_name"]).value == _TRITON_CALL):
            found.append(ir.DictAttr(child.attributes["mhlo.backend_config"]))
          walk(child.operation)

  walk(lowered.compiler_ir("stablehlo").operation)
  calls = []
  for config in found:
    # A context of its own that knows the Triton dialect reads the kernel's bytecode.
    with ir.Context() as ctx:
      tt_dialect.register_dialect(ctx)
      ctx.load_all_available_dialects()
      module = ir.Module.parse(ir.StringAttr(config["ir"]).value_bytes)
      ttir = str(module.operation)

    def int_of(key, config=config):
      return ir.IntegerAttr(config[key]).value

    calls.append(TritonCall(
        name=ir.StringAttr(config["name"]).value, ttir=ttir,
        num_warps=int_of("num_warps"), num_stages=int_of("num_stages"),
        grid=(int_of("grid_x"), int_of("grid_y"), int_of("grid_z"))))
  return calls


def compile_call(call: TritonCall, gpu: GpuLimits) -> KernelBuild:
  """Compiles one kernel for `gpu` through triton's CUDA pipeline and ptxas."""
  from triton._C.libtriton import ir
  from triton.backends.compiler import GPUTarget, Language
  from triton.backends.nvidia import compiler as nvidia
  from triton.compiler.compiler import make_backend

  backend = make_backend(GPUTarget("cuda", gpu.capability, 32))
  # XLA contracts a*b+c to FMA by default; so does triton with fp fusion on.
  options = backend.parse_options({"num_warps": call.num_warps, "num_ctas": 1,
                                   "num_stages": call.num_stages, "enable_fp_fusion": True})
  context = ir.context()
  ir.load_dialects(context)
  backend.load_dialects(context)
  stages: dict = {}
  backend.add_stages(stages, options, Language.TRITON)
  metadata: dict = {}
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, f"{call.name}.ttir")
    with open(path, "w") as f:
      f.write(call.ttir)
    module = ir.parse_mlir_module(path, context)
    module.context = context
    # From make_ttir on, as XLA does: jax's TTIR is the input of that stage.
    for stage in ("ttir", "ttgir", "llir", "ptx"):
      module = stages[stage](module, metadata)
    ptx_path = os.path.join(tmp, f"{call.name}.ptx")
    with open(ptx_path, "w") as f:
      f.write(module)
    arch = nvidia.sm_arch_from_capability(gpu.capability)
    run = subprocess.run([_ptxas(gpu.capability), "-v", f"--gpu-name={arch}", ptx_path,
                          "-o", os.path.join(tmp, f"{call.name}.cubin")],
                         capture_output=True, text=True)
  if run.returncode:
    raise RuntimeError(f"ptxas failed on {call.name} for {arch}:\n{run.stderr}")
  usage = _ptxas_usage(run.stderr)
  return KernelBuild(call=call, gpu=gpu, shared_bytes=int(metadata["shared"]),
                     global_scratch_bytes=int(metadata.get("global_scratch_size", 0)), **usage)


def compile_fn(fn: Callable, args: Sequence[jax.ShapeDtypeStruct],
               gpus: Sequence[GpuLimits] = TARGETS) -> list[KernelBuild]:
  """Every Triton kernel of `fn` at `args`, compiled for each of `gpus`."""
  return [compile_call(call, gpu) for call in triton_calls(fn, *args) for gpu in gpus]


# The kernels' abstract arguments, by the names of their shapes' parts.


def decode_args(*, batch, kv_heads, group, page_size, head_dim, max_pages, dtype,
                num_pages=None) -> tuple:
  """`paged_decode_gpu.paged_decode_attention`'s arguments; by default a page each."""
  num_pages = num_pages or batch * max_pages + 1
  pool = jax.ShapeDtypeStruct((kv_heads, num_pages, page_size, head_dim), dtype)
  return (jax.ShapeDtypeStruct((batch, kv_heads * group, head_dim), dtype), pool, pool,
          jax.ShapeDtypeStruct((batch,), "int32"),
          jax.ShapeDtypeStruct((batch, max_pages), "int32"))


def prefill_args(*, batch, q_len, kv_len, kv_heads, group, head_dim, dtype) -> tuple:
  """`flash_prefill_gpu.prefill_attention`'s arguments."""
  kv = jax.ShapeDtypeStruct((batch, kv_len, kv_heads, head_dim), dtype)
  return (jax.ShapeDtypeStruct((batch, q_len, kv_heads * group, head_dim), dtype), kv, kv,
          jax.ShapeDtypeStruct((batch,), "int32"), jax.ShapeDtypeStruct((batch,), "int32"))


def ragged_args(*, tokens, rows, kv_heads, group, page_size, head_dim, max_pages, dtype,
                num_pages=None) -> tuple:
  """`ragged_paged_gpu.ragged_paged_attention`'s arguments; by default a page each."""
  num_pages = num_pages or rows * max_pages + 1
  pool = jax.ShapeDtypeStruct((kv_heads, num_pages, page_size, head_dim), dtype)
  per_row = jax.ShapeDtypeStruct((rows,), "int32")
  return (jax.ShapeDtypeStruct((tokens, kv_heads * group, head_dim), dtype), pool, pool,
          per_row, per_row, per_row, jax.ShapeDtypeStruct((rows, max_pages), "int32"))


def _ptxas(capability: int) -> str:
  from triton.backends.nvidia import compiler as nvidia

  path = nvidia.get_ptxas(capability).path
  if not path or not os.path.exists(path):
    raise FileNotFoundError(f"no ptxas at {path!r}")
  return path


def _ptxas_usage(log: str) -> dict:
  """Registers, stack and spill bytes from `ptxas -v` (one entry function)."""
  def number(pattern):
    match = re.search(pattern, log)
    return int(match.group(1)) if match else 0

  if not re.search(r"Used (\d+) registers", log):
    raise RuntimeError(f"no register count in ptxas' log:\n{log}")
  return {"registers": number(r"Used (\d+) registers"),
          "stack_bytes": number(r"(\d+) bytes stack frame"),
          "spill_store_bytes": number(r"(\d+) bytes spill stores"),
          "spill_load_bytes": number(r"(\d+) bytes spill loads")}
