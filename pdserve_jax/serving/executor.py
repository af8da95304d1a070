"""The JAX executor: carries out a coordinator's steps and KV copies with the real
jitted programs on real meshes, on the wall clock.

It builds one `InstanceRunner` (mesh, weights, page pool, programs) per device
group the coordinator asks an allocator for, translates a `Step` into program
rows (prefill slices of prompt + output tokens, positions, page tables, sampling
rows), and turns sampled tokens back into request state: stop tokens mark
`req.stopped`, and a row whose logits were not finite cancels its request with an
error instead of producing a token.

Launching only dispatches programs (JAX runs them asynchronously). A `Watcher`
thread per group (and one per destination pool for copies) blocks until results
are ready and posts an event to the engine's inbox; the engine thread then calls
`collect` and the coordinator. A launch that raises posts a failure event instead,
so every step ends through the inbox. Request payloads are `Job`s.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from typing import Callable, Dict, List, Optional, Tuple, Union

import jax
import numpy as np
import tqdm

from pdserve_jax.kv.allocator import PageAllocator
from pdserve_jax.kv.pool import SCRATCH_PAGE, transfer_pages
from pdserve_jax.model import sharding
from pdserve_jax.runtime import buckets as bk
from pdserve_jax.runtime.buckets import groups
from pdserve_jax.runtime.programs import InstanceRunner, RunnerShape, SamplingRows
from pdserve_jax.serving.params import SamplingParams
from pdserve_jax.serving.request import Request
from pdserve_jax.serving.step import Step

STEP, FAILED, COPY = "step", "failed", "copy"  # inbox event kinds


@dataclasses.dataclass(eq=False)
class Job:
  """Executor-side data of one request (the `Request.payload`)."""
  prompt: List[int]
  params: SamplingParams
  tokens: List[int] = dataclasses.field(default_factory=list)
  stream: "queue.Queue" = dataclasses.field(default_factory=queue.Queue)
  finished: threading.Event = dataclasses.field(default_factory=threading.Event)
  error: Optional[BaseException] = None
  stop_ids: frozenset = frozenset()
  stop_strings: Tuple[str, ...] = ()
  detokenize: Optional[Callable[[List[int]], str]] = None  # needed with stop strings
  logprobs: List[float] = dataclasses.field(default_factory=list)  # when asked for
  top_logprobs: List[Dict[int, float]] = dataclasses.field(default_factory=list)
  stop_reason: Union[int, str, None] = None  # the id or string that ended the output
  text_end: Optional[int] = None  # where a stop string cut the text

  def emit(self, token: int, logprob: float = 0.0, top=None) -> bool:
    """Records and streams `token`; returns whether it ends the output."""
    self.tokens.append(token)
    k = self.params.logprobs
    if k is not None:
      self.logprobs.append(logprob)
      if k:
        ids, lps = top
        self.top_logprobs.append({int(i): float(v) for i, v in zip(ids[:k], lps[:k])})
    self.stream.put(token)
    if token in self.stop_ids:
      self.stop_reason = token
      return True
    if self.stop_strings:
      # Whole-text search: a stop string may straddle tokens, or a multi-byte
      # character may only now decode.
      text = self.detokenize(self.tokens)
      hits = [(i, s) for s in self.stop_strings if (i := text.find(s)) >= 0]
      if hits:
        self.text_end, self.stop_reason = min(hits)
        return True
    return False

  def text(self) -> Optional[str]:
    """The output as text (cut before a stop string), or None without a tokenizer."""
    if self.detokenize is None:
      return None
    return self.detokenize(self.tokens)[:self.text_end]

  def end(self, error: Optional[BaseException] = None) -> None:
    """Idempotent: the first end wins."""
    if self.finished.is_set():
      return
    if error is not None and self.error is None:
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
  `ring(tag)` as each set is ready (or has failed: the reader meets the error)."""

  def __init__(self, ring, name: str):
    self._queue: "queue.SimpleQueue" = queue.SimpleQueue()
    self._ring = ring
    threading.Thread(target=self._run, name=name, daemon=True).start()

  def watch(self, arrays, tag) -> None:
    self._queue.put((arrays, tag))

  def close(self) -> None:
    self._queue.put(None)

  def _run(self) -> None:
    while (item := self._queue.get()) is not None:
      arrays, tag = item
      try:
        jax.block_until_ready(arrays)
      except Exception:  # noqa: BLE001 - `collect` meets the error when it reads
        pass
      self._ring(tag)


@dataclasses.dataclass(frozen=True)
class StepRecord:
  """One finished step as it ran: which instance, when (engine clock, seconds; the
  end is when the engine saw it done), the shape bucket of each program call,
  (batch, chunk length, table width) for prefill and (batch, table width) for
  decode, and what it computed (`Step.describe`)."""
  instance: str
  started: float
  finished: float
  prefill_calls: tuple
  decode_calls: tuple
  work: tuple = ((), ())


@dataclasses.dataclass
class Launched:
  step: Step
  started: float
  prefill_outs: list  # (chunks, device tokens)
  decode_outs: list  # (requests, device tokens)
  calls: tuple = ((), ())  # program shapes, when the engine keeps a log


def runner_shape(cfg, spec, chunked: bool) -> RunnerShape:
  """The buckets of an instance: chunked prefill bounds a chunk by the step's token
  budget; otherwise one prefill row may carry a recomputation up to `max_seq_len`."""
  longest = min(spec.max_tokens, cfg.max_seq_len) if chunked else cfg.max_seq_len
  return RunnerShape(page_size=cfg.page_size, num_pages=cfg.num_pages,
                     max_decode_batch=spec.max_batch, max_prefill_batch=cfg.max_prefill_batch,
                     max_prefill_len=longest, max_seq_len=cfg.max_seq_len,
                     min_prefill_len=cfg.min_prefill_bucket,
                     min_table_width=cfg.min_pages_bucket)


class JaxExecutor:
  """The executor seam (see `serving.coordinator`) over real programs."""

  def __init__(self, model, cfg, chunked: bool, clock: Callable[[], float],
               post: Callable[[tuple], None], ended: Callable[[Request, float], None]):
    """`post(event)` puts an event in the engine's inbox; `ended(req, now)` is the
    engine's word that a request ended (the seam's `ended`)."""
    self.model, self.cfg, self.chunked, self.clock, self._post = model, cfg, chunked, clock, post
    self.ended = ended
    self.runners: dict[str, InstanceRunner] = {}
    self.roles: dict[str, set] = {}
    self.watchers: dict[str, Watcher] = {}
    self._copy_watchers: dict[str, Watcher] = {}
    self._devices = list(jax.devices())
    self._inflight: dict[str, Launched] = {}
    self.log: Optional[List[StepRecord]] = None  # a list to append records to, if any
    self.page_buckets = bk.powers_of_two(1, cfg.max_seq_len // cfg.page_size)

  # -- building --------------------------------------------------------------------

  def allocator(self, group: str, spec, fraction: float) -> PageAllocator:
    if fraction != 1.0:
      raise ValueError("pipeline stages are not implemented by the engine")
    n = spec.tp
    if len(self._devices) < n:
      raise ValueError(f"{group} needs {n} devices; only {len(self._devices)} are left")
    mesh = sharding.split_devices([n], self._devices[:n])[0]
    self._devices = self._devices[n:]
    self.runners[group] = InstanceRunner(self.model, mesh,
                                         runner_shape(self.cfg, spec, self.chunked),
                                         self.cfg.attn_impl)
    self.watchers[group] = Watcher(lambda inst: self._post((STEP, inst)),
                                   f"pdserve-watch-{group}")
    return PageAllocator(self.cfg.num_pages, self.cfg.page_size, reserved=1)

  def bind(self, instances) -> None:
    self._bound = list(instances)
    for inst in instances:
      inst.handle = self.runners[inst.group]
      self.roles.setdefault(inst.group, set()).add(inst.phase)

  def warmup(self, pairs) -> None:
    """Compiles every bucket of every program the instances use, and every KV copy
    between the `pairs` of (source, destination) groups; logs each phase and shows
    a progress bar on a terminal."""
    start = time.perf_counter()
    plan, total = {}, 0
    for group, runner in self.runners.items():
      roles = self.roles[group]
      prefill, decode = roles != {"decode"}, roles != {"prefill"}
      plan[group] = (prefill, decode)
      n_prefill = len(runner.shape.compiled_prefill_shapes()) if prefill else 0
      n_decode = len(runner.shape.compiled_decode_shapes()) if decode else 0
      total += n_prefill + n_decode
      logging.info("warm-up %s: %d prefill and %d decode programs", group, n_prefill,
                   n_decode)
    with tqdm.tqdm(total=total, desc="warm-up", unit="program", disable=None,
                   leave=False) as bar:
      for group, runner in self.runners.items():
        runner.warmup(*plan[group], progress=lambda: bar.update(1))
    if pairs:
      logging.info("warm-up: KV copies of %d sizes between %d group pairs",
                   len(self.page_buckets), len(pairs))
    for src, dst in pairs:
      for n in self.page_buckets:
        scratch = np.full(n, SCRATCH_PAGE)
        transfer_pages(self.runners[src].pool, scratch, self.runners[dst].pool, scratch)
    jax.block_until_ready([r.pool.arrays for r in self.runners.values()])
    logging.info("warm-up done: %d programs in %.1f s", total, time.perf_counter() - start)

  def close(self) -> None:
    for w in list(self.watchers.values()) + list(self._copy_watchers.values()):
      w.close()

  # -- the seam ---------------------------------------------------------------------

  def can_launch(self, inst, now) -> bool:
    return True  # the coordinator keeps one step in flight per instance

  def launch(self, inst, step: Step, now: float) -> None:
    try:
      launched = self._launch(inst, step)
    except Exception as e:  # noqa: BLE001 - the step's requests fail, the rest go on
      self._post((FAILED, inst, e))
      return
    self._inflight[inst.name] = launched
    self.watchers[inst.group].watch(
        [out for _, out in launched.prefill_outs + launched.decode_outs], inst)

  def _launch(self, inst, step: Step) -> Launched:
    runner, pages = inst.handle, inst.sched.allocator.pages
    started = self.clock()  # the host's share of a step counts: it is serving time too
    shape, logging = runner.shape, self.log is not None
    prefill_outs, decode_outs, prefill_calls, decode_calls = [], [], [], []
    for group in groups(step.prefills, shape.max_prefill_batch):
      reqs = [c.request for c in group]
      tables = [pages(r) for r in reqs]
      out = runner.prefill([_prefill_tokens(c) for c in group], [c.start for c in group],
                           tables, _sampling_rows(reqs, [r.num_output for r in reqs]))
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
    return Launched(step, started, prefill_outs, decode_outs,
                    (tuple(prefill_calls), tuple(decode_calls)))

  def collect(self, inst) -> tuple[float, float]:
    """Reads a finished step's tokens into its requests; returns when it was seen
    done and its seconds. Raises if the step's programs failed."""
    launched = self._inflight.pop(inst.name)
    now = self.clock()
    for group, out in launched.prefill_outs:
      out = jax.device_get(out)
      for i, c in enumerate(group):
        if c.last:
          _take(c.request, out, i)
    for group, out in launched.decode_outs:
      out = jax.device_get(out)
      for i, r in enumerate(group):
        _take(r, out, i)
    if self.log is not None:
      self.log.append(StepRecord(inst.name, launched.started, now, *launched.calls,
                                 launched.step.describe()))
    return now, now - launched.started

  def fail_step(self, inst, error: BaseException) -> None:
    """The step of `inst` could not run or be read: its requests carry the error."""
    self._inflight.pop(inst.name, None)
    for r in inst.step.requests:
      r.payload.error = r.payload.error or RuntimeError(
          f"step on {inst.name} failed: {error!r}")

  def recover_pool(self, inst) -> list:
    """After `inst`'s step failed: if its pool was lost with it, a fresh one takes
    its place; returns the requests whose KV was in it (empty if none was lost)."""
    runner = self.runners[inst.group]
    if not runner.pool.lost():
      return []
    runner.pool.reset()
    held = {}
    for other in self._instances_of(inst.group):
      for r in other.sched.allocator.owners():
        held[r] = None
    for r in held:
      r.payload.error = r.payload.error or RuntimeError(
          f"the KV pool of {inst.group} was lost when a step failed")
    return list(held)

  def _instances_of(self, group: str):
    return [i for i in self._bound if i.group == group]

  def start_copy(self, req: Request, src, dst, now: float) -> None:
    try:
      src_pages = src.sched.allocator.pages(req)
      n = bk.bucket(len(src_pages), self.page_buckets, "pages per transfer")
      pad = [SCRATCH_PAGE] * (n - len(src_pages))
      dst_pages = dst.sched.allocator.pages(req)[:len(src_pages)]
      moved = transfer_pages(src.handle.pool, np.array(src_pages + pad),
                             dst.handle.pool, np.array(dst_pages + pad))
    except Exception as e:  # noqa: BLE001 - this request fails; its pages come back
      req.payload.error = RuntimeError(f"KV copy {src.name} -> {dst.name} failed: {e!r}")
      req.end_reason = "error"
      self._post((COPY, req))
      return
    w = self._copy_watchers.get(dst.group)
    if w is None:
      w = self._copy_watchers[dst.group] = Watcher(lambda r: self._post((COPY, r)),
                                                   f"pdserve-copies-{dst.group}")
    w.watch(moved, req)


def _prefill_tokens(c) -> List[int]:
  job, n = c.request.payload, len(c.request.payload.prompt)
  if c.end <= n:
    return job.prompt[c.start:c.end]
  return (job.prompt + job.tokens)[c.start:c.end]  # recomputing output tokens


def _take(req: Request, out, row: int) -> None:
  """Row `row` of a program call's `Sampled` output (host arrays) into `req`."""
  if req.end_reason is not None:
    return  # cancelled while its step ran: nothing more is emitted
  job, token = req.payload, int(out.tokens[row])
  if token < 0:
    job.error = FloatingPointError(
        f"request {req.request_id}: the model's logits were not finite at output token "
        f"{req.num_output}")
    req.end_reason = "error"
    return
  if job.emit(token, float(out.logprobs[row]), (out.top_ids[row], out.top_logprobs[row])):
    req.stopped = True


def wall_clock(epoch: float):
  return lambda: time.perf_counter() - epoch
