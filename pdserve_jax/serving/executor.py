"""The JAX executor: carries out scheduler steps with the real jitted programs.

A `StepRunner` binds one scheduler to one `InstanceRunner` and keeps at most one
step in flight. Launching a step only dispatches programs (JAX runs them
asynchronously), so the engine loop can launch work on every mesh before waiting
on any; `poll` turns finished device results into tokens, marks stop tokens, and
hands the step back to the scheduler with the wall-clock time it was seen done.

The scheduler decides; this module only translates a `Step` into program rows
(prompt slices, positions, page tables, sampling rows) and tokens back into
request state. Request payloads are `Job`s.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from typing import List, Optional

import numpy as np

from pdserve_jax.runtime.programs import InstanceRunner, SamplingRows
from pdserve_jax.serving.params import SamplingParams
from pdserve_jax.serving.request import Request
from pdserve_jax.serving.scheduler import Step


@dataclasses.dataclass(eq=False)
class Job:
  """Executor-side data of one request (the `Request.payload`)."""
  prompt: List[int]
  params: SamplingParams
  tokens: List[int] = dataclasses.field(default_factory=list)
  stream: "queue.Queue" = dataclasses.field(default_factory=queue.Queue)
  finished: threading.Event = dataclasses.field(default_factory=threading.Event)
  error: Optional[BaseException] = None

  def emit(self, token: int) -> None:
    self.tokens.append(token)
    self.stream.put(token)

  def end(self, error: Optional[BaseException] = None) -> None:
    self.error = error
    self.finished.set()
    self.stream.put(None)


def _sampling_rows(reqs: List[Request], token_index: List[int]) -> SamplingRows:
  ps = [r.payload.params for r in reqs]
  return SamplingRows(
      np.array([p.temperature for p in ps], np.float32),
      np.array([p.top_k for p in ps], np.int32),
      np.array([p.top_p for p in ps], np.float32),
      np.array([p.seed for p in ps], np.int32),
      np.array(token_index, np.int32))


def _groups(items, size):
  return [items[i:i + size] for i in range(0, len(items), size)]


@dataclasses.dataclass
class Launched:
  step: Step
  started: float
  prefill_outs: list  # (chunks, device tokens)
  decode_outs: list  # (requests, device tokens)

  def ready(self) -> bool:
    return all(out.is_ready() for _, out in self.prefill_outs + self.decode_outs)

  def wait(self) -> None:
    for _, out in self.prefill_outs + self.decode_outs:
      out.block_until_ready()


class StepRunner:
  """One scheduler driving one instance's programs, one step in flight at a time."""

  def __init__(self, name: str, runner: InstanceRunner, scheduler, clock):
    self.name, self.runner, self.scheduler, self.clock = name, runner, scheduler, clock
    self.inflight: Optional[Launched] = None

  @property
  def allocator(self):
    return self.scheduler.allocator

  def launch(self, step: Step) -> Launched:
    runner, pages = self.runner, self.allocator.pages
    prefill_outs, decode_outs = [], []
    for group in _groups(step.prefills, runner.shape.max_prefill_batch):
      reqs = [c.request for c in group]
      out = runner.prefill([r.payload.prompt[c.start:c.end] for r, c in zip(reqs, group)],
                           [c.start for c in group], [pages(r) for r in reqs],
                           _sampling_rows(reqs, [0] * len(reqs)))
      prefill_outs.append((group, out))
    for group in _groups(step.decodes, runner.shape.max_decode_batch):
      out = runner.decode([r.payload.tokens[-1] for r in group], [r.kv_len for r in group],
                          [pages(r) for r in group],
                          _sampling_rows(group, [r.num_output for r in group]))
      decode_outs.append((group, out))
    self.inflight = Launched(step, self.clock(), prefill_outs, decode_outs)
    return self.inflight

  def try_launch(self) -> bool:
    if self.inflight is not None:
      return False
    step = self.scheduler.schedule()
    if step is None:
      return False
    self.launch(step)
    return True

  def poll(self, block: bool = False) -> Optional[List[Request]]:
    """Finishes the in-flight step if its results are ready (or `block`); returns
    the requests it completed, or None when nothing finished."""
    launched = self.inflight
    if launched is None or not (block or launched.ready()):
      return None
    launched.wait()
    now = self.clock()
    for group, out in launched.prefill_outs:
      toks = np.asarray(out)
      for i, c in enumerate(group):
        if c.last:
          _take(c.request, int(toks[i]))
    for group, out in launched.decode_outs:
      toks = np.asarray(out)
      for i, r in enumerate(group):
        _take(r, int(toks[i]))
    self.inflight = None
    self.last_step_seconds = now - launched.started
    return self.scheduler.complete(launched.step, now)


def _take(req: Request, token: int) -> None:
  job = req.payload
  job.emit(token)
  if token in job.params.stop_token_ids:
    req.stopped = True


def wall_clock(epoch: float):
  return lambda: time.perf_counter() - epoch
