"""Step types: what one scheduler iteration runs on one instance.

A `Step` is the unit both executors carry out (real programs, or a latency
model's time) and the unit the step logs of both compare.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from pdserve_jax.core.request import Request

PREFILL = "prefill"
DECODE = "decode"


@dataclasses.dataclass(frozen=True, slots=True)
class PrefillChunk:
  """Tokens [start, end) of `request`'s prefill (its prompt, plus output tokens to
  recompute after a preemption) computed in one step. The chunk with
  `end == request.prefill_len` also samples the request's next output token."""
  request: Request
  start: int
  end: int

  @property
  def num_tokens(self) -> int:
    return self.end - self.start

  @property
  def last(self) -> bool:
    return self.end == self.request.prefill_len


@dataclasses.dataclass(slots=True)
class Step:
  """One iteration: prefill chunks and decode requests (one token each).

  Its lists are snapshots: a scheduler never mutates a list it has handed out (it
  builds a new one when membership changes), which lets consecutive decode steps
  share one list instead of copying the batch every step.
  """
  prefills: list[PrefillChunk] = dataclasses.field(default_factory=list)
  decodes: list[Request] = dataclasses.field(default_factory=list)
  # Schedulers keep this total up to date as requests join and leave, so that a
  # latency model need not walk the batch every step.
  _decode_context: Optional[int] = None
  # Layer-wise KV streaming: (request, decode instance) pairs whose KV leaves this
  # step layer group by layer group as it is written; the coordinator adds them
  # before the launch, and the executor reports each copy's end with `copy_done`.
  streams: list = dataclasses.field(default_factory=list)

  @property
  def num_prefill_tokens(self) -> int:
    return sum(c.end - c.start for c in self.prefills)

  @property
  def num_decode_tokens(self) -> int:
    return len(self.decodes)

  @property
  def empty(self) -> bool:
    return not self.prefills and not self.decodes

  @property
  def decode_context(self) -> int:
    """Tokens the decodes attend over, summed (each attends `kv_len + 1`)."""
    if self._decode_context is None:
      return sum(r.context_len for r in self.decodes)
    return self._decode_context

  @property
  def requests(self) -> list[Request]:
    return [c.request for c in self.prefills] + list(self.decodes)

  def describe(self) -> tuple:
    """((request id, start, end) per chunk, (request id per decode)): what a step
    did, comparable across executors; a step that streams KV out adds ((request
    id, destination instance) per stream)."""
    out: tuple = (tuple((c.request.request_id, c.start, c.end) for c in self.prefills),
                  tuple(r.request_id for r in self.decodes))
    if self.streams:
      out += (tuple((r.request_id, dst.name) for r, dst in self.streams),)
    return out
