"""XLA's own counts of the engine's programs: a cost table for the TPU latency model.

For a model, a (compile-only) TPU topology and each tp, `build_cost_table` lowers
`lower_programs` in bfloat16 at a few packed token buckets and decode batch
buckets, compiles them, and records per program and size: `cost_analysis()` flops
and bytes accessed, the bytes of every collective in the compiled HLO, and
`memory_analysis()`. `sim.latency.tpu_cost.TpuCostLatencyModel` reads the result;
this module is its only JAX side (the simulator imports no JAX).

Three things the raw counts get wrong, and what is done about each:
  * XLA's cost analysis counts a while loop's body once, whatever its trip count,
    so the scan over layers is counted as one layer (found by compiling 2, 3 and 4
    layers: equal flops). The programs are lowered with the layers unrolled
    (`llama.unrolled_layers`) at 1 and 2 layers; the latency model takes cost(L) =
    cost(1) + (L - 1) * (cost(2) - cost(1)), so no 32- or 80-layer program is
    compiled, and a pipeline stage is the same line at L / pp layers.
  * A Pallas call is a custom call: its flops are not counted (the flops do not
    change with the page-table width), and its operands are the whole pool, not
    the pages it reads. The pool is therefore 2 pages (its bytes then vanish
    beside the weights), and the latency model adds attention's flops and K/V
    reads from each step's contexts.
  * Bytes of the layer difference can come out below the layer's weights when
    fusions around the layers change; the per-layer bytes kept are at least the
    argument bytes one layer adds (its weights on one device, exact).
Collectives are in the compiled program (Megatron all-reduces, the LM head's
gathers) but cost analysis gives them no time: their result bytes are recorded
per kind and the latency model times them over ICI.
"""

from __future__ import annotations

import dataclasses
import re
import time
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp

from pdserve_jax.model import llama, sharding
from pdserve_jax.model.config import ModelConfig
from pdserve_jax.runtime.buckets import RunnerShape
from pdserve_jax.runtime.programs import lower_programs

KIND = "tpu_cost"
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all",
               "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2,
                "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}
_COLLECTIVE_RE = re.compile(r"=\s*(.*?)\s(" + "|".join(COLLECTIVES) + r")(-start)?\(")
_ARRAY_RE = re.compile(r"\b([a-z]+\d*)\[([\d,]*)\]")


def _array_bytes(text: str) -> int:
  total = 0
  for dtype, dims in _ARRAY_RE.findall(text):
    n = 1
    for d in filter(None, dims.split(",")):
      n *= int(d)
    total += n * _DTYPE_BYTES.get(dtype, 4)
  return total


def collective_bytes(hlo_text: str) -> dict:
  """{kind: result bytes summed over the program's collectives} of compiled HLO
  (both branches of a conditional counted: an upper bound). An async start's
  result tuple holds its operand too, so only its last array is counted."""
  out = {k: 0 for k in COLLECTIVES}
  for line in hlo_text.splitlines():
    m = _COLLECTIVE_RE.search(line)
    if not m:
      continue
    result, kind, start = m.groups()
    arrays = _ARRAY_RE.findall(result)
    out[kind] += _array_bytes(" ".join(f"{d}[{s}]" for d, s in arrays[-1:])) if start else (
        _array_bytes(result))
  return out


def peak_bytes(memory) -> int:
  """A compiled program's peak device bytes from its `memory_analysis()`: arguments
  and outputs (a donated argument aliased by an output counted once) plus
  temporaries."""
  return (memory.argument_size_in_bytes + memory.output_size_in_bytes
          - memory.alias_size_in_bytes + memory.temp_size_in_bytes)


def compiled_counts(compiled) -> dict:
  """What one compiled program costs by XLA's counts (per device)."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older JAX: one dict per program
    cost = cost[0]
  mem = compiled.memory_analysis()
  return {"flops": float(cost.get("flops", 0.0)),
          "bytes": float(cost.get("bytes accessed", 0.0)),
          "transcendentals": float(cost.get("transcendentals", 0.0)),
          "collective_bytes": collective_bytes(compiled.as_text()),
          "argument_bytes": int(mem.argument_size_in_bytes),
          "output_bytes": int(mem.output_size_in_bytes),
          "temp_bytes": int(mem.temp_size_in_bytes),
          "code_bytes": int(mem.generated_code_size_in_bytes)}


def build_cost_table(cfg: ModelConfig, devices: Sequence, topology: str,
                     shape: RunnerShape, tps: Sequence[int], token_points: Sequence[int],
                     batch_points: Sequence[int], dtype=jnp.bfloat16,
                     progress: Optional[Callable[[str], None]] = None,
                     on_tp: Optional[Callable[[dict], None]] = None) -> dict:
  """The cost table (JSON-able) of `cfg`'s programs at each tp.

  `token_points` / `batch_points`: the packed token buckets and decode batch
  buckets compiled (paired in order: one `lower_programs` call per pair and layer
  count, so give as many of each); buckets between them the latency model
  interpolates linearly (matmul flops and bytes are linear in tokens and rows).
  Each is compiled at 1 and 2 layers, layer scan unrolled. `on_tp(table)` is
  called with the table so far after each tp (to save partial work)."""
  if len(token_points) != len(batch_points):
    raise ValueError("give as many token points as batch points (one call per pair)")
  for t in token_points:
    if t not in shape.token_buckets:
      raise ValueError(f"{t} is not a packed bucket of {shape}: {shape.token_buckets}")
  for b in batch_points:
    if b not in shape.decode_batches:
      raise ValueError(f"{b} is not a decode bucket of {shape}: {shape.decode_batches}")
  say = progress or (lambda s: None)
  # A 2-page pool: the Pallas calls' pool operands then add no bytes (the kernels'
  # reads are added from contexts by the latency model).
  small = dataclasses.replace(shape, num_pages=2)
  per_tp = {}
  table = {"kind": KIND, "model": cfg.name, "topology": topology,
           "device_kind": list(devices)[0].device_kind, "dtype": jnp.dtype(dtype).name,
           "jax_version": jax.__version__,
           "shape": {"page_size": shape.page_size, "max_rows": shape.max_rows,
                     "max_step_tokens": shape.max_step_tokens,
                     "max_seq_len": shape.max_seq_len,
                     "min_step_tokens": shape.min_step_tokens},
           "tp": per_tp}
  for tp in tps:
    if tp > len(devices):
      raise ValueError(f"tp={tp} exceeds the topology's {len(devices)} devices")
    mesh = sharding.make_mesh(list(devices)[:tp])
    rows = {"packed": [], "decode": []}
    for T, B in zip(token_points, batch_points):
      by_layers = {}
      for layers in (1, 2):
        t0 = time.perf_counter()
        with llama.unrolled_layers():
          lowered = lower_programs(cfg.replace(num_layers=layers), mesh, small, dtype,
                                   "auto", tokens=T, batch=B)
        by_layers[layers] = {n: compiled_counts(low.compile()) for n, low in lowered.items()}
        say(f"{cfg.name} tp={tp} tokens={T} batch={B} layers={layers}: "
            f"{time.perf_counter() - t0:.0f} s")
      for name, size in (("packed", T), ("decode", B)):
        rows[name].append({"size": size, "layers_1": by_layers[1][name],
                           "layers_2": by_layers[2][name]})
    per_tp[str(tp)] = rows
    if on_tp:
      on_tp(table)
  return table
