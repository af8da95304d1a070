"""The JAX executor: carries out scheduler steps with the real jitted programs.

A `StepRunner` binds one scheduler to one `InstanceRunner` and keeps at most one
step in flight. Launching a step only dispatches programs (JAX runs them
asynchronously), so the engine loop can launch work on every mesh before waiting
on any; `poll` turns finished device results into tokens, marks stop tokens, and
hands the step back to the scheduler with the wall-clock time it was seen done.

Each `StepRunner` has a `Watcher`, a thread that blocks until its step's results
are ready and then rings the engine's doorbell, so the one engine thread can sleep
until any instance (or KV copy) finishes instead of waiting on one of them while
another has finished.

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

import jax
import numpy as np

from pdserve_jax.runtime.buckets import groups
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


class Watcher:
  """A daemon thread that waits for device arrays, in the order given, and calls
  `ring()` as each set is ready."""

  def __init__(self, ring, name: str):
    self._queue: "queue.SimpleQueue" = queue.SimpleQueue()
    self._ring = ring
    threading.Thread(target=self._run, name=name, daemon=True).start()

  def watch(self, arrays) -> None:
    self._queue.put(arrays)

  def close(self) -> None:
    self._queue.put(None)

  def _run(self) -> None:
    while (arrays := self._queue.get()) is not None:
      try:
        jax.block_until_ready(arrays)
      except Exception:  # noqa: BLE001 - the engine thread meets the error when it reads
        pass
      self._ring()


@dataclasses.dataclass(frozen=True)
class StepRecord:
  """One finished step as it ran: which instance, when (engine clock, seconds; the
  end is when the engine saw it done), and the shape bucket of each program call,
  (batch, chunk length, table width) for prefill and (batch, table width) for
  decode."""
  instance: str
  started: float
  finished: float
  prefill_calls: tuple
  decode_calls: tuple


@dataclasses.dataclass
class Launched:
  step: Step
  started: float
  prefill_outs: list  # (chunks, device tokens)
  decode_outs: list  # (requests, device tokens)
  calls: tuple = ((), ())  # program shapes, when the runner keeps a log

  def ready(self) -> bool:
    return all(out.is_ready() for _, out in self.prefill_outs + self.decode_outs)

  def wait(self) -> None:
    for _, out in self.prefill_outs + self.decode_outs:
      out.block_until_ready()


class StepRunner:
  """One scheduler driving one instance's programs, one step in flight at a time."""

  def __init__(self, name: str, runner: InstanceRunner, scheduler, clock,
               watcher: Optional[Watcher] = None):
    self.name, self.runner, self.scheduler, self.clock = name, runner, scheduler, clock
    self.watcher = watcher
    self.inflight: Optional[Launched] = None
    self.log: Optional[List[StepRecord]] = None  # a list to append records to, if any

  @property
  def allocator(self):
    return self.scheduler.allocator

  def launch(self, step: Step) -> Launched:
    runner, pages = self.runner, self.allocator.pages
    started = self.clock()  # the host's share of a step counts: it is serving time too
    shape, logging = runner.shape, self.log is not None
    prefill_outs, decode_outs, prefill_calls, decode_calls = [], [], [], []
    for group in groups(step.prefills, shape.max_prefill_batch):
      reqs = [c.request for c in group]
      tables = [pages(r) for r in reqs]
      out = runner.prefill([r.payload.prompt[c.start:c.end] for r, c in zip(reqs, group)],
                           [c.start for c in group], tables,
                           _sampling_rows(reqs, [0] * len(reqs)))
      prefill_outs.append((group, out))
      if logging:
        prefill_calls.append(shape.prefill_shape([c.end - c.start for c in group],
                                                 [len(t) for t in tables]))
    for group in groups(step.decodes, shape.max_decode_batch):
      tables = [pages(r) for r in group]
      out = runner.decode([r.payload.tokens[-1] for r in group], [r.kv_len for r in group],
                          tables, _sampling_rows(group, [r.num_output for r in group]))
      decode_outs.append((group, out))
      if logging:
        decode_calls.append(shape.decode_shape([len(t) for t in tables]))
    self.inflight = Launched(step, started, prefill_outs, decode_outs,
                             (tuple(prefill_calls), tuple(decode_calls)))
    if self.watcher is not None:
      self.watcher.watch([out for _, out in prefill_outs + decode_outs])
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
    if self.log is not None:
      self.log.append(StepRecord(self.name, launched.started, now, *launched.calls))
    return self.scheduler.complete(launched.step, now)


def _take(req: Request, token: int) -> None:
  job = req.payload
  job.emit(token)
  if token in job.params.stop_token_ids:
    req.stopped = True


def wall_clock(epoch: float):
  return lambda: time.perf_counter() - epoch
