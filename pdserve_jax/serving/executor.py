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
from pdserve_jax.serving.step import PrefillChunk, Step

STEP, FAILED, COPY, LOST = "step", "failed", "copy", "lost"  # inbox event kinds


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
  (tokens,) for packed calls and (batch,) for decode calls, and what it computed
  (`Step.describe`)."""
  instance: str
  started: float
  finished: float
  packed_calls: tuple
  decode_calls: tuple
  work: tuple = ((), ())


@dataclasses.dataclass
class Launched:
  step: Step
  started: float
  outs: list  # (rows, device tokens): a row is a PrefillChunk or a decoding Request
  calls: tuple = ((), ())  # program shapes, when the engine keeps a log


def runner_shape(cfg, spec, num_pages: int) -> RunnerShape:
  """The buckets of an instance: a packed call holds a step's whole token budget, or
  a prompt (a recomputation) of up to `max_seq_len` running alone; never more
  tokens than the pool holds, as each writes its K/V to a page."""
  pool_tokens = (num_pages - 1) * cfg.page_size
  return RunnerShape(page_size=cfg.page_size, num_pages=num_pages,
                     max_rows=spec.max_batch,
                     max_step_tokens=min(max(spec.max_tokens, cfg.max_seq_len), pool_tokens),
                     max_seq_len=cfg.max_seq_len, min_step_tokens=cfg.min_token_bucket)


class JaxExecutor:
  """The executor seam (see `serving.coordinator`) over real programs."""

  def __init__(self, model, cfg, clock: Callable[[], float],
               post: Callable[[tuple], None], ended: Callable[[Request, float], None]):
    """`post(event)` puts an event in the engine's inbox; `ended(req, now)` is the
    engine's word that a request ended (the seam's `ended`)."""
    self.model, self.cfg, self.clock, self._post = model, cfg, clock, post
    self.ended = ended
    # Per device group: one runner, or a pipeline's virtual engines (`sibling`s).
    self.runners: dict[str, List[InstanceRunner]] = {}
    self.roles: dict[str, set] = {}
    self.watchers: dict[str, Watcher] = {}
    self._copy_watchers: dict[str, Watcher] = {}
    self._devices = list(jax.devices())
    self._inflight: dict[str, Launched] = {}
    self.log: Optional[List[StepRecord]] = None  # a list to append records to, if any
    self.page_buckets = bk.powers_of_two(1, cfg.max_seq_len // cfg.page_size)

  # -- building --------------------------------------------------------------------

  def allocator(self, group: str, spec, fraction: float) -> PageAllocator:
    """A pool of `fraction` of `num_pages` on `group`'s devices: tp x pp of them, one
    tp mesh per pipeline stage. A pipeline's pp virtual engines (one call each) share
    its weights and programs, each with its own pool."""
    num_pages = round(self.cfg.num_pages * fraction)
    if num_pages < 2:
      raise ValueError(f"{group}: {fraction:.3g} of {self.cfg.num_pages} pages leaves "
                       f"{num_pages}; a pool needs 2 (page 0 is scratch)")
    if group in self.runners:
      self.runners[group].append(self.runners[group][0].sibling(num_pages))
    else:
      n = spec.tp * spec.pp
      if len(self._devices) < n:
        raise ValueError(f"{group} needs {n} devices; only {len(self._devices)} are left")
      meshes = sharding.split_devices([spec.tp] * spec.pp, self._devices[:n])
      self._devices = self._devices[n:]
      self.runners[group] = [InstanceRunner(self.model, meshes if spec.pp > 1 else meshes[0],
                                            runner_shape(self.cfg, spec, num_pages),
                                            self.cfg.attn_impl)]
      self.watchers[group] = Watcher(lambda inst: self._post((STEP, inst)),
                                     f"pdserve-watch-{group}")
    return PageAllocator(num_pages, self.cfg.page_size, reserved=1)

  def bind(self, instances) -> None:
    """The i-th instance of a group runs on its i-th runner (semi-PD's two phases
    share the one)."""
    self._bound = list(instances)
    seen: dict[str, int] = {}
    for inst in instances:
      runners, i = self.runners[inst.group], seen.get(inst.group, 0)
      inst.handle = runners[i % len(runners)]
      seen[inst.group] = i + 1
      self.roles.setdefault(inst.group, set()).add(inst.phase)

  def warmup(self, pairs) -> None:
    """Compiles every bucket of every program the instances use, and every KV copy
    between the `pairs` of (source, destination) groups; logs each phase and shows
    a progress bar on a terminal."""
    start = time.perf_counter()
    plan, total = {}, 0
    for group, (runner, *_) in self.runners.items():
      roles = self.roles[group]
      plan[group] = (roles != {"decode"}, roles != {"prefill"})  # (packed, decode)
      n_packed, n_decode = (len(runner.compiled_shapes(*p)) for p in
                            ((plan[group][0], False), (False, plan[group][1])))
      total += n_packed + n_decode
      logging.info("warm-up %s: %d packed and %d decode programs", group, n_packed,
                   n_decode)
    with tqdm.tqdm(total=total, desc="warm-up", unit="program", disable=None,
                   leave=False) as bar:
      for group, (runner, *_) in self.runners.items():
        runner.warmup(*plan[group], progress=lambda: bar.update(1))
    if pairs:
      logging.info("warm-up: KV copies of %d sizes between %d group pairs",
                   len(self.page_buckets), len(pairs))
    for src, dst in pairs:
      for n in self.page_buckets:
        scratch = np.full(n, SCRATCH_PAGE)
        transfer_pages(self.runners[src][0].pools, scratch, self.runners[dst][0].pools,
                       scratch)
    jax.block_until_ready([p.arrays for rs in self.runners.values() for r in rs
                           for p in r.pools])
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
    self._watch(inst, [out for _, out in launched.outs])

  def _watch(self, inst, outs) -> None:
    """Posts a STEP event once every output of `inst`'s step is ready."""
    self.watchers[inst.group].watch(outs, inst)

  def _launch(self, inst, step: Step) -> Launched:
    runner, pages = inst.handle, inst.sched.allocator.pages
    started = self.clock()  # the host's share of a step counts: it is serving time too
    shape, outs = runner.shape, []
    if step.prefills:
      # Prompt chunks and decodes as rows of packed calls; a decode is a one-token row.
      rows = list(step.prefills) + list(step.decodes)
      for lo, hi in shape.packed_groups([_row_tokens(r) for r in rows]):
        group = rows[lo:hi]
        reqs = [_request(r) for r in group]
        out = self._call(runner, "packed", [_row_input(r) for r in group],
                         [r.start if _is_chunk(r) else r.kv_len for r in group],
                         [pages(r) for r in reqs],
                         _sampling_rows(reqs, [r.num_output for r in reqs]))
        outs.append((group, out))
    else:
      for group in groups(step.decodes, shape.max_rows):
        out = self._call(runner, "decode", [r.payload.tokens[-1] for r in group],
                         [r.kv_len for r in group], [pages(r) for r in group],
                         _sampling_rows(group, [r.num_output for r in group]))
        outs.append((group, out))
    calls = ((), ())
    if self.log is not None:  # only the step log needs the call shapes
      calls = shape.step_calls([c.num_tokens for c in step.prefills], len(step.decodes))
    return Launched(step, started, outs, calls)

  def _call(self, runner, program: str, *args):
    """Dispatches one program call; returns its (device) outputs."""
    return getattr(runner, program)(*args)

  def _read(self, out):
    """A call's outputs on the host."""
    return jax.device_get(out)

  def collect(self, inst) -> tuple[float, float]:
    """Reads a finished step's tokens into its requests; returns when it was seen
    done and its seconds. Raises if the step's programs failed."""
    launched = self._inflight.pop(inst.name)
    now = self.clock()
    for group, out in launched.outs:
      out = self._read(out)
      for i, row in enumerate(group):
        if not _is_chunk(row):
          _take(row, out, i)
        elif row.last:
          _take(row.request, out, i)
    if self.log is not None:
      self.log.append(StepRecord(inst.name, launched.started, now, *launched.calls,
                                 launched.step.describe()))
    return now, now - launched.started

  def fail_step(self, inst, error: BaseException) -> None:
    """The step of `inst` could not run or be read: its requests carry the error."""
    self._inflight.pop(inst.name, None)
    for r in (inst.step.requests if inst.step is not None else ()):
      r.payload.error = r.payload.error or RuntimeError(
          f"step on {inst.name} failed: {error!r}")

  def recover_pool(self, inst) -> list:
    """After `inst`'s step failed: if its pool was lost with it, a fresh one takes
    its place; returns the requests whose KV was in it (empty if none was lost)."""
    runner = inst.handle
    if not runner.pools_lost():
      return []
    runner.reset_pools()
    held = {}
    for other in (i for i in self._bound if i.handle is runner):
      for r in other.sched.allocator.owners():
        held[r] = None
    for r in held:
      r.payload.error = r.payload.error or RuntimeError(
          f"the KV pool of {inst.group} was lost when a step failed")
    return list(held)

  def start_copy(self, req: Request, src, dst, now: float) -> None:
    try:
      src_pages = src.sched.allocator.pages(req)
      n = bk.bucket(len(src_pages), self.page_buckets, "pages per transfer")
      pad = [SCRATCH_PAGE] * (n - len(src_pages))
      dst_pages = dst.sched.allocator.pages(req)[:len(src_pages)]
      moved = transfer_pages(src.handle.pools, np.array(src_pages + pad),
                             dst.handle.pools, np.array(dst_pages + pad))
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


def _is_chunk(row) -> bool:
  return isinstance(row, PrefillChunk)


def _request(row) -> Request:
  return row.request if _is_chunk(row) else row


def _row_tokens(row) -> int:
  return row.num_tokens if _is_chunk(row) else 1


def _row_input(row) -> List[int]:
  """A chunk's tokens (its prompt's, or output tokens to recompute after a
  preemption), or a decode's last token."""
  if not _is_chunk(row):
    return row.payload.tokens[-1:]
  job, n = row.request.payload, len(row.request.payload.prompt)
  if row.end <= n:
    return job.prompt[row.start:row.end]
  return (job.prompt + job.tokens)[row.start:row.end]


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
