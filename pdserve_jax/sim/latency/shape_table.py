"""`ShapeTableLatencyModel`: this library's engine as measured, one time per
compiled program shape; a step costs the calls the runner makes for it (same
groups, same buckets). Exact for the instance it was profiled on, and for nothing
else: it knows no other model, tp or pp."""

from __future__ import annotations

import dataclasses
import json

from pdserve_jax.kv.allocator import pages_for
from pdserve_jax.runtime.buckets import RunnerShape, groups
from pdserve_jax.serving.step import Step
from pdserve_jax.sim.latency.base import LatencyModel, _latency_json


@dataclasses.dataclass(frozen=True)
class ShapeTableLatencyModel(LatencyModel):
  """Measured seconds per compiled program shape of one engine instance.

  A step costs the program calls `serving.executor` makes for it: prompt chunks in
  groups of `max_prefill_batch`, decodes in groups of `max_decode_batch`, each call
  at the (batch, length, page-table width) bucket the runner pads it to. Page-table
  widths count the pages a request holds (`pages` in `step_time`), which with
  lifetime reservation exceed what its context needs; without `pages`, and in the
  `*_totals` methods (equal rows assumed), only the context's pages are counted.
  `step_overhead_s` is the serving loop's host work between one step and the next
  (finishing the last, scheduling this one), added once per step.
  """
  shape: RunnerShape
  prefill: dict  # (batch, chunk length, table width) -> s
  decode: dict  # (batch, table width) -> s
  step_overhead_s: float = 0.0

  def _lookup(self, table, key, what):
    try:
      return table[key]
    except KeyError:
      raise ValueError(f"no measured {what} program of shape {key}; measured: "
                       f"{sorted(table)}") from None

  def calls_time(self, prefill_calls=(), decode_calls=()) -> float:
    """Seconds for these program calls, given by shape (as `StepRecord`s hold them)."""
    return (sum(self._lookup(self.prefill, tuple(k), "prefill") for k in prefill_calls)
            + sum(self._lookup(self.decode, tuple(k), "decode") for k in decode_calls))

  def _prefill_calls(self, chunk_lens, page_counts) -> float:
    n = self.shape.max_prefill_batch
    return self.calls_time(prefill_calls=[
        self.shape.prefill_shape(l, w) for l, w in zip(groups(chunk_lens, n),
                                                        groups(page_counts, n))])

  def _decode_calls(self, page_counts) -> float:
    return self.calls_time(decode_calls=[
        self.shape.decode_shape(w) for w in groups(page_counts, self.shape.max_decode_batch)])

  def step_time(self, step: Step, pages=None) -> float:
    size = self.shape.page_size
    count = (lambda r, tokens: len(pages(r))) if pages else (
        lambda r, tokens: pages_for(tokens, size))
    t = self.step_overhead_s
    if step.prefills:
      t += self._prefill_calls([c.end - c.start for c in step.prefills],
                               [count(c.request, c.end) for c in step.prefills])
    if step.decodes:
      t += self._decode_calls([count(r, r.context_len) for r in step.decodes])
    return t

  def prefill_totals(self, num_seqs, tokens, sq_tokens):
    # Equal chunks starting at 0 (sq_tokens is implied by them).
    l = max(1, tokens // num_seqs)
    return self.step_overhead_s + self._prefill_calls(
        [l] * num_seqs, [pages_for(l, self.shape.page_size)] * num_seqs)

  def decode_totals(self, batch, context):
    w = pages_for(max(1, context // batch), self.shape.page_size)
    return self.step_overhead_s + self._decode_calls([w] * batch)

  def mixed_totals(self, num_seqs, tokens, sq_tokens, batch, context):
    return (self.prefill_totals(num_seqs, tokens, sq_tokens)
            + self.decode_totals(batch, context) - self.step_overhead_s)

  def to_json(self) -> str:
    return json.dumps({"kind": "shape_table", "unit": "s",
                       "shape": dataclasses.asdict(self.shape),
                       "prefill": [[*k, v] for k, v in sorted(self.prefill.items())],
                       "decode": [[*k, v] for k, v in sorted(self.decode.items())],
                       "step_overhead_s": self.step_overhead_s}, indent=1)

  @classmethod
  def from_json(cls, text: str) -> ShapeTableLatencyModel:
    d = _latency_json(text, "shape_table")
    return cls(RunnerShape(**d["shape"]), {tuple(r[:3]): float(r[3]) for r in d["prefill"]},
               {tuple(r[:2]): float(r[2]) for r in d["decode"]},
               float(d.get("step_overhead_s", 0.0)))
