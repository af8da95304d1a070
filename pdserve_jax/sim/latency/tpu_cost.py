"""`TpuCostLatencyModel`: step times from XLA's counts of this library's programs
compiled for TPU (`runtime.cost` writes the table; this module reads it, no JAX).

The table holds, per tp, per program ("packed", "decode") and per compiled size
(tokens, rows), flops, bytes accessed and collective bytes per device at 1 and 2
layers. A program of L layers costs base + L * per_layer of each count (per_layer
= the 2-layer count minus the 1-layer one; bytes at least the layer's weights),
between compiled sizes interpolated linearly and beyond them extrapolated from
the nearest two. A call's time is

  max(flops / (peak * mxu_efficiency), bytes / (hbm * hbm_efficiency))
    + collective bytes over ICI at ici_efficiency

and a step adds `step_overhead_s` once. A step's calls are the engine's
(`RunnerShape.step_calls`: prompt chunks and decode rows packed by tokens, pure
decode steps in decode calls), each at the bucket the runner pads it to.

Attention is added here, not counted by XLA (its Pallas kernels are custom
calls): 4 * heads * head_dim flops per (query, key) pair and each row's K/V
context read once per layer, per device with the heads split as the programs
split them, spread over a step's calls by their tokens. Pipeline parallelism:
a stage holds num_layers / pp layers and the LM head (the slowest stage, which
sets a full pipeline's pace), plus handing the hidden state to the next stage.
Limits: no TPU has timed these programs; the efficiencies are what make times
of counts, and XLA's byte counts of some ops (the sampler's sort) are its cost
model's, not measured traffic.
"""

from __future__ import annotations

import bisect
import dataclasses
import json

from pdserve_jax.model.config import ModelConfig
from pdserve_jax.runtime.buckets import RunnerShape
from pdserve_jax.core.step import Step
from pdserve_jax.sim.hardware import HardwareSpec
from pdserve_jax.sim.latency.base import LatencyModel
from pdserve_jax.sim.latency.roofline import RooflineLatencyModel as _Roofline

KIND = "tpu_cost"
_COUNTS = ("flops", "bytes", "collectives")
# TpuCostLatencyModel's fields that turn counts into seconds.
PARAMETERS = ("mxu_efficiency", "hbm_efficiency", "ici_efficiency", "step_overhead_s")


def _ring_factor(kind: str, tp: int) -> float:
  """Bytes each device sends per result byte of a ring collective over tp devices."""
  if tp == 1:
    return 0.0
  return {"all-reduce": 2 * (tp - 1) / tp, "all-gather": (tp - 1) / tp,
          "reduce-scatter": tp - 1}.get(kind, 1.0)


def _line(sizes, values, x):
  """Piecewise-linear through (sizes, values); outside, the nearest segment's line."""
  if len(sizes) == 1:
    return values[0] * x / sizes[0]  # through the origin: counts grow with size
  i = min(max(bisect.bisect_left(sizes, x), 1), len(sizes) - 1)
  x0, x1, y0, y1 = sizes[i - 1], sizes[i], values[i - 1], values[i]
  return max(0.0, y0 + (y1 - y0) * (x - x0) / (x1 - x0))


@dataclasses.dataclass(frozen=True)
class _Program:
  """One program's counts at its compiled sizes, as (base, per-layer) lines."""
  sizes: tuple
  base: dict  # count -> values at sizes
  layer: dict

  @classmethod
  def from_rows(cls, rows, tp):
    rows = sorted(rows, key=lambda r: r["size"])
    base, layer = {c: [] for c in _COUNTS}, {c: [] for c in _COUNTS}
    for r in rows:
      one, two = r["layers_1"], r["layers_2"]
      coll = lambda d: sum(_ring_factor(k, tp) * v for k, v in d["collective_bytes"].items())
      per = {"flops": max(0.0, two["flops"] - one["flops"]),
             # Fusions outside the layers can shift between the two compiles; a
             # layer reads its weights at least (the argument bytes it adds).
             "bytes": max(two["bytes"] - one["bytes"],
                          float(two["argument_bytes"] - one["argument_bytes"]), 0.0),
             "collectives": max(0.0, coll(two) - coll(one))}
      firsts = {"flops": one["flops"], "bytes": one["bytes"], "collectives": coll(one)}
      for c in _COUNTS:
        layer[c].append(per[c])
        base[c].append(max(0.0, firsts[c] - per[c]))
    return cls(tuple(r["size"] for r in rows), base, layer)

  def counts(self, size, layers) -> dict:
    return {c: _line(self.sizes, self.base[c], size)
            + layers * _line(self.sizes, self.layer[c], size) for c in _COUNTS}


@dataclasses.dataclass(frozen=True)
class TpuCostLatencyModel(LatencyModel):
  """Step times of one tp x pp instance from a cost table (see the module docstring).

  Efficiency defaults are the analytic roofline's (`RooflineLatencyModel`), so the
  two differ only in what they count: large bf16 matmuls on TPUs run at well over
  half of the MXU peak and decode's skinny ones below it, 0.6 between; streaming
  reads reach about 80% of HBM peak; ring collectives about 70% of ICI per link.
  `step_overhead_s` is the serving loop's host work per step (scheduling,
  dispatch), also the roofline's default: no TPU host has measured it here.
  """
  table: dict  # the parsed JSON
  model: ModelConfig
  hardware: HardwareSpec
  tp: int = 1
  pp: int = 1
  mxu_efficiency: float = _Roofline.flops_efficiency
  hbm_efficiency: float = _Roofline.bandwidth_efficiency
  ici_efficiency: float = _Roofline.link_efficiency
  step_overhead_s: float = _Roofline.step_overhead_s
  dtype_bytes: int = 2

  def __post_init__(self):
    t, m = self.table, self.model
    if t.get("kind") != KIND:
      raise ValueError(f"not a TPU cost table: kind={t.get('kind')!r}")
    if t["model"] != m.name:
      raise ValueError(f"the cost table is of {t['model']}, not {m.name}")
    if str(self.tp) not in t["tp"]:
      raise ValueError(f"the cost table has no tp={self.tp} (has tp "
                       f"{', '.join(sorted(t['tp'], key=int))})")
    if self.pp < 1 or m.num_layers % self.pp:
      raise ValueError(f"pp={self.pp} does not divide {m.num_layers} layers")
    for f in ("mxu_efficiency", "hbm_efficiency", "ici_efficiency"):
      if not 0 < getattr(self, f) <= 1:
        raise ValueError(f"{f} must lie in (0, 1], got {getattr(self, f)}")
    rows = t["tp"][str(self.tp)]
    tp, q, kv = self.tp, m.num_heads, m.num_kv_heads
    # Heads each device attends with, as runtime.programs splits them.
    if tp == 1 or q % tp:
      hq, hkv = q, kv
    else:
      hq, hkv = q // tp, (kv // tp if kv % tp == 0 else 1 if tp % kv == 0 else kv)
    consts = {
        # As the engine sizes its largest packed call (at least the longest
        # sequence, so any prompt fits one call); buckets past the compiled
        # points follow the last segment's line.
        "shape": RunnerShape(**dict(t["shape"], max_step_tokens=max(
            t["shape"]["max_step_tokens"], m.max_position_embeddings))),
        "_programs": {n: _Program.from_rows(rows[n], tp) for n in ("packed", "decode")},
        "_layers": m.num_layers // self.pp,
        "_pair_flops": 4 * hq * m.head_dim * (m.num_layers // self.pp),
        "_kv_read_bytes": 2 * hkv * m.head_dim * self.dtype_bytes * (m.num_layers // self.pp),
        "_flops_rate": self.hardware.peak_flops * self.mxu_efficiency,
        "_bytes_rate": self.hardware.hbm_bandwidth * self.hbm_efficiency,
        "_link_rate": self.hardware.intra_node_bw * self.ici_efficiency,
        # The hidden state handed to the next stage, per token.
        "_pp_bytes": (m.hidden_size * self.dtype_bytes if self.pp > 1 else 0),
    }
    for k, v in consts.items():
      object.__setattr__(self, k, v)

  def parameters(self) -> dict:
    """The named factors that turn counts into seconds (printed with a plan)."""
    return {k: getattr(self, k) for k in PARAMETERS}

  def call_time(self, program: str, size: int, tokens: int = 0, attn_pairs: float = 0.0,
                kv_tokens: float = 0.0) -> float:
    """Seconds of one call of `program` at bucket `size`, its rows holding `tokens`
    real tokens, `attn_pairs` (query, key) pairs and `kv_tokens` of K/V context."""
    c = self._programs[program].counts(size, self._layers)
    flops = c["flops"] + self._pair_flops * attn_pairs
    bytes_ = c["bytes"] + self._kv_read_bytes * kv_tokens
    link = c["collectives"] + self._pp_bytes * tokens
    return (max(flops / self._flops_rate, bytes_ / self._bytes_rate)
            + link / self._link_rate)

  def _calls(self, chunk_lens, num_decodes, pairs, kv_tokens) -> float:
    """The step's calls at their buckets, attention spread by their tokens."""
    tokens = sum(chunk_lens) + num_decodes
    if tokens == 0:
      return self.step_overhead_s
    packed, decode = self.shape.step_calls(chunk_lens, num_decodes)
    if packed:
      rows = list(chunk_lens) + [1] * num_decodes
      calls = [("packed", s[0], sum(rows[lo:hi]))
               for s, (lo, hi) in zip(packed, self.shape.packed_groups(rows))]
    else:
      sizes = [min(self.shape.max_rows, num_decodes - i)
               for i in range(0, num_decodes, self.shape.max_rows)]
      calls = [("decode", s[0], n) for s, n in zip(decode, sizes)]
    return self.step_overhead_s + sum(
        self.call_time(p, size, n, pairs * n / tokens, kv_tokens * n / tokens)
        for p, size, n in calls)

  def step_time(self, step: Step, pages=None) -> float:
    chunks = [c.end - c.start for c in step.prefills]
    # A chunk's token at position p attends p + 1 keys; a decode its context.
    pairs = sum((c.end * (c.end + 1) - c.start * (c.start + 1)) / 2 for c in step.prefills)
    kv = sum(c.end for c in step.prefills) + step.decode_context
    return self._calls(chunks, len(step.decodes), pairs + step.decode_context, kv)

  def _chunks(self, num_seqs, tokens, sq_tokens):
    """Equal chunks, and the (query, key) pairs and K/V tokens they imply: with
    chunks of c tokens, end**2 - start**2 = c * (2 * end - c)."""
    if num_seqs == 0 or tokens == 0:
      return [], 0.0, 0.0
    c = max(1, tokens // num_seqs)
    ends = (sq_tokens / c + num_seqs * c) / 2
    return [c] * num_seqs, (sq_tokens + tokens) / 2, ends

  def prefill_totals(self, num_seqs, tokens, sq_tokens):
    chunks, pairs, kv = self._chunks(num_seqs, tokens, sq_tokens)
    return self._calls(chunks, 0, pairs, kv)

  def decode_totals(self, batch, context):
    return self._calls([], batch, context, context)

  def mixed_totals(self, num_seqs, tokens, sq_tokens, batch, context):
    chunks, pairs, kv = self._chunks(num_seqs, tokens, sq_tokens)
    return self._calls(chunks, batch, pairs + context, kv + context)


def load_table(path_or_text: str) -> dict:
  """A cost table from its JSON text or file path."""
  text = path_or_text
  if not text.lstrip().startswith("{"):
    with open(path_or_text) as f:
      text = f.read()
  d = json.loads(text)
  if d.get("kind") != KIND:
    raise ValueError(f"not a TPU cost table: kind={d.get('kind')!r}")
  return d
