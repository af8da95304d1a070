"""`Engine`: serves a model in one of three modes with real programs on real meshes.

- "colocated": one mesh (`tp` devices) runs both phases with continuous batching,
  prefill-first (vLLM's classic policy) or chunked prefill (Sarathi-Serve).
- "disaggregated" (DistServe): `num_prefill` prefill instances of `prefill_tp` devices
  and `num_decode` decode instances of `decode_tp` devices, each with its own weights
  and page pool. Finished prompts wait in their prefill instance's memory until a
  decode instance with room pulls them; their pages move with `jax.device_put`,
  resharded to the decode mesh.
- "semi_pd" (semi-PD): one mesh, one weight copy, one page pool, separate prefill
  and decode programs time-shared by a `ShareController`; an `SloPartitioner` moves
  the share online from the TTFT/TPOT of finished requests.

One engine thread owns every scheduler and allocator. It launches steps on every
mesh before waiting on any (JAX dispatch is asynchronous, so meshes and transfers
overlap), sleeps on its inbox until a submission arrives or a `Watcher` rings that
some step or KV copy finished, then folds finished work back into the schedulers.
Callers talk to it through a queue: `submit` (streaming handle), `generate`
(batch), `run_workload` (arrivals replayed on the wall clock). Bad requests are
rejected at `submit` with a ValueError and never reach the engine thread.
"""

from __future__ import annotations

import dataclasses
import itertools
import queue
import threading
import time
from typing import Dict, List, Optional, Sequence, Union

import jax
import numpy as np

from pdserve_jax.kv.allocator import PageAllocator
from pdserve_jax.kv.pool import SCRATCH_PAGE, transfer_pages
from pdserve_jax.model import sharding
from pdserve_jax.model.model import Model
from pdserve_jax.runtime import buckets as bk
from pdserve_jax.runtime.programs import InstanceRunner, RunnerShape
from pdserve_jax.serving import metrics
from pdserve_jax.serving.executor import Job, StepRecord, StepRunner, Watcher, wall_clock
from pdserve_jax.serving.params import SamplingParams
from pdserve_jax.serving.request import Request
from pdserve_jax.serving.scheduler import (DECODE, PREFILL, ChunkedPrefillScheduler,
                                           DecodeScheduler, PrefillFirstScheduler,
                                           PrefillScheduler, ShareController,
                                           SloPartitioner, check_fits, least_loaded,
                                           move_handoffs)

MODES = ("colocated", "disaggregated", "semi_pd")
POLICIES = ("prefill_first", "chunked")


@dataclasses.dataclass(frozen=True)
class EngineConfig:
  mode: str = "colocated"
  tp: int = 1  # colocated and semi_pd
  policy: str = "prefill_first"  # colocated
  num_prefill: int = 1  # disaggregated
  prefill_tp: int = 1
  num_decode: int = 1
  decode_tp: int = 1
  page_size: int = 16
  num_pages: int = 256  # per instance; page 0 is scratch
  max_batch: int = 16  # decode batch cap (running requests)
  max_prefill_batch: int = 8  # prompt rows per prefill program call
  max_prefill_tokens: int = 512  # prompt tokens per prefill step
  token_budget: int = 128  # chunked prefill: tokens per step
  max_seq_len: int = 512  # prompt + output
  # semi-PD: initial prefill share and the partitioner's SLOs (seconds) and knobs.
  prefill_share: float = 0.5
  ttft_slo: float = 1.0
  tpot_slo: float = 0.1
  partition_window: int = 16
  partition_step: float = 0.1
  min_share: float = 0.1
  max_share: float = 0.9
  hysteresis: float = 0.1
  attn_impl: str = "auto"
  warmup: bool = True
  log_steps: bool = False  # keep a `StepRecord` of every step (`Engine.step_log`)
  # Smallest shape buckets: raising them trades padding for fewer compiled shapes.
  min_prefill_bucket: int = 16
  min_pages_bucket: int = 1

  def check(self) -> None:
    if self.mode not in MODES:
      raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
    if self.policy not in POLICIES:
      raise ValueError(f"policy must be one of {POLICIES}, got {self.policy!r}")
    for f in ("tp", "num_prefill", "prefill_tp", "num_decode", "decode_tp", "page_size",
              "max_batch", "max_prefill_batch", "max_prefill_tokens", "token_budget"):
      if getattr(self, f) < 1:
        raise ValueError(f"{f} must be >= 1, got {getattr(self, f)}")
    if self.num_pages < 2:
      raise ValueError(f"num_pages must be >= 2 (page 0 is scratch), got {self.num_pages}")
    if self.max_seq_len % self.page_size:
      raise ValueError(f"max_seq_len={self.max_seq_len} must be a multiple of "
                       f"page_size={self.page_size}")
    if self.ttft_slo <= 0 or self.tpot_slo <= 0:
      raise ValueError(f"SLOs must be positive, got ttft_slo={self.ttft_slo}, "
                       f"tpot_slo={self.tpot_slo}")

  @property
  def devices_needed(self) -> int:
    if self.mode == "disaggregated":
      return self.num_prefill * self.prefill_tp + self.num_decode * self.decode_tp
    return self.tp

  @property
  def max_prompt_len(self) -> int:
    if self.mode == "colocated" and self.policy == "chunked":
      return self.max_seq_len - 1
    return min(self.max_prefill_tokens, self.max_seq_len - 1)

  def runner_shape(self) -> RunnerShape:
    chunk = self.token_budget if (self.mode, self.policy) == ("colocated", "chunked") \
        else self.max_prompt_len
    return RunnerShape(page_size=self.page_size, num_pages=self.num_pages,
                       max_decode_batch=self.max_batch, max_prefill_batch=self.max_prefill_batch,
                       max_prefill_len=min(chunk, self.max_seq_len),
                       max_seq_len=self.max_seq_len, min_prefill_len=self.min_prefill_bucket,
                       min_table_width=self.min_pages_bucket)


@dataclasses.dataclass
class Result:
  request_id: int
  prompt: List[int]
  token_ids: List[int]
  token_times: List[float]  # seconds on the engine clock, one per token
  arrival_time: float
  finish_time: float
  finish_reason: str  # "stop" or "length"

  @property
  def ttft(self) -> float:
    return self.token_times[0] - self.arrival_time

  @property
  def tpot(self) -> Optional[float]:
    n = len(self.token_times)
    return (self.token_times[-1] - self.token_times[0]) / (n - 1) if n > 1 else None


class RequestHandle:
  """A submitted request: iterate for tokens as they come, or wait for `result()`."""

  def __init__(self, req: Request):
    self._req = req

  @property
  def request_id(self) -> int:
    return self._req.request_id

  def __iter__(self):
    job = self._req.payload
    while True:
      tok = job.stream.get()
      if tok is None:
        break
      yield tok
    if job.error is not None:
      raise job.error

  def result(self, timeout: Optional[float] = None) -> Result:
    job, r = self._req.payload, self._req
    if not job.finished.wait(timeout):
      raise TimeoutError(f"request {r.request_id} not finished after {timeout} s")
    if job.error is not None:
      raise job.error
    return Result(r.request_id, job.prompt, list(job.tokens), list(r.token_times),
                  r.arrival_time, r.finish_time, "stop" if r.stopped else "length")


@dataclasses.dataclass
class WorkloadReport:
  results: List[Result]
  requests: List[Request]  # with their token times, for metrics
  summary: dict
  share_history: List[tuple]
  wall_seconds: float


# ---------------------------------------------------------------------------
# The three modes: who schedules what on which runner.


class _Colocated:
  transfers = ()  # KV copies in flight (disaggregated only)

  def __init__(self, cfg: EngineConfig, model: Model, clock, watcher):
    mesh = sharding.split_devices([cfg.tp])[0]
    runner = InstanceRunner(model, mesh, cfg.runner_shape(), cfg.attn_impl)
    alloc = PageAllocator(cfg.num_pages, cfg.page_size, reserved=1)
    if cfg.policy == "chunked":
      sched = ChunkedPrefillScheduler(alloc, cfg.max_batch, cfg.token_budget)
    else:
      sched = PrefillFirstScheduler(alloc, cfg.max_batch, cfg.max_prefill_tokens)
    self.runners = [StepRunner("colocated", runner, sched, clock, watcher("colocated"))]

  def add(self, req: Request) -> None:
    self.runners[0].scheduler.add(req)

  def advance(self):
    sr = self.runners[0]
    finished = sr.poll() or []
    launched = sr.try_launch()
    return bool(finished) or launched, finished

  def allocators(self):
    return [sr.allocator for sr in self.runners]

  def warmup(self):
    for sr in self.runners:
      sr.runner.warmup()

  @property
  def share_history(self):
    return []


class _Disaggregated:

  def __init__(self, cfg: EngineConfig, model: Model, clock, watcher):
    sizes = [cfg.prefill_tp] * cfg.num_prefill + [cfg.decode_tp] * cfg.num_decode
    meshes = sharding.split_devices(sizes)
    shape = cfg.runner_shape()
    self.prefills, self.decodes = [], []
    for i, mesh in enumerate(meshes):
      runner = InstanceRunner(model, mesh, shape, cfg.attn_impl)
      alloc = PageAllocator(cfg.num_pages, cfg.page_size, reserved=1)
      if i < cfg.num_prefill:
        sched = PrefillScheduler(alloc, cfg.max_batch, cfg.max_prefill_tokens)
        name = f"prefill{i}"
        self.prefills.append(StepRunner(name, runner, sched, clock, watcher(name)))
      else:
        sched = DecodeScheduler(alloc, cfg.max_batch)
        name = f"decode{i - cfg.num_prefill}"
        self.decodes.append(StepRunner(name, runner, sched, clock, watcher(name)))
    self.runners = self.prefills + self.decodes
    # Copies into one decode pool finish in the order they were issued.
    self.copy_watchers = {sr: watcher(f"{sr.name}-copies") for sr in self.decodes}
    self.page_buckets = bk.powers_of_two(1, cfg.max_seq_len // cfg.page_size)
    self.transfers = []  # (request, prefill StepRunner, decode StepRunner, moved buffer)

  def add(self, req: Request) -> None:
    self.decodes[0].scheduler.check_fits(req)  # all decode pools are alike
    by_sched = {sr.scheduler: sr for sr in self.prefills}
    by_sched[least_loaded(list(by_sched))].scheduler.add(req)

  def _transfer(self, req, src: StepRunner, dst: StepRunner):
    src_pages = src.allocator.pages(req)
    n = bk.bucket(len(src_pages), self.page_buckets, "pages per transfer")
    pad = [SCRATCH_PAGE] * (n - len(src_pages))
    dst_pages = dst.allocator.pages(req)[:len(src_pages)]
    return transfer_pages(src.runner.pool, np.array(src_pages + pad),
                          dst.runner.pool, np.array(dst_pages + pad))

  def _start_transfers(self) -> bool:
    started = False
    decode_scheds = {sr.scheduler: sr for sr in self.decodes}
    while True:
      # The oldest finished prompt across prefill instances goes first.
      heads = [(sr.scheduler.peek_handoff(), sr) for sr in self.prefills]
      heads = [(r, sr) for r, sr in heads if r is not None]
      if not heads:
        return started
      req, src = min(heads, key=lambda h: h[0].token_times[0])
      dst_sched = least_loaded(list(decode_scheds), lambda s: s.can_accept(req))
      if dst_sched is None:
        return started  # decode memory is full: the prompt waits in prefill memory
      dst = decode_scheds[dst_sched]
      src.scheduler.take_handoff()
      dst_sched.reserve(req)
      moved = self._transfer(req, src, dst)
      self.copy_watchers[dst].watch(moved)
      self.transfers.append((req, src, dst, moved))
      started = True

  def _finish_transfers(self) -> bool:
    keep, done = [], False
    for t in self.transfers:
      req, src, dst, moved = t
      if all(a.is_ready() for a in moved.values()):
        src.scheduler.release_handoff(req)
        dst.scheduler.admit(req)
        done = True
      else:
        keep.append(t)
    self.transfers = keep
    return done

  def advance(self):
    finished, progress = [], False
    for sr in self.runners:
      out = sr.poll()
      if out is not None:
        finished += out
        progress = True
    progress |= self._finish_transfers()
    progress |= self._start_transfers()
    for sr in self.runners:
      progress |= sr.try_launch()
    return progress, finished

  def allocators(self):
    return [sr.allocator for sr in self.runners]

  def warmup(self):
    for sr in self.runners:
      sr.runner.warmup(prefill=sr in self.prefills, decode=sr in self.decodes)
    for src, dst in itertools.product(self.prefills, self.decodes):
      for n in self.page_buckets:
        scratch = np.full(n, SCRATCH_PAGE)
        transfer_pages(src.runner.pool, scratch, dst.runner.pool, scratch)
    jax.block_until_ready([sr.runner.pool.arrays for sr in self.decodes])

  @property
  def share_history(self):
    return []


class _SemiPD:
  transfers = ()

  def __init__(self, cfg: EngineConfig, model: Model, clock, watcher):
    mesh = sharding.split_devices([cfg.tp])[0]
    runner = InstanceRunner(model, mesh, cfg.runner_shape(), cfg.attn_impl)
    alloc = PageAllocator(cfg.num_pages, cfg.page_size, reserved=1)
    steps = watcher("semi_pd")  # one step in flight at a time, either phase
    self.prefill = StepRunner("prefill", runner, PrefillScheduler(
        alloc, cfg.max_batch, cfg.max_prefill_tokens, reserve_lifetime=True), clock, steps)
    self.decode = StepRunner("decode", runner, DecodeScheduler(alloc, cfg.max_batch), clock,
                             steps)
    self.runners = [self.prefill, self.decode]
    self.controller = ShareController(cfg.prefill_share)
    self.partitioner = SloPartitioner(
        cfg.ttft_slo, cfg.tpot_slo, window=cfg.partition_window, step=cfg.partition_step,
        min_share=cfg.min_share, max_share=cfg.max_share, hysteresis=cfg.hysteresis,
        initial_share=cfg.prefill_share, start_time=clock())

  def add(self, req: Request) -> None:
    self.prefill.scheduler.add(req)

  def advance(self):
    finished, progress = [], False
    for sr, phase in ((self.prefill, PREFILL), (self.decode, DECODE)):
      out = sr.poll()
      if out is None:
        continue
      progress = True
      self.controller.record(phase, sr.last_step_seconds)
      finished += out
      if phase == PREFILL:
        move_handoffs(self.prefill.scheduler, self.decode.scheduler)
    for r in finished:
      if self.partitioner.observe(r) is not None:
        self.controller.set_share(self.partitioner.share)
    if self.prefill.inflight is None and self.decode.inflight is None:
      progress |= self._launch_one()
    return progress, finished

  def _launch_one(self) -> bool:
    p, d = self.prefill.scheduler, self.decode.scheduler
    phase = self.controller.pick(p.num_waiting > 0, d.num_waiting + d.num_running > 0)
    order = [self.prefill, self.decode] if phase == PREFILL else [self.decode, self.prefill]
    return phase is not None and any(sr.try_launch() for sr in order)

  def allocators(self):
    return [self.prefill.allocator]

  def warmup(self):
    self.prefill.runner.warmup()

  @property
  def share_history(self):
    return self.partitioner.history


_WAKE = object()  # a watcher's ring: some step or copy finished
_MODES = {"colocated": _Colocated, "disaggregated": _Disaggregated, "semi_pd": _SemiPD}


class Engine:
  """Serves `model` as `config` says; see the module docstring for the modes."""

  def __init__(self, model: Model, config: EngineConfig = EngineConfig()):
    config.check()
    if not model.config.executable:
      raise ValueError(f"model {model.config.name!r} ({model.config.arch}) cannot be served")
    if config.devices_needed > jax.device_count():
      raise ValueError(f"{config.mode} with this parallelism needs {config.devices_needed} "
                       f"devices; {jax.device_count()} available")
    self.model, self.config = model, config
    self._epoch = time.perf_counter()
    self.clock = wall_clock(self._epoch)
    self._inbox: "queue.Queue" = queue.Queue()
    self._watchers: List[Watcher] = []
    self._mode = _MODES[config.mode](config, model, self.clock, self._watcher)
    if config.warmup:
      self._mode.warmup()
    self.step_log: List[StepRecord] = []
    if config.log_steps:
      for sr in self._mode.runners:
        sr.log = self.step_log
    self._ids = itertools.count()
    self._live: Dict[int, Request] = {}
    self._closing = False
    self._error: Optional[BaseException] = None
    self._thread = threading.Thread(target=self._loop, name="pdserve-engine", daemon=True)
    self._thread.start()

  # -- the caller's side -----------------------------------------------------

  def submit(self, prompt: Sequence[int], sampling: Optional[SamplingParams] = None,
             arrival_time: Optional[float] = None) -> RequestHandle:
    """Queues one request; raises ValueError at once for bad input."""
    if self._closing or self._error is not None:
      raise RuntimeError("engine is closed" if self._closing else f"engine failed: {self._error}")
    sampling = sampling or SamplingParams()
    sampling.check()
    prompt = self._check_prompt(prompt, sampling)
    req = Request(next(self._ids), len(prompt), sampling.max_tokens,
                  self.clock() if arrival_time is None else arrival_time,
                  payload=Job(prompt, sampling))
    # Every instance's pool has `num_pages`; capacity never changes, so reading it
    # from this thread is safe.
    check_fits(self._mode.allocators()[0], req, req.lifetime_tokens)
    self._inbox.put(req)
    return RequestHandle(req)

  def _check_prompt(self, prompt, sampling) -> List[int]:
    cfg, vocab = self.config, self.model.config.vocab_size
    try:
      ids = [int(t) for t in prompt]
    except (TypeError, ValueError):
      raise ValueError("prompt must be a sequence of integer token ids") from None
    if not ids:
      raise ValueError("prompt is empty")
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
      raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
    if len(ids) > cfg.max_prompt_len:
      raise ValueError(f"prompt of {len(ids)} tokens exceeds the longest this engine "
                       f"takes ({cfg.max_prompt_len}: see max_prefill_tokens, max_seq_len)")
    if len(ids) + sampling.max_tokens > cfg.max_seq_len:
      raise ValueError(f"prompt ({len(ids)}) + max_tokens ({sampling.max_tokens}) exceeds "
                       f"max_seq_len={cfg.max_seq_len}")
    return ids

  def generate(self, prompts: Sequence[Sequence[int]],
               sampling: Union[SamplingParams, Sequence[SamplingParams], None] = None,
               timeout: Optional[float] = None) -> List[Result]:
    """Serves a batch; results in prompt order."""
    if sampling is None or isinstance(sampling, SamplingParams):
      sampling = [sampling] * len(prompts)
    if len(sampling) != len(prompts):
      raise ValueError(f"{len(sampling)} SamplingParams for {len(prompts)} prompts")
    handles = [self.submit(p, s) for p, s in zip(prompts, sampling)]
    return [h.result(timeout) for h in handles]

  def run_workload(self, requests: Sequence[Request],
                   sampling: Optional[SamplingParams] = None, seed: int = 0,
                   timeout: Optional[float] = None) -> WorkloadReport:
    """Replays `requests` (arrival offsets in seconds, prompt_len, max_tokens; the
    prompt's token ids in `payload` if given, else random ones) on the wall clock."""
    if not requests:
      raise ValueError("empty workload")
    base = sampling or SamplingParams()
    rng = np.random.default_rng(seed)
    vocab = self.model.config.vocab_size
    plan = []
    for r in sorted(requests, key=lambda r: r.arrival_time):
      prompt = r.payload if r.payload is not None else rng.integers(0, vocab, r.prompt_len)
      params = dataclasses.replace(base, max_tokens=r.max_tokens)
      plan.append((r.arrival_time, list(prompt), params))
    start = self.clock()
    handles = []
    for offset, prompt, params in plan:
      delay = start + offset - self.clock()
      if delay > 0:
        time.sleep(delay)
      handles.append(self.submit(prompt, params, arrival_time=start + offset))
    results = [h.result(timeout) for h in handles]
    reqs = [h._req for h in handles]
    cfg = self.config
    return WorkloadReport(results, reqs, metrics.summarize(reqs, cfg.ttft_slo, cfg.tpot_slo),
                          list(self._mode.share_history), self.clock() - start)

  @property
  def share_history(self):
    """semi-PD: (time, prefill share) at the start and at every change."""
    return list(self._mode.share_history)

  def allocators(self) -> List[PageAllocator]:
    return self._mode.allocators()

  def pages_in_use(self) -> int:
    return sum(a.capacity - a.num_free for a in self.allocators())

  def close(self) -> None:
    self._closing = True
    self._inbox.put(None)
    self._thread.join()
    for w in self._watchers:
      w.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  # -- the engine thread -----------------------------------------------------

  def _watcher(self, name: str) -> Watcher:
    w = Watcher(lambda: self._inbox.put(_WAKE), f"pdserve-watch-{name}")
    self._watchers.append(w)
    return w

  def _accept(self, req: Request) -> None:
    try:
      self._mode.add(req)
    except ValueError as e:
      req.payload.end(e)
      return
    self._live[req.request_id] = req

  def _drain(self, block: bool) -> None:
    try:
      # The timeout only bounds the cost of a lost wake-up.
      item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
      while True:
        if isinstance(item, Request):
          self._accept(item)
        item = self._inbox.get_nowait()
    except queue.Empty:
      pass

  def _loop(self) -> None:
    try:
      while not (self._closing and not self._live):
        self._drain(block=False)
        progress, finished = self._mode.advance()
        for r in finished:
          del self._live[r.request_id]
          r.payload.end()
        if progress:
          continue
        busy = any(sr.inflight is not None for sr in self._mode.runners)
        if self._live and not busy and not self._mode.transfers:
          raise RuntimeError(f"{len(self._live)} requests are stuck: nothing can be scheduled")
        self._drain(block=True)  # until a submission, or a watcher's ring
    except BaseException as e:  # a failing program must not leave callers hanging
      self._error = e
      for r in self._live.values():
        r.payload.end(RuntimeError(f"engine failed: {e!r}"))
      raise
