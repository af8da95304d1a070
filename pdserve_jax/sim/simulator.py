"""Discrete-event simulator: the serving coordinators on a virtual clock.

The latency-model executor. It drives the same coordinator and scheduler objects
as the engine (`core/coordinator.py`, `core/policies.py`), advancing a
virtual clock by a `LatencyModel`'s step times instead of running programs, so
the planner judges the policies that serve. Deployments are `pdserve_jax.core.deploy`'s
(re-exported here); `PhaseOnly` measures one phase alone, as DistServe's planner
does.

Each instance's KV capacity is its devices' HBM times `memory_utilization`, minus
one copy of the weights (or `Setup.kv_tokens`). An instance with pp pipeline
stages runs pp schedulers on slices of its pool so that pp steps are in flight
(see `_Pipe`). `Replay` drives a run with the event times an engine logged, so the
two executors can be compared decision by decision.

SM-partitioned semi-PD (`SemiPD(concurrent=True)`) runs both phases of a replica at
once; a step's time is its time alone stretched by its phase's slowdown at the
share it gets (`core.share.SmShares`), which changes when the other phase starts
or stops a step, so a step in flight is re-timed then from the work it has left.

`Setup.distserve_compat` reproduces DistServe's own simulator (simdistserve) where
its conventions differ from ours: a request's output length counts the decode
steps after the prefill's token (ours counts that token too), and a decode step
attends over at most 50,000 tokens. Off by default; see `docs/fidelity.md`.

KV copies: a whole-request copy takes the link's latency plus its bytes over the
bandwidth, from the hand-off. A layer-wise stream (`Disaggregated.kv_transfer`)
moves `layer_groups` equal groups one after another over the link, each leaving
when the prefill has computed its layers (the step's time split evenly over the
groups): it ends at max(prefill end + one group's copy, first group's end + every
group's copy), each group paying the link latency. Elastic deployments need no
more here: their coordinator moves instances between roles on the same pipes.
Every copy (whole, streamed or migrated) moves only the pages the destination's
prefix cache lacks (`copy_skip`).
Limits: KV copies do not contend for links or for the compute they overlap with;
a step's stages are equal (the latency model's time / pp each), and a prefill in
layer groups costs what the latency model says of the whole step.

Back-to-back decode steps: most events are a decode instance's step ending with
its next step begun at once. For a decode instance of one stage alone on its pipe
(disaggregated; not elastic, replayed, SM-partitioned, shared-host or stretched),
a step that would end before any other event is handled at once instead of through
the heap, and a run of steps that decode the same batch with nothing to decide
(nobody finishes, joins or needs a page: `DecodeScheduler.steady`) ends together
(`skip`): each request gets its run's token times in one list extension. Nothing
else changes: the same steps, times and counters as one by one (tests compare
both). Of the 326,000 decode steps of Mooncake's first 10,000 requests (1 prefill +
1 decode instance), 292,000 end in such runs.

Prefix caching (`Setup.prefix_cache`, on by default) runs the engine's cache: each
request's `prefix_keys` come from its `blocks` (a trace's block hashes) at the
setup's page size, or are kept as an engine made them (a replay). Keys cost a
little per page: with Mooncake's 512-token blocks, pages of 512 tokens keep one
key per block (what `benchmarks/sim_speed.py` times).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import gc
import heapq
import itertools
import math
from typing import Callable, Optional, Sequence

# The deployment types, for callers that reach them through the simulator.
from pdserve_jax.core.deploy import (Colocated, Disaggregated, InstanceSpec, PhaseOnly,  # noqa: F401
                                SemiPD)
from pdserve_jax.core.pages import PageAllocator
from pdserve_jax.model.config import ModelConfig
from pdserve_jax.core import coordinator as C
from pdserve_jax.core import metrics
from pdserve_jax.core.prefix import Blocks, block_keys
from pdserve_jax.core.request import Request
from pdserve_jax.core.step import DECODE, PREFILL
from pdserve_jax.sim.hardware import HardwareSpec
from pdserve_jax.sim.latency import LatencyModel, transfer_time


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
  # DistServe's simulator's conventions (module docstring); for cross-checks only.
  distserve_compat: bool = False
  # One host thread serves every instance's per-step host work (the latency model's
  # `step_overhead_s`), as this library's engine thread does: a step waits for it
  # while the host handles another instance's step. False: each instance has its own.
  shared_host: bool = False
  # Prefix caching in every pool (`core.pages`); requests need `blocks` or
  # `prefix_keys` to use it.
  prefix_cache: bool = True

  def __post_init__(self):
    if not 0 < self.memory_utilization <= 1:
      raise ValueError(f"memory_utilization must lie in (0, 1], got {self.memory_utilization}")
    if self.page_size < 1:
      raise ValueError(f"page_size must be >= 1, got {self.page_size}")
    if not self.overlap_slowdown > 0:
      raise ValueError(f"overlap_slowdown must be > 0, got {self.overlap_slowdown}")


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
  fraction per device group (per stage with pipelines), semi-PD share histories,
  preemptions, prefix-cache counters (`Coordinator.prefix_stats`), and with
  `record_steps` each instance's steps (`Step.describe`)."""
  requests: list[Request]
  makespan: float
  num_devices: int
  utilization: dict[str, float]
  share_history: dict[str, list[tuple[float, float]]]
  num_preemptions: int = 0
  steps: Optional[dict[str, list[tuple]]] = None
  # Prompt and output tokens prefilled again after preemptions.
  recomputed_tokens: int = 0
  # Per device group, the largest share of its KV pool held when a step started.
  peak_kv: dict[str, float] = dataclasses.field(default_factory=dict)
  prefix: Optional[dict] = None

  def attainment(self, ttft_slo: float, tpot_slo: float) -> float:
    return metrics.attainment(self.requests, ttft_slo, tpot_slo)

  def summary(self, ttft_slo: Optional[float] = None,
              tpot_slo: Optional[float] = None) -> dict:
    out = metrics.summarize(self.requests, ttft_slo, tpot_slo)
    out.update(num_devices=self.num_devices, makespan_s=self.makespan,
               utilization=self.utilization, num_preemptions=self.num_preemptions,
               recomputed_tokens=self.recomputed_tokens, peak_kv=self.peak_kv,
               share_history={k: [list(p) for p in v] for k, v in self.share_history.items()},
               prefix_cache=self.prefix)
    return out


@dataclasses.dataclass
class Replay:
  """Event times an engine logged, to re-run its decisions on the virtual clock:
  when each request was seen (by id), when each instance's k-th step ended and
  the device seconds it took, and when each request's k-th KV copy landed."""
  arrivals: dict
  steps: dict  # instance name -> [(finished, seconds)]
  copies: dict  # request id -> [time]


class _Pipe:
  """The devices of one group, as `pp` pipeline stages.

  The latency model gives a step's time in one stage (the whole time / pp). A step
  enters when the first stage is free and spends its stage time in every stage in
  turn; it overtakes nothing, so behind a slower step it finishes one stage time
  after that one (a proportionate flow shop: completion = max(entry + pp * stage,
  previous completion + stage)). To keep pp steps in flight while each scheduler has
  one, a group runs pp schedulers (vLLM's virtual engines), each with 1/pp of the
  KV pool.
  """
  __slots__ = ("name", "pp", "sim", "free_at", "last_done", "waiting", "busy_time",
               "wake_at", "model", "resume", "decode_time", "peak_held")

  def __init__(self, name, pp, sim, model, resume):
    self.name, self.pp, self.sim, self.model, self.resume = name, pp, sim, model, resume
    # A decode step's time straight from the totals, when the model times steps by
    # them (most steps decode; this skips a dispatch per step).
    self.decode_time = (model.decode_totals if model is not None
                        and type(model).step_time is LatencyModel.step_time else None)
    self.free_at = -math.inf
    self.last_done = -math.inf
    self.waiting = collections.deque()
    self.busy_time = 0.0  # per stage
    self.wake_at = None
    self.peak_held = -1  # the most KV pages held when a step started here

  def wait(self, inst):
    if inst not in self.waiting:
      self.waiting.append(inst)
    if self.wake_at != self.free_at:
      self.wake_at = self.free_at
      self.sim.at(self.free_at, self._wake, None)

  def _wake(self, now, _):
    self.wake_at = None
    waiting = self.waiting
    while waiting and self.free_at <= now:
      self.resume(waiting.popleft(), now)
    if waiting:
      self.wait(waiting[0])


class _Simulation:
  """The virtual clock: an event heap merged with the sorted arrivals."""

  def __init__(self):
    self.heap = []
    self.seq = itertools.count()
    self.next_arrival = math.inf  # the time of the arrival not yet handled

  def at(self, t, fn, arg):
    heapq.heappush(self.heap, (t, next(self.seq), fn, arg))

  def first(self, t) -> bool:
    """Whether an event pushed now at `t` would be the next one handled (before any
    other at or before `t`, and before arrivals at `t`)."""
    return (not self.heap or self.heap[0][0] > t) and t <= self.next_arrival

  def run(self, reqs, times, on_arrival):
    heap, pop = self.heap, heapq.heappop
    i, n = 0, len(reqs)
    self.next_arrival = times[0] if n else math.inf
    while i < n or heap:
      if heap and (i == n or heap[0][0] <= times[i]):
        t, _, fn, arg = pop(heap)
        fn(t, arg)
      else:
        i += 1
        self.next_arrival = times[i] if i < n else math.inf
        on_arrival(reqs[i - 1], times[i - 1])


class LatencyExecutor:
  """Carries out a coordinator's steps and copies on the virtual clock."""

  def __init__(self, setup: Setup, dep, sim: _Simulation, replay: Optional[Replay] = None,
               record_steps: bool = False):
    self.setup, self.sim, self.replay = setup, sim, replay
    self.pipes: dict[str, _Pipe] = {}
    self.coord = None
    self.steps = collections.defaultdict(list) if record_steps or replay else None
    self._copies = collections.defaultdict(int)
    self._stretch = setup.overlap_slowdown != 1.0 and replay is None
    # SM-partitioned semi-PD: per replica, phase -> its step in flight,
    # [instance, base seconds left, slowdown, since, version, started].
    self._sm = isinstance(dep, SemiPD) and dep.concurrent
    self._flight: dict = collections.defaultdict(dict)
    self.recomputed_tokens = 0
    self._peak: dict[str, tuple[int, int]] = {}  # group -> (pages held, capacity)
    self._host_free = -math.inf  # with a shared host: when it is next free
    self._chained: set = set()  # see `bind`
    if isinstance(dep, Disaggregated):
      # Each device pair moves its shard of the KV at once.
      self.kv_bytes = setup.model.kv_bytes_per_token(setup.dtype_bytes)
      self.bandwidth = setup.hardware.link_bandwidth(dep.same_node) * min(
          dep.prefill.num_devices, dep.decode.num_devices)
      self.layer_groups = dep.layer_groups

  # -- the executor seam -------------------------------------------------------------

  def allocator(self, group: str, spec: InstanceSpec, fraction: float) -> PageAllocator:
    setup = self.setup
    tokens = int(kv_capacity_tokens(setup, spec.tp, spec.pp) * fraction)
    return PageAllocator(max(1, tokens // setup.page_size), setup.page_size,
                         prefix_cache=setup.prefix_cache)

  def bind(self, coord) -> None:
    """One pipe per device group of `coord`'s instances."""
    self.coord = coord
    models = {}
    for inst in coord.instances:
      s = inst.spec
      if inst.group not in self.pipes:
        if (s.tp, s.pp) not in models:
          models[s.tp, s.pp] = self.setup.latency(s.tp, s.pp)
        self.pipes[inst.group] = _Pipe(inst.group, s.pp, self.sim, models[s.tp, s.pp],
                                       self._resume)
    # Decode instances whose steps may run back to back (`_done`): alone on their
    # pipe of one stage, timed from the decode totals, in a coordinator that
    # `repeats` them, on an unreplayed clock with no shared host, SM shares or stretch.
    simple = (self.replay is None and not self._sm and not self._stretch
              and not self.setup.shared_host)
    per_group = collections.Counter(inst.group for inst in coord.instances)
    self._chained = {inst for inst in coord.instances
                     if simple and coord.repeats(inst) and per_group[inst.group] == 1
                     and self.pipes[inst.group].pp == 1
                     and self.pipes[inst.group].decode_time is not None}

  def _resume(self, inst, now):
    self.coord.resume(inst, now)

  def can_launch(self, inst, now) -> bool:
    pipe = self.pipes[inst.group]
    if pipe.free_at > now and self.replay is None:
      pipe.wait(inst)
      return False
    return True

  def _note_peak(self, pipe, inst) -> None:
    alloc = inst.sched.allocator
    held = alloc.capacity - alloc.num_free
    if held > pipe.peak_held:
      pipe.peak_held = held
      self._peak[inst.group] = (held, alloc.capacity)

  def launch(self, inst, step, now) -> None:
    timed = self._start(inst, step, now)
    if timed is None:
      return
    done, stage = timed
    self.sim.at(done, self._done, (inst, stage))
    if step.streams:
      # The step computes its layer groups in turn over its last stage * pp seconds.
      pipe, k = self.pipes[inst.group], self.layer_groups
      first_group = done - stage * pipe.pp * (k - 1) / k
      for req, dst in step.streams:
        group = self._copy_time(req, dst, k)
        self.sim.at(max(done + group, first_group + k * group), self._copied, req)

  def _start(self, inst, step, now) -> Optional[tuple[float, float]]:
    """Starts `step` on `inst`'s pipe at `now`: (when it ends, its stage seconds),
    or None when its end is already on the clock (replayed, or SM-partitioned)."""
    pipe = self.pipes[inst.group]
    self._note_peak(pipe, inst)
    if self.steps is not None:
      self.steps[inst.name].append(step.describe())
    if self.replay is not None:
      done, seconds = self.replay.steps[inst.name][len(self.steps[inst.name]) - 1]
      pipe.busy_time += seconds
      self.sim.at(done, self._done, (inst, seconds))
      for req, _ in step.streams:
        self._replayed_copy(req)
      return None
    for c in step.prefills:
      if c.request.num_preemptions:
        self.recomputed_tokens += c.end - c.start
    if step.prefills or pipe.decode_time is None:
      stage = pipe.model.step_time(step, inst.sched.allocator.pages)
    else:
      stage = pipe.decode_time(len(step.decodes), step.decode_context)
    if self._sm:
      self._flight[inst.unit][inst.phase] = [inst, stage, 1.0, now, 0, now]
      self._retime(inst.unit, now)
      return None
    if self.setup.shared_host:
      # The step's host part runs when the one host thread is free; it waits until then.
      start = max(now, self._host_free)
      self._host_free = start + getattr(pipe.model, "step_overhead_s", 0.0)
      stage += start - now
    if self._stretch:
      stage = self._overlap(pipe, now, stage)
    pipe.free_at = now + stage
    pipe.busy_time += stage
    done, behind = now + stage * pipe.pp, pipe.last_done + stage
    if behind > done:
      done = behind
    pipe.last_done = done
    return done, stage

  def _done(self, now, arg):
    inst, stage = arg
    if inst not in self._chained:
      self.coord.step_done(inst, now, stage)
      return
    # Back to back: while `inst`'s next step would end before any other event, that
    # step's end is handled here at once, as the heap would hand it back next: the
    # same events in the same order, without the general path and the heap. A step
    # that finishes nobody (`Coordinator.repeat`) is followed by its scheduler's
    # next one, launched here; runs of steps that decode the same batch with nothing
    # else to decide (`steady`) end together (`Coordinator.skip`).
    coord, sim, sched = self.coord, self.sim, inst.sched
    pipe = self.pipes[inst.group]
    decode_time, steps = pipe.decode_time, self.steps
    popped = True  # events ran during the step in flight: pages may have been taken
    while True:
      # `inst`'s step in flight ends at `now`.
      m = sched.steady()
      if m:
        if popped:
          self._note_peak(pipe, inst)  # as `_start` does; the run changes no pages
        step = inst.step
        batch, ctx = len(step.decodes), step.decode_context
        desc = step.describe() if steps is not None else None
        times = [now]
        while True:  # the next step begins at times[-1]
          ctx += batch
          stage = decode_time(batch, ctx)
          done = times[-1] + stage
          pipe.busy_time += stage
          if desc is not None:
            steps[inst.name].append(desc)
          if len(times) == m or not sim.first(done):
            break
          times.append(done)
        coord.skip(inst, times)
        pipe.free_at = pipe.last_done = done
      else:
        step = coord.repeat(inst, now, stage)
        if step is None:
          return
        timed = self._start(inst, step, now)
        assert timed is not None  # a chained instance is neither replayed nor SM-shared
        done, stage = timed
      if not sim.first(done):
        sim.at(done, self._done, (inst, stage))
        return
      now, popped = done, False

  def _copy_time(self, req, dst, parts: int = 1) -> float:
    """Seconds to move one of `parts` equal shares of `req`'s KV (its prefill's, or
    all it has cached when it migrates between decode instances) over the link, but
    for the leading pages `dst`'s prefix cache holds already (`copy_skip`)."""
    tokens = max(req.kv_len, req.prefill_len) - dst.sched.copy_skip(req) * self.setup.page_size
    return transfer_time(max(tokens, 0) * self.kv_bytes / parts, self.bandwidth,
                         self.setup.hardware.link_latency_s)

  def _replayed_copy(self, req) -> None:
    k = self._copies[req.request_id]
    self._copies[req.request_id] = k + 1
    self.sim.at(self.replay.copies[req.request_id][k], self._copied, req)

  def _retime(self, unit, now) -> None:
    """Re-times the steps in flight on `unit` (SM partitioning) at the shares the
    phases busy now give them: each keeps the work it has left."""
    flight = self._flight[unit]
    busy = PREFILL in flight, DECODE in flight
    for phase, rec in flight.items():
      inst, left, factor, since, version, started = rec
      left = max(left - (now - since) / factor, 0.0)
      factor = unit.slowdown(phase, *busy)
      rec[1:5] = [left, factor, now, version + 1]
      done = now + left * factor
      self.pipes[inst.group].free_at = done
      self.sim.at(done, self._sm_done, (unit, phase, version + 1))

  def _sm_done(self, now, arg):
    unit, phase, version = arg
    rec = self._flight[unit].get(phase)
    if rec is None or rec[4] != version:
      return  # re-timed since
    del self._flight[unit][phase]
    inst, seconds = rec[0], now - rec[5]
    self.pipes[inst.group].busy_time += seconds
    self.coord.step_done(inst, now, seconds)
    self._retime(unit, now)  # the other phase may run alone now, or at new caps

  def start_copy(self, req, src, dst, now) -> None:
    if self.replay is not None:
      self._replayed_copy(req)
      return
    self.sim.at(now + self._copy_time(req, dst), self._copied, req)

  def _copied(self, now, req):
    self.coord.copy_done(req, now)

  def _overlap(self, me, now, stage):
    """A step runs `overlap_slowdown` times slower while another group is busy.
    Only the work already in flight elsewhere counts (later steps there stretch
    themselves)."""
    slowdown = self.setup.overlap_slowdown
    busy = max((p.free_at for p in self.pipes.values() if p is not me), default=now) - now
    if busy <= 0:
      return stage
    if stage * slowdown <= busy:
      return stage * slowdown
    return busy + stage - busy / slowdown


def simulate(requests: Sequence[Request], setup: Setup, deployment,
             ttft_slo: Optional[float] = None, tpot_slo: Optional[float] = None,
             replay: Optional[Replay] = None, record_steps: bool = False) -> SimResult:
  """Runs fresh copies of `requests` through `deployment` and returns them finished.

  `ttft_slo` and `tpot_slo` (s) are needed only by semi-PD's online partitioner.
  Raises DoesNotFit when the weights or the longest request do not fit an instance.
  """
  if not requests:
    raise ValueError("no requests to simulate")
  if setup.distserve_compat:
    requests, deployment = _distserve_conventions(requests, deployment)
  if replay is None:
    reqs = sorted((r.fresh() for r in requests), key=lambda r: r.arrival_time)
    times = [r.arrival_time for r in reqs]
  else:
    reqs = sorted((r.fresh() for r in requests), key=lambda r: replay.arrivals[r.request_id])
    times = [replay.arrivals[r.request_id] for r in reqs]
  if setup.prefix_cache:
    for r in reqs:
      if r.blocks is not None and r.prefix_keys is None:
        r.prefix_keys = _keys(r.blocks, r.prompt_len, setup.page_size)
  if isinstance(deployment, Disaggregated) and deployment.streams_kv:
    deployment.check_layers(setup.model.num_layers)
  sim = _Simulation()
  ex = LatencyExecutor(setup, deployment, sim, replay, record_steps)
  coord = C.build(deployment, ex, ttft_slo, tpot_slo, start_time=times[0])
  try:
    coord.check(max(reqs, key=lambda r: r.lifetime_tokens))
  except ValueError as e:
    raise DoesNotFit(str(e)) from None
  # The run allocates many short-lived objects and makes no reference cycles worth
  # collecting mid-run; pausing the cyclic collector saves a tenth of the time.
  gc_was_enabled = gc.isenabled()
  gc.disable()
  try:
    sim.run(reqs, times, coord.add)
  finally:
    if gc_was_enabled:
      gc.enable()
  start = reqs[0].arrival_time
  end = max((r.finish_time for r in reqs if r.finish_time is not None), default=start)
  span = end - start
  util = {name: (p.busy_time / span if span > 0 else 0.0) for name, p in ex.pipes.items()}
  return SimResult(reqs, span, deployment.num_devices, util, coord.share_history(),
                   coord.num_preemptions, dict(ex.steps) if ex.steps is not None else None,
                   ex.recomputed_tokens, {g: h / c for g, (h, c) in ex._peak.items()},
                   coord.prefix_stats())


@functools.lru_cache(maxsize=1 << 16)
def _keys(blocks: Blocks, prompt_len: int, page_size: int) -> tuple:
  """`block_keys`, kept: the planner simulates one workload many times."""
  return tuple(block_keys(blocks, prompt_len, page_size))


# simdistserve/base/worker.py, Worker._enter_decodes: "decode_max_tokens = 50000",
# marked there as a temporary hack, whatever the parallelism and memory.
DISTSERVE_DECODE_CAP = 50_000


def _distserve_conventions(requests, deployment):
  """`requests` and `deployment` as DistServe's simulator runs them: an output
  length of L runs L decode steps after the prefill (its Request.should_finish:
  counter >= output_lens, the counter starting at 0 after the prefill), so L + 1
  tokens in our count; decode steps capped at `DISTSERVE_DECODE_CAP` tokens."""
  reqs = [Request(r.request_id, r.prompt_len, r.max_tokens + 1, r.arrival_time, r.payload)
          for r in requests]
  capped = lambda spec: dataclasses.replace(
      spec, max_decode_tokens=spec.max_decode_tokens or DISTSERVE_DECODE_CAP)
  if isinstance(deployment, Disaggregated):
    dep = dataclasses.replace(deployment, prefill=capped(deployment.prefill),
                              decode=capped(deployment.decode))
  else:
    dep = dataclasses.replace(deployment, instance=capped(deployment.instance))
  return reqs, dep
