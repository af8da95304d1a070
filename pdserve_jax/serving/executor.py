"""The JAX executor: carries out a coordinator's steps and KV copies with jitted
programs, on the wall clock, through runners that hold the devices.

A `Runner` is one instance's programs, pool and KV movers: `serving.local` runs them
on this process's devices, `cluster.router` in a worker process over a socket. The
executor is the same for both (composition, not subclasses): it turns a `Step` into
program rows (prefill slices of prompt + output tokens, positions, page tables,
sampling rows), dispatches them, and turns sampled tokens back into request state:
stop tokens mark `req.stopped`, and a row whose logits were not finite cancels its
request with an error instead of producing a token.

A step that streams KV (`Step.streams`, layer-wise transfer) passes each stream to
the packed call that holds its request's row: the runner moves the request's pages
of each layer group to the destination runner as soon as the group's program is
dispatched, and reports when the last group landed, as a whole copy does.

Launching only dispatches (programs run asynchronously; a remote call is in flight
on a socket). When every call of a step is ready, the runner's callback posts a
`StepDone` to the engine's inbox; the engine thread then calls `collect` and the
coordinator. A launch that raises posts `StepFailed` instead, so every step ends
through the inbox. Request payloads are `serving.output.RequestOutput`s.

No jax here: the router process runs this module and never loads a device API.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import threading
import time
from typing import Callable, Dict, List, Optional, Protocol, Sequence, Tuple

import numpy as np
import tqdm

from pdserve_jax.core import seam
from pdserve_jax.core.coordinator import Coordinator, Instance
from pdserve_jax.core.deploy import InstanceSpec
from pdserve_jax.core.pages import PageAllocator
from pdserve_jax.core.request import Request
from pdserve_jax.core.step import PrefillChunk, Step
from pdserve_jax.runtime import buckets as bk
from pdserve_jax.runtime.buckets import RunnerShape, groups
from pdserve_jax.runtime.rows import PromptLogprobs, Sampled, SamplingRows
from pdserve_jax.serving.config import EngineConfig, runner_shape

SCRATCH_PAGE = 0  # page 0 of every pool: padded slots write there (`kv.pool`)


class Pending(Protocol):
  """One program call in flight."""

  def on_ready(self, callback: Callable[[], None]) -> None:
    """Calls `callback()` (on another thread) once the call finished or failed."""
    ...

  def result(self) -> Sampled:
    """The call's sampled rows on the host; raises if the call failed."""
    ...


@dataclasses.dataclass(frozen=True)
class KvStream:
  """A request's KV leaving with the packed call that computes it: pages
  `src_pages` of the caller's pool go to `dst`'s pages `dst_pages` layer group by
  layer group; `done(None)` once every group landed, `done(error)` if one failed."""
  dst: "Runner"
  src_pages: np.ndarray
  dst_pages: np.ndarray
  done: Callable[[Optional[BaseException]], None]


class Runner(Protocol):
  """One instance's devices: its programs, its KV pool, its KV movers."""
  shape: RunnerShape

  def packed(self, chunks: Sequence[Sequence[int]], starts: Sequence[int],
             tables: Sequence[Sequence[int]], sampling: SamplingRows,
             streams: Sequence[KvStream] = ()) -> Pending:
    """A packed call; each of `streams` moves as the call's layer groups are written.
    If it raises, no stream's `done` is ever called."""
    ...

  def decode(self, tokens: Sequence[int], positions: Sequence[int],
             tables: Sequence[Sequence[int]], sampling: SamplingRows) -> Pending: ...

  def num_programs(self, packed: bool, decode: bool) -> int:
    """Programs `warmup(packed, decode, ...)` compiles."""
    ...

  def warmup(self, packed: bool, decode: bool, copy_pages: Sequence[int],
             progress: Callable[[], None]) -> None:
    """Compiles the programs (calling `progress()` after each) and the KV movers for
    transfers of each of `copy_pages` pages."""
    ...

  def warm_copies(self, dst: "Runner", copy_pages: Sequence[int]) -> None:
    """Compiles what a copy to `dst` runs beyond each side's own movers."""
    ...

  def copy_to(self, dst: "Runner", src_pages: np.ndarray, dst_pages: np.ndarray,
              done: Callable[[Optional[BaseException]], None]) -> None:
    """Copies pages `src_pages` of this pool into `dst`'s pages `dst_pages`; calls
    `done(None)` once they landed, `done(error)` if they cannot. The source pages may
    be reused once `done` was called."""
    ...

  def pools_lost(self) -> bool: ...

  def reset_pools(self) -> None: ...

  # A runner whose devices may come back after `lost` (a restarted worker process)
  # has an `on_back` attribute; the executor sets it to a callback to call then.

  def prompt_logprobs(self, tokens: Sequence[int]) -> PromptLogprobs:
    """Each token's log-probability given those before it (`runtime.scoring`): a
    forward pass beside the steps, touching no pool; blocks until done."""
    ...


class Placement(Protocol):
  """Where instances' runners come from: this process's devices, or worker processes."""

  #: Devices instances may use, or None when unknown here (other processes).
  device_count: Optional[int]

  def open(self, group: str, spec: InstanceSpec, shape: RunnerShape,
           lost: Callable[[BaseException], None]) -> Runner:
    """The runner of device group `group` (its first instance); `lost(error)` is
    called if its devices go away for good."""
    ...

  def sibling(self, runner: Runner, shape: RunnerShape) -> Runner:
    """Another instance on `runner`'s devices and weights, with a pool of its own
    (a pipeline's virtual engines)."""
    ...

  def close(self) -> None: ...


@dataclasses.dataclass
class _Launched:
  step: Step
  started: float
  # (rows, pending call): a row is a PrefillChunk or a decoding Request
  calls: List[Tuple[list, Pending]]
  shapes: Tuple[tuple, tuple] = ((), ())  # program shapes, when the engine keeps a log


def _sampling_rows(reqs: List[Request]) -> SamplingRows:
  ps = [r.payload.params for r in reqs]
  return SamplingRows(
      np.array([p.temperature for p in ps], np.float32),
      np.array([p.top_k for p in ps], np.int32),
      np.array([p.top_p for p in ps], np.float32),
      np.array([p.seed for p in ps], np.int32),
      np.array([r.num_output for r in reqs], np.int32))


class JaxExecutor:
  """The `seam.EngineExecutor` over runners (see the module docstring)."""

  def __init__(self, placement: Placement, cfg: EngineConfig, clock: Callable[[], float],
               post: seam.Post):
    """`post(event)` puts an event in the engine's inbox."""
    self.placement, self.cfg, self.clock, self._post = placement, cfg, clock, post
    self.device_count = placement.device_count
    # Per device group: one runner, or a pipeline's virtual engines.
    self._group_runners: Dict[str, List[Runner]] = {}
    self._runner: Dict[str, Runner] = {}  # instance name -> its runner
    self._instances: List[Instance] = []
    self._coord: Optional[Coordinator] = None
    self._inflight: Dict[str, _Launched] = {}
    self.log: Optional[List[seam.StepRecord]] = None
    self.page_buckets = bk.powers_of_two(1, cfg.max_seq_len // cfg.page_size)

  # -- building --------------------------------------------------------------------

  def allocator(self, group: str, spec: InstanceSpec, fraction: float) -> PageAllocator:
    """A pool of `fraction` of `num_pages` on `group`'s devices (tp x pp of them, one
    tp mesh per pipeline stage). A pipeline's pp virtual engines share its weights and
    programs, each with its own pool."""
    num_pages = round(self.cfg.num_pages * fraction)
    if num_pages < 2:
      raise ValueError(f"{group}: {fraction:.3g} of {self.cfg.num_pages} pages leaves "
                       f"{num_pages}; a pool needs 2 (page 0 is scratch)")
    shape = runner_shape(self.cfg, spec, num_pages)
    runners = self._group_runners.get(group)
    if runners:
      runners.append(self.placement.sibling(runners[0], shape))
    else:
      runner = self.placement.open(group, spec, shape, functools.partial(self._lost, group))
      if hasattr(runner, "on_back"):  # a worker process that may restart (`cluster`)
        runner.on_back = functools.partial(self._back, group)  # type: ignore[attr-defined]
      self._group_runners[group] = [runner]
    return PageAllocator(num_pages, self.cfg.page_size, reserved=1,
                         prefix_cache=self.cfg.prefix_cache)

  def bind(self, coordinator: Coordinator) -> None:
    """The i-th instance of a group runs on its i-th runner (semi-PD's two phases
    share the one)."""
    self._coord = coordinator
    self._instances = list(coordinator.instances)
    seen: Dict[str, int] = {}
    for inst in self._instances:
      runners, i = self._group_runners[inst.group], seen.get(inst.group, 0)
      self._runner[inst.name] = runners[i % len(runners)]
      seen[inst.group] = i + 1

  def runner(self, inst: Instance) -> Runner:
    """The runner `inst` runs on."""
    return self._runner[inst.name]

  def _lost(self, group: str, error: BaseException) -> None:
    for inst in self._instances:
      if inst.group == group:
        self._post(seam.InstanceLost(inst, error))

  def _back(self, group: str) -> None:
    for inst in self._instances:
      if inst.group == group:
        self._post(seam.InstanceBack(inst))

  def drop_step(self, inst: Instance) -> None:
    """`inst`'s devices are gone: its step in flight is forgotten (no result comes)."""
    self._inflight.pop(inst.name, None)

  def warmup(self) -> None:
    """Compiles every bucket of every program the instances use, and every KV copy
    the coordinator may start; logs each phase and shows a progress bar on a
    terminal."""
    start = time.perf_counter()
    plan = self._programs()
    pairs = self._coord.copy_pairs() if self._coord is not None else []
    copying = {g for pair in pairs for g in pair}
    total = 0
    for group, (runner, *_) in self._group_runners.items():
      n_packed = runner.num_programs(plan[group][0], False)
      n_decode = runner.num_programs(False, plan[group][1])
      total += n_packed + n_decode
      logging.info("warm-up %s: %d packed and %d decode programs", group, n_packed, n_decode)
    with tqdm.tqdm(total=total, desc="warm-up", unit="program", disable=None,
                   leave=False) as bar:
      for group, (runner, *_) in self._group_runners.items():
        runner.warmup(*plan[group], self.page_buckets if group in copying else (),
                      lambda: bar.update(1))
    if pairs:
      logging.info("warm-up: KV copies of %d sizes between %d group pairs",
                   len(self.page_buckets), len(pairs))
    for src, dst in pairs:
      self._group_runners[src][0].warm_copies(self._group_runners[dst][0], self.page_buckets)
    logging.info("warm-up done: %d programs in %.1f s", total, time.perf_counter() - start)

  def _programs(self) -> Dict[str, Tuple[bool, bool]]:
    """Per device group: whether its instances run packed calls (any prefill) and
    decode calls (any decode). A decode instance that prefills prompts itself
    (conditional disaggregation) runs both."""
    roles: Dict[str, set] = {}
    for inst in self._instances:
      local = getattr(inst.sched, "local_prefill", False)
      roles.setdefault(inst.group, set()).add(None if local else inst.phase)
    return {g: (r != {"decode"}, r != {"prefill"}) for g, r in roles.items()}

  def program_counts(self) -> Dict[str, int]:
    """Per device group, the programs `warmup` compiles."""
    plan = self._programs()
    return {g: rs[0].num_programs(*plan[g]) for g, rs in self._group_runners.items()}

  def close(self) -> None:
    self.placement.close()

  def prompt_logprobs(self, tokens: Sequence[int]) -> PromptLogprobs:
    """`tokens`' prompt log-probabilities on the first live instance that prefills
    (any thread may call this: it reads no scheduler state but the lost marks)."""
    for inst in self._instances:
      if inst.phase != "decode" and not inst.lost:
        return self._runner[inst.name].prompt_logprobs(tokens)
    raise RuntimeError("no instance that prefills is left to compute prompt logprobs")

  # -- the seam ---------------------------------------------------------------------

  def can_launch(self, inst: Instance, now: float) -> bool:
    return True  # the coordinator keeps one step in flight per instance

  def launch(self, inst: Instance, step: Step, now: float) -> None:
    taken: set = set()  # requests whose KV stream a call took
    try:
      launched = self._dispatch(inst, step, taken)
    except Exception as e:  # noqa: BLE001 - the step's requests fail, the rest go on
      self._post(seam.StepFailed(inst, e))
      for req, dst in step.streams:  # streams no call took never start: they fail
        if req not in taken:
          self._copied(req, inst, dst)(e)
      return
    self._inflight[inst.name] = launched
    left, lock = [len(launched.calls)], threading.Lock()

    def ready():
      with lock:
        left[0] -= 1
        last = left[0] == 0
      if last:
        self._post(seam.StepDone(inst))

    for _, pending in launched.calls:
      pending.on_ready(ready)

  def _dispatch(self, inst: Instance, step: Step, taken: set) -> _Launched:
    """Dispatches `step`'s calls; adds to `taken` each request whose KV stream a call
    took (its `done` is the runner's to call)."""
    runner, pages = self._runner[inst.name], inst.sched.allocator.pages
    streams = {}
    for req, dst in step.streams:
      stream = self._stream(req, inst, dst)
      if stream is None:  # nothing to move: it has landed (the coordinator waits for the step)
        taken.add(req)
        self._copied(req, inst, dst)(None)
      else:
        streams[req] = stream
    started = self.clock()  # the host's share of a step counts: it is serving time too
    shape, calls = runner.shape, []
    if step.prefills:
      # Prompt chunks and decodes as rows of packed calls; a decode is a one-token row.
      rows = list(step.prefills) + list(step.decodes)
      for lo, hi in shape.packed_groups([_row_tokens(r) for r in rows]):
        group = rows[lo:hi]
        reqs = [_request(r) for r in group]
        mine = [streams[r] for r in reqs if r in streams]
        calls.append((group, runner.packed(
            [_row_input(r) for r in group],
            [r.start if isinstance(r, PrefillChunk) else r.kv_len for r in group],
            [pages(r) for r in reqs], _sampling_rows(reqs), mine)))
        taken.update(r for r in reqs if r in streams)
    else:
      for group in groups(step.decodes, shape.max_rows):
        calls.append((group, runner.decode(
            [r.payload.tokens[-1] for r in group], [r.kv_len for r in group],
            [pages(r) for r in group], _sampling_rows(group))))
    shapes: Tuple[tuple, tuple] = ((), ())
    if self.log is not None:  # only the step log needs the call shapes
      shapes = shape.step_calls([c.num_tokens for c in step.prefills], len(step.decodes))
    return _Launched(step, started, calls, shapes)

  def collect(self, inst: Instance) -> Tuple[float, float]:
    """Reads a finished step's tokens into its requests; returns when it was seen
    done and its seconds. Raises if the step's programs failed."""
    launched = self._inflight.pop(inst.name)
    now = self.clock()
    for group, pending in launched.calls:
      out = pending.result()
      for i, row in enumerate(group):
        if not isinstance(row, PrefillChunk):
          _take(row, out, i)
        elif row.last:
          _take(row.request, out, i)
    if self.log is not None:
      packed, decode = launched.shapes
      self.log.append(seam.StepRecord(inst.name, launched.started, now, packed, decode,
                                      launched.step.describe()))
    return now, now - launched.started

  def fail_step(self, inst: Instance, error: BaseException) -> None:
    """The step of `inst` could not run or be read: its requests carry the error."""
    self._inflight.pop(inst.name, None)
    for r in (inst.step.requests if inst.step is not None else ()):
      r.payload.error = r.payload.error or RuntimeError(
          f"step on {inst.name} failed: {error!r}")

  def recover_pool(self, inst: Instance) -> List[Request]:
    """After `inst`'s step failed: if its pool was lost with it, a fresh one takes
    its place; returns the requests whose KV was in it (empty if none was lost)."""
    runner = self._runner[inst.name]
    if not runner.pools_lost():
      return []
    runner.reset_pools()
    held: Dict[Request, None] = {}
    for other in self._instances:
      if self._runner[other.name] is runner:
        other.sched.allocator.forget()  # the cached KV went with the pool
        held.update(dict.fromkeys(other.sched.allocator.owners()))
    for r in held:
      r.payload.error = r.payload.error or RuntimeError(
          f"the KV pool of {inst.group} was lost when a step failed")
    return list(held)

  def _copied(self, req: Request, src: Instance, dst: Instance
              ) -> Callable[[Optional[BaseException]], None]:
    """The callback that reports `req`'s KV copy to the engine (once)."""
    def done(error: Optional[BaseException]) -> None:
      if error is not None:
        error = RuntimeError(f"KV copy {src.name} -> {dst.name} failed: {error}")
      self._post(seam.CopyDone(req, error))
    return done

  def _pages(self, req: Request, src: Instance, dst: Instance
             ) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    """`req`'s pages on `src` to move and as many of its pages on `dst`, padded to a
    transfer bucket with the scratch page; None when there is nothing to move. The
    first `skip` pages are in place already: the decode side's prefix cache holds
    them (whole copies, streams and migrations alike)."""
    skip = dst.sched.copy_skip(req)
    src_pages = src.sched.allocator.pages(req)[skip:]
    if not src_pages:
      return None
    n = bk.bucket(len(src_pages), self.page_buckets, "pages per transfer")
    pad = [SCRATCH_PAGE] * (n - len(src_pages))
    dst_pages = dst.sched.allocator.pages(req)[skip:skip + len(src_pages)]
    return np.array(src_pages + pad), np.array(dst_pages + pad)

  def _stream(self, req: Request, src: Instance, dst: Instance) -> Optional[KvStream]:
    """`req`'s KV stream, or None when the decode side's cache holds all of it."""
    pages = self._pages(req, src, dst)
    if pages is None:
      return None
    return KvStream(self._runner[dst.name], *pages, self._copied(req, src, dst))

  def start_copy(self, req: Request, src: Instance, dst: Instance, now: float) -> None:
    done = self._copied(req, src, dst)
    try:
      pages = self._pages(req, src, dst)
      if pages is None:
        done(None)  # the decode side's cache holds all of it
        return
      self._runner[src.name].copy_to(self._runner[dst.name], *pages, done)
    except Exception as e:  # noqa: BLE001 - this request fails; its pages come back
      done(e)


def _request(row) -> Request:
  return row.request if isinstance(row, PrefillChunk) else row


def _row_tokens(row) -> int:
  return row.num_tokens if isinstance(row, PrefillChunk) else 1


def _row_input(row) -> List[int]:
  """A chunk's tokens (its prompt's, or output tokens to recompute after a
  preemption), or a decode's last token."""
  if not isinstance(row, PrefillChunk):
    return row.payload.tokens[-1:]
  out, n = row.request.payload, len(row.request.payload.prompt)
  if row.end <= n:
    return out.prompt[row.start:row.end]
  return (out.prompt + out.tokens)[row.start:row.end]


def _take(req: Request, out: Sampled, row: int) -> None:
  """Row `row` of a program call's `Sampled` output (host arrays) into `req`."""
  if req.end_reason is not None:
    return  # cancelled while its step ran: nothing more is emitted
  output, token = req.payload, int(out.tokens[row])
  if token < 0:
    output.error = FloatingPointError(
        f"request {req.request_id}: the model's logits were not finite at output token "
        f"{req.num_output}")
    req.end_reason = "error"
    return
  if output.emit(token, float(out.logprobs[row]), (out.top_ids[row], out.top_logprobs[row])):
    req.stopped = True


def wall_clock(epoch: float) -> Callable[[], float]:
  return lambda: time.perf_counter() - epoch
