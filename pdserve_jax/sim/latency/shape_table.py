"""`ShapeTableLatencyModel`: this library's engine as measured, one time per
compiled program shape; a step costs the calls the runner makes for it (same
groups, same buckets: `RunnerShape.step_calls`). Exact for the instance it was
profiled on, and for nothing else: it knows no other model, tp or pp."""

from __future__ import annotations

import dataclasses
import json

from pdserve_jax.runtime.buckets import RunnerShape
from pdserve_jax.core.step import Step
from pdserve_jax.sim.latency.base import LatencyModel, _latency_json


@dataclasses.dataclass(frozen=True)
class ShapeTableLatencyModel(LatencyModel):
  """Measured seconds per compiled program shape of one engine instance.

  A step costs the program calls `serving.executor` makes for it: with prompt
  chunks, packed calls of chunks and decode rows at their (tokens,) buckets; a
  pure decode step, decode calls at their (batch,) buckets. Page tables have one
  width, so the pages a request holds do not matter. `step_overhead_s` is the
  serving loop's host work between one step and the next (finishing the last,
  scheduling this one), added once per step.
  """
  shape: RunnerShape
  packed: dict  # (tokens,) -> s
  decode: dict  # (batch,) -> s
  step_overhead_s: float = 0.0

  def _lookup(self, table, key, what):
    try:
      return table[key]
    except KeyError:
      raise ValueError(f"no measured {what} program of shape {key}; measured: "
                       f"{sorted(table)}") from None

  def calls_time(self, packed_calls=(), decode_calls=()) -> float:
    """Seconds for these program calls, given by shape (as `StepRecord`s hold them)."""
    return (sum(self._lookup(self.packed, tuple(k), "packed") for k in packed_calls)
            + sum(self._lookup(self.decode, tuple(k), "decode") for k in decode_calls))

  def _calls(self, chunk_lens, num_decodes) -> float:
    return self.calls_time(*self.shape.step_calls(chunk_lens, num_decodes))

  def step_time(self, step: Step, pages=None) -> float:
    return self.step_overhead_s + self._calls([c.num_tokens for c in step.prefills],
                                              len(step.decodes))

  def prefill_totals(self, num_seqs, tokens, sq_tokens):
    # Equal chunks (sq_tokens is implied by them).
    return self.step_overhead_s + self._calls([max(1, tokens // num_seqs)] * num_seqs, 0)

  def decode_totals(self, batch, context):
    return self.step_overhead_s + self._calls([], batch)

  def mixed_totals(self, num_seqs, tokens, sq_tokens, batch, context):
    return self.step_overhead_s + self._calls([max(1, tokens // num_seqs)] * num_seqs, batch)

  def to_json(self) -> str:
    return json.dumps({"kind": "shape_table", "unit": "s",
                       "shape": dataclasses.asdict(self.shape),
                       "packed": [[*k, v] for k, v in sorted(self.packed.items())],
                       "decode": [[*k, v] for k, v in sorted(self.decode.items())],
                       "step_overhead_s": self.step_overhead_s}, indent=1)

  @classmethod
  def from_json(cls, text: str) -> ShapeTableLatencyModel:
    d = _latency_json(text, "shape_table")
    return cls(RunnerShape(**d["shape"]), {tuple(r[:1]): float(r[1]) for r in d["packed"]},
               {tuple(r[:1]): float(r[1]) for r in d["decode"]},
               float(d.get("step_overhead_s", 0.0)))
