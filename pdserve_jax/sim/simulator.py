"""Discrete-event simulator: the serving schedulers on a virtual clock.

The latency-model executor. It drives the same scheduler objects as the engine
(`serving/scheduler.py`), advancing a virtual clock by a `LatencyModel`'s step
times instead of running programs, so the planner judges the policies that serve.

Deployments:
  `Colocated`: replicas each running prefill-first or chunked-prefill batching.
  `Disaggregated`: prefill and decode instances (DistServe); KV moves after the
    prefill over the node link or the network, pulled by a decode instance when it
    has pages; until then the hand-off waits in prefill memory.
  `SemiPD`: replicas with one weight copy and one KV pool, prefill and decode
    sharing compute, either time-sliced by a `ShareController` (as the JAX engine
    does) or run concurrently on partitioned SMs, each phase slowed by its
    `ShareScaling`; optionally an `SloPartitioner` moves the share online.
  `PhaseOnly`: one phase alone, as DistServe's planner measures them: prefill with
    an infinitely fast decode side (TTFT only), or decode with requests arriving
    prefilled (TPOT only).

Each instance's KV capacity is its devices' HBM times `memory_utilization`, minus one
copy of the weights. An instance with pp pipeline stages runs pp schedulers on
slices of its pool so that pp steps are in flight (see `_Pipe`). Requests with
several schedulers to choose from go to the least loaded one. Limits: semi-PD is
modelled with pp = 1 only; KV copies do not contend for links; a step's stages are
equal (the latency model's time / pp each).
"""

from __future__ import annotations

import collections
import dataclasses
import gc
import heapq
import itertools
import math
import os
from typing import Callable, Optional, Sequence

from pdserve_jax.kv.allocator import PageAllocator
from pdserve_jax.model.config import ModelConfig, get_preset
from pdserve_jax.serving import metrics
from pdserve_jax.serving import scheduler as S
from pdserve_jax.serving.request import Request
from pdserve_jax.sim.hardware import HardwareSpec, get_hardware
from pdserve_jax.sim.latency import (LatencyModel, ShareScaling, latency_source,
                                     transfer_time)


class DoesNotFit(ValueError):
  """A model or request does not fit an instance's memory."""


@dataclasses.dataclass(frozen=True)
class Setup:
  """What stays fixed across deployments: model, hardware, latency source."""
  model: ModelConfig
  hardware: HardwareSpec
  latency: Callable[[int, int], LatencyModel]  # (tp, pp) -> model of that instance
  page_size: int = 16
  memory_utilization: float = 0.9
  dtype_bytes: int = 2
  # KV tokens per instance, overriding the HBM estimate: an engine's actual pool
  # (`num_pages` of `page_size`), when simulating that engine.
  kv_tokens: Optional[int] = None
  # How many times slower a step runs while another instance's step runs beside it:
  # 1 for separate accelerators; above 1 where instances share a host's cores, as
  # virtual CPU devices do (`profiler.profile_overlap` measures it).
  overlap_slowdown: float = 1.0


@dataclasses.dataclass(frozen=True)
class InstanceSpec:
  """One instance: `tp` x `pp` devices, a batch cap and a per-step token budget
  (prompt tokens for prefill-first and prefill instances, all tokens for chunked
  prefill). Prompts longer than the budget run in a step of their own."""
  tp: int = 1
  pp: int = 1
  max_batch: int = 256
  max_tokens: int = 4096

  @property
  def num_devices(self) -> int:
    return self.tp * self.pp


@dataclasses.dataclass(frozen=True)
class Colocated:
  """`replicas` instances, each serving both phases with one `policy`."""
  instance: InstanceSpec = InstanceSpec()
  replicas: int = 1
  policy: str = "prefill_first"  # or "chunked"

  @property
  def num_devices(self) -> int:
    return self.replicas * self.instance.num_devices


@dataclasses.dataclass(frozen=True)
class Disaggregated:
  """`num_prefill` prefill instances and `num_decode` decode instances."""
  prefill: InstanceSpec = InstanceSpec()
  decode: InstanceSpec = InstanceSpec()
  num_prefill: int = 1
  num_decode: int = 1
  same_node: bool = True  # KV moves over the node link, else over the network

  @property
  def num_devices(self) -> int:
    return self.num_prefill * self.prefill.num_devices + self.num_decode * self.decode.num_devices


@dataclasses.dataclass(frozen=True)
class SemiPD:
  """semi-PD replicas. `partitioner` holds `SloPartitioner` keyword arguments
  (window, step, bounds, hysteresis) and turns the online partitioner on; its
  SLOs are those given to `simulate`."""
  instance: InstanceSpec = InstanceSpec()
  replicas: int = 1
  prefill_share: float = 0.5
  concurrent: bool = False
  prefill_scaling: ShareScaling = ShareScaling()
  decode_scaling: ShareScaling = ShareScaling()
  partitioner: Optional[dict] = None

  @property
  def num_devices(self) -> int:
    return self.replicas * self.instance.num_devices


@dataclasses.dataclass(frozen=True)
class PhaseOnly:
  """`replicas` instances of one phase alone (see the module docstring)."""
  phase: str  # "prefill" or "decode"
  instance: InstanceSpec = InstanceSpec()
  replicas: int = 1

  @property
  def num_devices(self) -> int:
    return self.replicas * self.instance.num_devices


def kv_capacity_tokens(setup: Setup, tp: int, pp: int) -> int:
  """Tokens of KV one instance of `tp` x `pp` devices holds beside its weights."""
  if setup.kv_tokens is not None:
    return setup.kv_tokens
  n = tp * pp
  usable = n * setup.hardware.hbm_bytes * setup.memory_utilization
  weights = setup.model.num_params() * setup.dtype_bytes
  tokens = int((usable - weights) // setup.model.kv_bytes_per_token(setup.dtype_bytes))
  if tokens < setup.page_size:
    raise DoesNotFit(
        f"{setup.model.name} ({weights / 1e9:.1f} GB of weights) does not fit "
        f"tp={tp} x pp={pp} {setup.hardware.name} ({usable / 1e9:.1f} GB usable at "
        f"{setup.memory_utilization:.0%})")
  return tokens


@dataclasses.dataclass
class SimResult:
  """Finished request copies, the span from first arrival to last finish, busy
  fraction per instance (per stage with pipelines), and semi-PD share histories."""
  requests: list[Request]
  makespan: float
  num_devices: int
  utilization: dict[str, float]
  share_history: dict[str, list[tuple[float, float]]]

  def attainment(self, ttft_slo: float, tpot_slo: float) -> float:
    return metrics.attainment(self.requests, ttft_slo, tpot_slo)

  def summary(self, ttft_slo: Optional[float] = None,
              tpot_slo: Optional[float] = None) -> dict:
    out = metrics.summarize(self.requests, ttft_slo, tpot_slo)
    out.update(num_devices=self.num_devices, makespan_s=self.makespan,
               utilization=self.utilization,
               share_history={k: [list(p) for p in v] for k, v in self.share_history.items()})
    return out


class _Pipe:
  """The devices of one instance, as `pp` pipeline stages.

  The latency model gives a step's time in one stage (the whole time / pp). A step
  enters when the first stage is free and spends its stage time in every stage in
  turn; it overtakes nothing, so behind a slower step it finishes one stage time
  after that one (a proportionate flow shop: completion = max(entry + pp * stage,
  previous completion + stage)). To keep pp steps in flight while each scheduler has
  one, an instance runs pp engines (vLLM's virtual engines), each with its own
  scheduler and 1/pp of the KV pool.
  """
  __slots__ = ("name", "pp", "sim", "free_at", "last_done", "waiting", "busy_time",
               "wake_at")

  def __init__(self, name, pp, sim):
    self.name, self.pp, self.sim = name, pp, sim
    self.free_at = -math.inf
    self.last_done = -math.inf
    self.waiting = collections.deque()
    self.busy_time = 0.0  # per stage
    self.wake_at = None

  def wait(self, engine):
    engine.queued = True
    self.waiting.append(engine)
    self._wake_later()

  def _wake_later(self):
    if self.wake_at != self.free_at:
      self.wake_at = self.free_at
      self.sim.at(self.free_at, self._wake, None)

  def _wake(self, now, _):
    self.wake_at = None
    waiting = self.waiting
    while waiting and self.free_at <= now:
      e = waiting.popleft()
      e.queued = False
      e.kick(now)
    if waiting:
      self._wake_later()


class _Engine:
  """One scheduler on a pipe: runs its steps on the virtual clock."""
  __slots__ = ("name", "sched", "model", "sim", "pipe", "step", "queued", "stretch", "on_done")

  def __init__(self, name, sched, model, sim, pipe, on_done, stretch=None):
    self.name, self.sched, self.model, self.sim, self.pipe = name, sched, model, sim, pipe
    self.on_done = on_done  # (engine, finished, now) -> None
    # (now, stage seconds) -> seconds it takes: semi-PD's SM sharing, or instances
    # contending for a host's cores.
    self.stretch = stretch
    self.step = None
    self.queued = False

  @property
  def num_waiting(self):
    return self.sched.num_waiting

  @property
  def num_running(self):
    return self.sched.num_running

  def kick(self, now):
    if self.step is not None or self.queued:
      return
    pipe = self.pipe
    if pipe.free_at > now:
      pipe.wait(self)
      return
    step = self.sched.schedule()
    if step is None:
      return
    stage = self.model.step_time(step, self.sched.allocator.pages)
    if self.stretch is not None:
      stage = self.stretch(now, stage)
    pipe.free_at = now + stage
    pipe.busy_time += stage
    done = max(now + stage * pipe.pp, pipe.last_done + stage)
    pipe.last_done = done
    self.step = step
    self.sim.at(done, self._done, step)

  def _done(self, now, step):
    self.step = None
    finished = self.sched.complete(step, now)
    if self.on_done is not None:
      self.on_done(self, finished, now)
    self.kick(now)


class _TimeShared:
  """A semi-PD replica time-sliced: a `ShareController` picks which phase's step
  runs next, and that step has the whole device."""

  def __init__(self, name, prefill, decode, model, sim, controller, on_finished):
    self.name, self.prefill, self.decode = name, prefill, decode
    self.model, self.sim, self.ctrl = model, sim, controller
    self.on_finished = on_finished
    self.step = None
    self.busy_time = 0.0

  @property
  def num_waiting(self):
    return self.prefill.num_waiting + self.decode.num_waiting

  @property
  def num_running(self):
    return self.prefill.num_running + self.decode.num_running

  def kick(self, now):
    if self.step is not None:
      return
    S.move_handoffs(self.prefill, self.decode)
    first = self.ctrl.pick(self.prefill.num_waiting > 0, not self.decode.idle)
    if first is None:
      return
    second = S.DECODE if first == S.PREFILL else S.PREFILL
    for phase in (first, second):
      sched = self.prefill if phase == S.PREFILL else self.decode
      step = sched.schedule()
      if step is not None:
        break
    else:
      return
    dur = self.model.step_time(step, sched.allocator.pages)
    self.ctrl.record(phase, dur)
    self.step = step
    self.busy_time += dur
    self.sim.at(now + dur, self._done, (sched, step))

  def _done(self, now, arg):
    sched, step = arg
    self.step = None
    self.on_finished(sched.complete(step, now), now)
    self.kick(now)


class _Simulation:
  """The virtual clock: an event heap merged with the sorted arrivals."""

  def __init__(self):
    self.heap = []
    self.seq = itertools.count()

  def at(self, t, fn, arg):
    heapq.heappush(self.heap, (t, next(self.seq), fn, arg))

  def run(self, reqs, on_arrival):
    heap, pop = self.heap, heapq.heappop
    i, n = 0, len(reqs)
    while i < n or heap:
      if heap and (i == n or heap[0][0] <= reqs[i].arrival_time):
        t, _, fn, arg = pop(heap)
        fn(t, arg)
      else:
        r = reqs[i]
        i += 1
        on_arrival(r, r.arrival_time)


def simulate(requests: Sequence[Request], setup: Setup, deployment,
             ttft_slo: Optional[float] = None, tpot_slo: Optional[float] = None) -> SimResult:
  """Runs fresh copies of `requests` through `deployment` and returns them finished.

  `ttft_slo` and `tpot_slo` (s) are needed only by semi-PD's online partitioner.
  Raises DoesNotFit when the weights or the longest request do not fit an instance.
  """
  if not requests:
    raise ValueError("no requests to simulate")
  runner = {Colocated: _colocated, Disaggregated: _disaggregated, SemiPD: _semi_pd,
            PhaseOnly: _phase_only}.get(type(deployment))
  if runner is None:
    raise ValueError(f"unknown deployment {deployment!r}")
  reqs = sorted((r.fresh() for r in requests), key=lambda r: r.arrival_time)
  sim = _Simulation()
  # The run allocates many short-lived objects and makes no reference cycles worth
  # collecting mid-run; pausing the cyclic collector saves a tenth of the time.
  gc_was_enabled = gc.isenabled()
  gc.disable()
  try:
    busy, histories = runner(reqs, setup, deployment, sim, ttft_slo, tpot_slo)
  finally:
    if gc_was_enabled:
      gc.enable()
  start = reqs[0].arrival_time
  end = max((r.finish_time for r in reqs if r.finish_time is not None), default=start)
  span = end - start
  util = {name: (b / span if span > 0 else 0.0) for name, b in busy().items()}
  return SimResult(reqs, span, deployment.num_devices, util, histories)


def _engines(name, spec, setup, sim, make_sched, on_done, pipes):
  """An instance's pp engines, each with 1/pp of the KV pool, on one pipe that joins
  `pipes` (the instances that contend when `setup.overlap_slowdown` > 1)."""
  model = setup.latency(spec.tp, spec.pp)
  tokens = kv_capacity_tokens(setup, spec.tp, spec.pp) // spec.pp
  pipe = _Pipe(name, spec.pp, sim)
  stretch = None if setup.overlap_slowdown == 1.0 else _overlap(
      setup.overlap_slowdown, pipe, pipes)
  pipes.append(pipe)
  engines = []
  for v in range(spec.pp):
    alloc = PageAllocator(max(1, tokens // setup.page_size), setup.page_size)
    engines.append(_Engine(name if spec.pp == 1 else f"{name}.{v}", make_sched(alloc), model,
                           sim, pipe, on_done, stretch))
  return engines


def _overlap(slowdown, me, pipes):
  """A step runs `slowdown` times slower while another pipe is busy. Only the work
  already in flight elsewhere counts (later steps there stretch themselves)."""
  def stretch(now, stage):
    busy = max((p.free_at for p in pipes if p is not me), default=now) - now
    if busy <= 0:
      return stage
    if stage * slowdown <= busy:
      return stage * slowdown
    return busy + stage - busy / slowdown
  return stretch


def _check_fit(reqs, allocator, what, whole_life=True):
  need = (lambda r: r.lifetime_tokens) if whole_life else (lambda r: r.prompt_len)
  worst = max(reqs, key=need)
  try:
    S.check_fits(allocator, worst, need(worst), what)
  except ValueError as e:
    raise DoesNotFit(str(e)) from None


def _budget(spec, reqs):
  return max(spec.max_tokens, max(r.prompt_len for r in reqs))


def _busy(pipes):
  return lambda: {p.name: p.busy_time for p in pipes}


def _dispatch(engines):
  def on_arrival(r, now):
    e = S.least_loaded(engines)
    e.sched.add(r)
    e.kick(now)
  return on_arrival


def _colocated(reqs, setup, dep, sim, ttft_slo, tpot_slo):
  spec = dep.instance
  if dep.policy == "prefill_first":
    make = lambda a: S.PrefillFirstScheduler(a, spec.max_batch, _budget(spec, reqs))
  elif dep.policy == "chunked":
    make = lambda a: S.ChunkedPrefillScheduler(a, spec.max_batch, spec.max_tokens)
  else:
    raise ValueError(f"unknown colocated policy {dep.policy!r}; known: 'prefill_first', "
                     "'chunked'")
  pipes, engines = [], []
  for k in range(dep.replicas):
    engines += _engines(f"colocated{k}", spec, setup, sim, make, None, pipes)
  _check_fit(reqs, engines[0].sched.allocator, "colocated")
  sim.run(reqs, _dispatch(engines))
  return _busy(pipes), {}


def _disaggregated(reqs, setup, dep, sim, ttft_slo, tpot_slo):
  pspec, dspec = dep.prefill, dep.decode
  kv_bytes = setup.model.kv_bytes_per_token(setup.dtype_bytes)
  # Each device pair moves its shard of the KV at once.
  bw = setup.hardware.link_bandwidth(dep.same_node) * min(pspec.num_devices,
                                                          dspec.num_devices)
  link_latency = setup.hardware.link_latency_s
  budget = _budget(pspec, reqs)
  prefills, decodes, pipes = [], [], []

  def pull(now):
    # Decode engines take hand-offs, oldest first per prefill engine, while one of
    # them has pages for the head of the queue.
    for p in prefills:
      sched = p.sched
      while (head := sched.peek_handoff()) is not None:
        d = S.least_loaded(decodes, lambda d: d.sched.can_accept(head))
        if d is None:
          break
        d.sched.reserve(head)
        sched.take_handoff()
        sim.at(now + transfer_time(head.prompt_len * kv_bytes, bw, link_latency),
               copied, (head, p, d))

  def copied(now, arg):
    req, p, d = arg
    p.sched.release_handoff(req)
    d.sched.admit(req)
    d.kick(now)
    p.kick(now)

  def prefill_done(engine, finished, now):
    pull(now)

  def decode_done(engine, finished, now):
    if finished:
      pull(now)

  for k in range(dep.num_prefill):
    prefills += _engines(f"prefill{k}", pspec, setup, sim,
                         lambda a: S.PrefillScheduler(a, pspec.max_batch, budget), prefill_done,
                         pipes)
  for k in range(dep.num_decode):
    decodes += _engines(f"decode{k}", dspec, setup, sim,
                        lambda a: S.DecodeScheduler(a, dspec.max_batch), decode_done, pipes)
  _check_fit(reqs, prefills[0].sched.allocator, "prefill", whole_life=False)
  _check_fit(reqs, decodes[0].sched.allocator, "decode")
  sim.run(reqs, _dispatch(prefills))
  return _busy(pipes), {}


class _Unit:
  """One semi-PD replica as dispatch sees it."""

  def __init__(self, prefill, decode, kick):
    self.prefill, self.decode, self.kick = prefill, decode, kick
    self.sched = prefill  # arrivals join the prefill queue

  @property
  def num_waiting(self):
    return self.prefill.num_waiting + self.decode.num_waiting

  @property
  def num_running(self):
    return self.prefill.num_running + self.decode.num_running


def _semi_pd(reqs, setup, dep, sim, ttft_slo, tpot_slo):
  spec = dep.instance
  if spec.pp != 1:
    raise ValueError("semi-PD time-shares one mesh; pipeline stages (pp > 1) are not "
                     "modelled for it")
  if dep.partitioner is not None and (ttft_slo is None or tpot_slo is None):
    raise ValueError("semi-PD's online partitioner needs ttft_slo and tpot_slo")
  model = setup.latency(spec.tp, spec.pp)
  budget = _budget(spec, reqs)
  tokens = kv_capacity_tokens(setup, spec.tp, spec.pp)
  units, busy, parts = [], {}, {}
  for k in range(dep.replicas):
    name = f"semi_pd{k}"
    alloc = PageAllocator(tokens // setup.page_size, setup.page_size)
    pre = S.PrefillScheduler(alloc, spec.max_batch, budget, reserve_lifetime=True)
    dec = S.DecodeScheduler(alloc, spec.max_batch)
    part = None
    if dep.partitioner is not None:
      part = S.SloPartitioner(ttft_slo, tpot_slo, initial_share=dep.prefill_share,
                              start_time=reqs[0].arrival_time, **dep.partitioner)
      parts[name] = part
    maker = _concurrent_unit if dep.concurrent else _time_shared_unit
    units.append(maker(name, pre, dec, model, sim, dep, part, busy))
  _check_fit(reqs, units[0].prefill.allocator, "semi-PD")
  sim.run(reqs, _dispatch(units))
  return (lambda: {n: f() for n, f in busy.items()}), {n: p.history for n, p in parts.items()}


def _observer(part, set_share):
  def observe(finished):
    for r in finished:
      x = part.observe(r)
      if x is not None:
        set_share(x)
  return observe if part is not None else (lambda finished: None)


def _time_shared_unit(name, pre, dec, model, sim, dep, part, busy):
  ctrl = S.ShareController(dep.prefill_share)
  observe = _observer(part, ctrl.set_share)
  exe = _TimeShared(name, pre, dec, model, sim, ctrl, lambda finished, now: observe(finished))
  busy[name] = lambda: exe.busy_time
  return _Unit(pre, dec, exe.kick)


def _concurrent_unit(name, pre, dec, model, sim, dep, part, busy):
  share = [dep.prefill_share]
  observe = _observer(part, lambda x: share.__setitem__(0, x))

  def prefill_done(engine, finished, now):
    observe(finished)
    if S.move_handoffs(pre, dec):
      dengine.kick(now)

  def decode_done(engine, finished, now):
    observe(finished)
    if finished:
      pengine.kick(now)  # freed pages may admit a waiting prompt

  ppipe, dpipe = _Pipe(f"{name}.prefill", 1, sim), _Pipe(f"{name}.decode", 1, sim)
  pengine = _Engine(ppipe.name, pre, model, sim, ppipe, prefill_done,
                    lambda now, t: t * dep.prefill_scaling.factor(share[0]))
  dengine = _Engine(dpipe.name, dec, model, sim, dpipe, decode_done,
                    lambda now, t: t * dep.decode_scaling.factor(1.0 - share[0]))
  busy[ppipe.name] = lambda: ppipe.busy_time
  busy[dpipe.name] = lambda: dpipe.busy_time
  return _Unit(pre, dec, lambda now: (pengine.kick(now), dengine.kick(now)))


def _phase_only(reqs, setup, dep, sim, ttft_slo, tpot_slo):
  spec = dep.instance
  pipes, engines = [], []
  if dep.phase == "prefill":
    budget = _budget(spec, reqs)

    def drained(engine, finished, now):
      # An infinitely fast decode side: hand-offs leave at once, done for TTFT.
      while (r := engine.sched.take_handoff()) is not None:
        engine.sched.release_handoff(r)
        r.finish_time = now

    for k in range(dep.replicas):
      engines += _engines(f"prefill{k}", spec, setup, sim,
                          lambda a: S.PrefillScheduler(a, spec.max_batch, budget), drained,
                          pipes)
    _check_fit(reqs, engines[0].sched.allocator, "prefill", whole_life=False)
    sim.run(reqs, _dispatch(engines))
    return _busy(pipes), {}
  if dep.phase != "decode":
    raise ValueError(f"phase must be 'prefill' or 'decode', got {dep.phase!r}")

  # Requests arrive prefilled, first token at arrival, and queue FCFS for pages.
  queue = collections.deque()

  def admit_queued(now):
    while queue:
      head = queue[0]
      e = S.least_loaded(engines, lambda e: e.sched.can_accept(head))
      if e is None:
        return
      queue.popleft()
      e.sched.reserve(head)
      e.sched.admit(head)
      e.kick(now)

  def decode_done(engine, finished, now):
    if finished and queue:
      admit_queued(now)

  for k in range(dep.replicas):
    engines += _engines(f"decode{k}", spec, setup, sim,
                        lambda a: S.DecodeScheduler(a, spec.max_batch), decode_done, pipes)
  _check_fit(reqs, engines[0].sched.allocator, "decode")
  for r in reqs:
    r.num_prefilled, r.num_output, r.token_times = r.prompt_len, 1, [r.arrival_time]
    if r.max_tokens == 1:
      r.finish_time = r.arrival_time

  def on_arrival(r, now):
    if r.finish_time is None:
      queue.append(r)
      admit_queued(now)

  sim.run(reqs, on_arrival)
  return _busy(pipes), {}


# Arrivals this fast put a whole sample in the queue at once.
BURST_RATE = 1e6


def saturation_throughput(requests: Sequence[Request], setup: Setup, deployment) -> float:
  """Requests/s `deployment` completes with all of `requests` queued at once (give
  them arrivals at `BURST_RATE`): its capacity. No higher rate is sustained, though
  a finite sample may still meet SLOs above it (TPOT in particular spreads a wait
  for a decode slot over every output token)."""
  res = simulate(requests, setup, deployment)
  # The completion rate between the first and last tenth of finishes: the ramp at
  # the start and the drain at the end run below full batches.
  done = sorted(r.finish_time for r in res.requests)
  i, j = len(done) // 10, len(done) - 1 - len(done) // 10
  if j <= i or done[j] <= done[i]:
    return len(done) / max(res.makespan, 1e-9)
  return (j - i) / (done[j] - done[i])


def goodput(make_requests: Callable[[float], Sequence[Request]], setup: Setup, deployment,
            ttft_slo: float, tpot_slo: float, target: float = 0.9,
            lo: Optional[float] = None, hi: Optional[float] = None,
            tol: float = 0.02) -> float:
  """Highest rate (requests/s, whole deployment) whose attainment is >= `target`,
  by bisection; `make_requests(rate)` builds the workload at a rate.

  The search stays at or below `hi`, by default the deployment's saturation
  throughput on the workload (see `saturation_throughput`); `lo` defaults to a
  quarter of `hi`, and the bracket moves down from it when it misses the SLOs.
  """
  metrics.check_slos(ttft_slo, tpot_slo)
  if hi is None:
    hi = saturation_throughput(make_requests(BURST_RATE), setup, deployment)
  if lo is None or not 0 < lo < hi:
    lo = hi / 4

  def att(rate):
    return simulate(make_requests(rate), setup, deployment, ttft_slo, tpot_slo).attainment(
        ttft_slo, tpot_slo)

  return metrics.goodput_search(att, target, lo, hi, tol, grow=False)


def setup_from_config(cfg, base_dir: str = ".") -> Setup:
  """A `Setup` from a config's `model` preset, `hardware`, `latency` ("distserve",
  "roofline" or a fitted JSON relative to `base_dir`), `page_size` and
  `memory_utilization`."""
  model, hw = get_preset(cfg.model), get_hardware(cfg.hardware)
  kind = cfg.latency
  if kind not in ("distserve", "roofline"):
    kind = os.path.join(base_dir, kind)
  return Setup(model, hw, latency_source(kind, model, hw), page_size=cfg.page_size,
               memory_utilization=cfg.memory_utilization)


def deployment_from_config(cfg):
  """A deployment from a config's `mode` and its fields (see `configs/simulate_*`)."""
  def inst(c):
    return InstanceSpec(c.tp, c.pp, c.max_batch, c.max_tokens)

  if cfg.mode == "colocated":
    return Colocated(inst(cfg.instance), cfg.replicas, cfg.policy)
  if cfg.mode == "disaggregated":
    return Disaggregated(inst(cfg.prefill), inst(cfg.decode), cfg.num_prefill, cfg.num_decode,
                         cfg.same_node)
  if cfg.mode == "semi_pd":
    return SemiPD(inst(cfg.instance), cfg.replicas, cfg.prefill_share, cfg.concurrent,
                  ShareScaling(*cfg.prefill_scaling), ShareScaling(*cfg.decode_scaling),
                  dict(cfg.partitioner) if cfg.dynamic else None)
  raise ValueError(f"mode must be colocated, disaggregated or semi_pd, got {cfg.mode!r}")
