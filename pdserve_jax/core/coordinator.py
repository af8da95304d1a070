"""Mode coordinators: who serves a request where, written once for both executors.

A coordinator owns a deployment's per-instance schedulers and decides everything
above them: which instance an arrival joins, when a finished prompt's KV moves to
which decode instance (the decode side pulls when it has pages, DistServe's way),
where a preempted request is recomputed, which semi-PD phase runs next and how
the partitioner moves the share, and how an abort or a failed step ends requests.

It reaches devices only through an executor (`core.seam.Executor`): a page
allocator per device group, `can_launch` / `launch` a step (later `step_done` or
`fail`), `start_copy` a request's KV (later `copy_done`), or with layer-wise
streaming a step that carries KV copies out as it runs (`Step.streams`; each later
`copy_done`, before or after the step's `step_done`). The executor calls
`lose(inst, now)` when an instance's devices are gone (a worker process died): no
new work goes to it, and the requests there end with an error, except in the
disaggregated mode, where they are recomputed on a live prefill instance from
their prompt and the tokens already produced (as after a preemption: nothing is
produced twice). A KV copy that fails is recomputed the same way, up to
`MAX_RECOMPUTES` times per request. `readmit(inst, now)` takes an instance back
(its worker restarted, with an empty pool). Every
request that ends (finished, aborted or failed) is passed to `on_end(req, now)`,
the engine's hook for waking its caller.
The JAX executor (`serving.executor`) runs real programs on the wall clock; the
latency-model executor (`sim.simulator`) advances a virtual clock. Both call the
same entry points in the order events happen, so one trace gives one sequence of
decisions in both (tests check this step by step).

Prefix caching (`docs/prefix_cache.md`). Cache-aware routing (`routing`
"cache_aware", the default): when some candidate instance holds part of the
arrival's prompt in its prefix cache, the arrival goes to the one with the lowest
prefill backlog, `backlog = queued prompt tokens + uncached prompt tokens of this
request` (Mooncake's Conductor estimates TTFT this way, in time; llm-d's and
SGLang's routers weigh the same two things): the tokens that instance must compute
before this request's first token. Ties go to the least loaded. When no candidate
holds any of it, the least loaded wins, as with "least_loaded". The score ignores
decode load: colocated replicas with one hot prefix can be unbalanced by it.
Conditional disaggregation is `DisaggregatedCoordinator`'s.
"""

from __future__ import annotations

import collections
from typing import TYPE_CHECKING, Callable, Optional

from pdserve_jax.core import deploy
from pdserve_jax.core.policies import (ChunkedPrefillScheduler, DecodeScheduler,
                                          PrefillFirstScheduler, PrefillScheduler,
                                          cached_tokens, check_fits, least_loaded,
                                          move_handoffs)
from pdserve_jax.core.request import Request
from pdserve_jax.core.share import (ModelPartitioner, ModelPartitionerConfig, PartitionerConfig,
                                   ShareController, SloPartitioner, SmShares)
from pdserve_jax.core.step import DECODE, PREFILL, Step

if TYPE_CHECKING:
  from pdserve_jax.core.seam import Executor

OnEnd = Callable[[Request, float], None]
# Recomputations after lost instances or failed KV copies, per request, before it
# fails: a copy that keeps failing must not loop forever.
MAX_RECOMPUTES = 3


class Instance:
  """One scheduler on one device group (a mesh, or in the simulator a pipeline's
  virtual engine)."""
  __slots__ = ("name", "group", "sched", "spec", "phase", "step", "unit", "lost")

  def __init__(self, name, group, sched, spec, phase=None):
    self.name, self.group, self.sched, self.spec, self.phase = name, group, sched, spec, phase
    self.step: Optional[Step] = None
    self.unit = None  # semi-PD: the replica both phases belong to (`_Unit`)
    self.lost = False  # its devices are gone: it takes no more work

  @property
  def num_waiting(self) -> int:
    return self.sched.num_waiting

  @property
  def num_running(self) -> int:
    return self.sched.num_running

  def __repr__(self):
    return f"Instance({self.name})"


def _virtual(group: str, v: int, pp: int) -> str:
  return group if pp == 1 else f"{group}.{v}"


class Coordinator:
  """The shared machinery; one subclass per mode."""

  def __init__(self, ex: Executor, on_end: Optional[OnEnd] = None,
               routing: str = "cache_aware"):
    self.ex = ex
    self.on_end = on_end
    self.routing = routing
    self.instances: list[Instance] = []
    self._copies: dict[Request, tuple[Instance, Instance]] = {}
    self.cache_routed = 0  # arrivals placed by the backlog score (a cache held some)

  # -- entry points the executors call -------------------------------------------

  def check(self, req: Request) -> None:
    """Raises ValueError when `req` could never be served (does not fit a pool)."""
    for inst in self._entry_instances():
      check_fits(inst.sched.allocator, req, req.lifetime_tokens, self._pool_name(inst))

  def add(self, req: Request, now: float) -> None:
    """An arrival; raises ValueError (and keeps nothing) if it cannot be served.
    Here: queued on the instance `routing` picks among those still alive."""
    inst = self._place(self.instances, req, "instance")
    inst.sched.add(req)
    self._launch(inst, now)

  def step_done(self, inst: Instance, now: float, seconds: float) -> None:
    """`inst`'s step finished at `now` after `seconds` of device time; the executor
    has marked stop tokens (and cancelled requests whose results were bad)."""
    step, inst.step = inst.step, None
    finished = inst.sched.complete(step, now)
    if finished:
      self._end(finished, now)
    self._after_step(inst, finished, now, seconds)

  def repeats(self, inst: Instance) -> bool:
    """Whether this coordinator does nothing after a step of `inst` that finished
    nobody but launch `inst`'s next step (so `repeat` may stand for `step_done`)."""
    return False

  def repeat(self, inst: Instance, now: float, seconds: float) -> Optional[Step]:
    """`step_done`, for an executor that launches `inst`'s next step itself when the
    step finished nobody (`repeats(inst)` must hold, and the executor's `can_launch`
    be true): then the next step is scheduled and returned (None: none), launched by
    the caller; otherwise all of `step_done` is done and None returned."""
    step, inst.step = inst.step, None
    finished = inst.sched.complete(step, now)
    if finished:
      self._end(finished, now)
      self._after_step(inst, finished, now, seconds)
      return None
    if inst.lost:
      return None
    nxt = inst.sched.schedule()
    return nxt if self._take_step(inst, nxt, now) else None

  def skip(self, inst: Instance, times) -> Step:
    """`repeat` at each of `times`, at once, for steps that decode the same batch
    with nothing else to decide: `inst`'s step and those its scheduler begins after
    it end at `times` (at most `inst.sched.steady()` of them, so each finishes
    nobody); the next step is begun and returned (`repeats(inst)` must hold)."""
    inst.step = inst.sched.skip(times)
    return inst.step

  def fail(self, inst: Instance, now: float) -> None:
    """`inst`'s step could not run: its requests end with an error, the rest go on."""
    assert inst.step is not None, f"{inst.name} has no step in flight"
    for r in inst.step.requests:
      if r.end_reason is None:
        r.end_reason = "error"
    self.step_done(inst, now, 0.0)

  def lose(self, inst: Instance, now: float) -> None:
    """`inst`'s devices are gone: its step fails, every request it holds ends with an
    error (but those in a KV copy, which the executor ends when the copy fails),
    and it takes no more work. Its pages are freed, as it holds nothing now."""
    inst.lost = True
    if inst.step is not None:
      self.fail(inst, now)
    for r in inst.sched.held():
      if r in self._copies or r.finish_time is not None:
        continue
      r.end_reason = r.end_reason or "error"
      if inst.sched.remove(r):
        r.finish_time = now
        self._end([r], now)
    self._relaunch(now)

  def readmit(self, inst: Instance, now: float) -> None:
    """`inst`'s devices are back (its worker process restarted, with an empty pool):
    it takes work again."""
    if not inst.lost:
      return
    inst.lost = False
    # The pool came back empty: no page registered before the loss may be mapped
    # again (its KV is gone), so the prefix cache forgets them.
    inst.sched.allocator.forget()
    self._relaunch(now)

  def unservable(self) -> Optional[str]:
    """Why no arrival can be served now (every instance of a role it needs is lost),
    or None. Read from any thread: it reads only the instances' lost marks."""
    return None if self._alive(self.instances) else "every instance is lost"

  def _alive(self, instances) -> list[Instance]:
    return [i for i in instances if not i.lost]

  def _pick(self, instances, what: str) -> Instance:
    """The least-loaded of `instances` still alive; ValueError when none is."""
    inst = least_loaded(self._alive(instances))
    if inst is None:
      raise ValueError(f"every {what} is lost")
    return inst

  def _place(self, candidates, req: Request, what: str,
             sched_of=lambda c: c.sched):
    """Where an arrival goes among `candidates` still alive: cache-aware routing (see
    the module docstring) or the least loaded; ValueError when none is alive."""
    alive = self._alive(candidates)
    if self.routing == "cache_aware" and len(alive) > 1 and req.prefix_keys:
      best = by_backlog(alive, req, sched_of)
      if best is not None:
        self.cache_routed += 1
        return best
    return self._pick(alive, what)

  def _end_with_error(self, reqs, now: float) -> None:
    """`reqs`, held nowhere now, end (with an error unless they had a reason)."""
    for r in reqs:
      r.end_reason, r.finish_time = r.end_reason or "error", now
    self._end(reqs, now)

  def copy_done(self, req: Request, now: float, failed: bool = False) -> None:
    raise RuntimeError(f"{type(self).__name__} starts no KV copies")

  def resume(self, inst: Instance, now: float) -> None:
    """`inst`'s devices became free."""
    self._launch(inst, now)

  def abort(self, req: Request, now: float, reason: str = "aborted") -> None:
    """Ends `req` wherever it is: at once when queued or between steps, when its
    step completes when one is running, when its KV copy lands when in transfer.
    Its pages are freed on every pool."""
    if req.finish_time is not None:
      return
    if req.end_reason is None:
      req.end_reason = reason
    if req in self._copies:
      return
    for inst in self.instances:
      held = inst.sched.remove(req)
      if held is None:
        continue
      if held:
        req.finish_time = now
        self._end([req], now)
        self._relaunch(now)
      return

  # -- state ----------------------------------------------------------------------

  @property
  def idle(self) -> bool:
    return not self._copies and all(i.sched.idle for i in self.instances)

  @property
  def num_preemptions(self) -> int:
    return sum(i.sched.num_preemptions for i in self.instances)

  def allocators(self) -> list:
    out: list = []
    for i in self.instances:
      if all(a is not i.sched.allocator for a in out):
        out.append(i.sched.allocator)
    return out

  def share_history(self) -> dict:
    return {}

  def role_stats(self) -> dict:
    """With elastic roles, the instances serving each phase and the moves made."""
    return {}

  def prefix_stats(self) -> dict:
    """Prefix-cache counters over every pool (`PageAllocator.cache_stats`), their
    rates, and this coordinator's decisions: arrivals routed by the cache, and (when
    disaggregated) local prefills, the pages KV copies moved and did not move, and
    the copies streamed layer by layer."""
    allocs = self.allocators()
    out: dict = {"enabled": any(a.prefix_cache for a in allocs)}
    for a in allocs:
      for k, v in a.cache_stats().items():
        out[k] = out.get(k, 0) + v
    out["hit_rate"] = out["hit_tokens"] / out["lookup_tokens"] if out["lookup_tokens"] else 0.0
    out["request_hit_rate"] = out["hit_lookups"] / out["lookups"] if out["lookups"] else 0.0
    out["cache_routed"] = self.cache_routed
    out.update(self._more_stats())
    return out

  def _more_stats(self) -> dict:
    return {}

  def copy_pairs(self) -> list[tuple[str, str]]:
    """(source group, destination group) of every KV copy this coordinator may start."""
    return []

  # -- shared pieces ----------------------------------------------------------------

  def _entry_instances(self) -> list[Instance]:
    return self.instances[:1]

  def _pool_name(self, inst: Instance) -> str:
    return ""

  def _after_step(self, inst, finished, now, seconds) -> None:
    self._launch(inst, now)

  def _relaunch(self, now: float) -> None:
    for inst in self.instances:
      self._launch(inst, now)

  def _launch(self, inst: Instance, now: float) -> bool:
    """Starts `inst`'s next step if it is free and has work."""
    if inst.step is not None or inst.lost or not self.ex.can_launch(inst, now):
      return False
    step = inst.sched.schedule()
    if not self._take_step(inst, step, now):
      return False
    self.ex.launch(inst, step, now)
    return True

  def _take_step(self, inst: Instance, step: Optional[Step], now: float) -> bool:
    """`step`, just scheduled on `inst`, becomes its step in flight, about to launch
    (False: None, nothing to launch); requests its scheduling preempted go to be
    recomputed first."""
    if inst.phase == DECODE:
      preempted = inst.sched.take_preempted()
      if preempted:
        self._recompute(inst, preempted, now)
    if step is None:
      return False
    inst.step = step
    self._prepare(inst, step, now)
    return True

  def _prepare(self, inst: Instance, step: Step, now: float) -> None:
    """`step` is about to launch on `inst` (a mode may attach KV streams to it)."""

  def _recompute(self, inst: Instance, reqs: list[Request], now: float) -> None:
    raise RuntimeError(f"{inst.name} preempted requests with nowhere to recompute them")

  def _end(self, reqs, now: float) -> None:
    on_end = self.on_end
    if reqs and on_end is not None:
      for r in reqs:
        on_end(r, now)

  def _make(self, prefix: str, spec, k: int, make_sched, phase=None) -> list[Instance]:
    """Replica `k` of `spec`: `spec.pp` virtual engines on one device group, each
    with its scheduler over 1/pp of the group's KV pool."""
    group = f"{prefix}{k}"
    out = [Instance(_virtual(group, v, spec.pp), group,
                    make_sched(self.ex.allocator(group, spec, 1.0 / spec.pp)), spec, phase)
           for v in range(spec.pp)]
    self.instances += out
    return out


def by_backlog(candidates, req: Request, sched_of=lambda c: c.sched):
  """The candidate with the lowest prefill backlog for `req` (queued prompt tokens
  plus `req`'s uncached ones; ties: the least loaded, then the first), or None when
  no candidate's cache holds any of `req`'s prompt."""
  best, best_key, any_hit = None, None, False
  for i, c in enumerate(candidates):
    sched = sched_of(c)
    hit = cached_tokens(sched.allocator, req)
    any_hit = any_hit or hit > 0
    key = (sched.pending_prefill_tokens() + req.prefill_len - hit,
           c.num_waiting + c.num_running, i)
    if best_key is None or key < best_key:
      best, best_key = c, key
  return best if any_hit else None


class ColocatedCoordinator(Coordinator):
  """Replicas serving both phases; arrivals placed by `dep.routing`."""

  def __init__(self, dep: deploy.Colocated, ex, on_end=None):
    super().__init__(ex, on_end, dep.routing)
    spec = dep.instance
    if dep.policy == "chunked":
      make: Callable = lambda a: ChunkedPrefillScheduler(a, spec.max_batch,
                                                         spec.max_step_tokens, spec.page_policy)
    else:
      make = lambda a: PrefillFirstScheduler(a, spec.max_batch, spec.max_step_tokens,
                                             spec.page_policy, spec.max_decode_tokens)
    for k in range(dep.replicas):
      self._make("colocated", spec, k, make)


class DisaggregatedCoordinator(Coordinator):
  """DistServe: prefill instances hand finished prompts to decode instances.

  The oldest finished prompt across all prefill instances moves first, to the
  least loaded decode instance that has pages for it; when none has, every
  hand-off waits in prefill memory (the pull stops, keeping FCFS). A request
  preempted on a decode instance goes back to the least loaded prefill instance,
  at the front of its queue, to recompute its KV.

  Prefix caching: prefill instances map cached prefixes; with `decode_cache`,
  decode instances keep a cache of the prompts handed to them and a copy moves
  only the pages the decode side lacks (whole, streamed or migrated alike: the
  destination's `copy_skip`). Conditional disaggregation
  (`conditional_threshold` > 0): an arrival first picks the decode instance it
  would join (by `routing`); if at most the threshold of its prompt tokens are
  uncached there, it is prefilled there and never visits a prefill instance. A
  request preempted on a decode instance is placed the same way.

  Layer-wise streaming (`kv_transfer="layerwise"`): when a prefill step launches and
  no hand-off waits, each request it finishes prefilling (oldest first, while decode
  pages last) gets its decode instance and pages at once, and its KV streams there
  with the step (`Step.streams`). It is admitted when the copy has landed and the
  step has ended, in either order (those that landed first, at the step's end in
  the step's order); its prefill pages are freed only then. A request that cannot
  be placed then (or ends with its first token) hands off as usual.
  """

  def __init__(self, dep: deploy.Disaggregated, ex, on_end=None):
    super().__init__(ex, on_end, dep.routing)
    p, d = dep.instance_specs()
    self.threshold = dep.conditional_threshold
    self.streaming = dep.streams_kv
    # Streamed copies settled before their step ended, and whether each failed.
    # Ordered, as every container the decisions walk: a set of requests iterates by
    # address, which differs between the engine and the simulator (and from run to run).
    self._landed: dict[Request, bool] = {}
    # Streams whose prefill step was dropped (its instance lost): their first token
    # never came, so their copies count as failed, whenever they settle.
    self._orphans: dict[Request, None] = {}
    self.prefills, self.decodes = [], []
    for k in range(dep.num_prefill):
      self.prefills += self._make("prefill", p, k, lambda a: PrefillScheduler(
          a, p.max_batch, p.max_step_tokens, p.page_policy), PREFILL)
    for k in range(dep.num_decode):
      self.decodes += self._make("decode", d, k, lambda a: DecodeScheduler(
          a, d.max_batch, d.page_policy, d.max_decode_tokens, self.threshold > 0,
          d.max_step_tokens), DECODE)
    if not dep.decode_cache:
      for inst in self.decodes:
        inst.sched.allocator.prefix_cache = False
    self.local_prefills = 0  # arrivals and recomputations prefilled on a decode instance
    self.copied_pages = 0  # pages KV copies moved
    self.copy_pages_saved = 0  # pages hand-offs found in a decode cache instead
    self.streams = 0  # KV copies that left with their prefill step (layer-wise)

  def _entry_instances(self):
    return [self.prefills[0], self.decodes[0]]  # every pool of a kind is alike

  def unservable(self):
    for what, insts in (("prefill", self.prefills), ("decode", self.decodes)):
      if not self._alive(insts):
        return f"every {what} instance is lost"
    return None

  def copy_pairs(self):
    return list(dict.fromkeys((p.group, d.group) for p in self.prefills for d in self.decodes))

  def _pool_name(self, inst):
    return inst.phase

  def add(self, req, now):
    self.check(req)
    if not self._alive(self.prefills):
      raise ValueError("every prefill instance is lost")
    if not self._alive(self.decodes):
      raise ValueError("every decode instance is lost")
    if self._local(req, now, fresh=True) is not None:
      return
    inst = self._place(self.prefills, req, "prefill instance")
    inst.sched.add(req)
    self._launch(inst, now)

  def _local(self, req: Request, now: float, fresh: bool) -> Optional[Instance]:
    """Conditional disaggregation: queues `req` for a prefill on the decode instance
    it would join when few enough of its tokens are uncached there; returns that
    instance (to launch), or None when `req` goes to a prefill instance."""
    if not self.threshold:
      return None
    decodes = self._alive(self.decodes)
    dst = None
    if self.routing == "cache_aware" and len(decodes) > 1 and req.prefix_keys:
      dst = by_backlog(decodes, req)
    dst = dst or least_loaded(decodes)
    if dst is None or req.prefill_len - cached_tokens(dst.sched.allocator, req) > \
        self.threshold:
      return None
    if fresh:
      dst.sched.add_local(req)
      self._launch(dst, now)
    else:
      dst.sched.requeue_local(req)  # its caller launches it
    self.local_prefills += 1
    return dst

  def _more_stats(self):
    return {"local_prefills": self.local_prefills, "kv_copy_pages": self.copied_pages,
            "kv_copy_pages_saved": self.copy_pages_saved, "kv_streams": self.streams}

  def repeats(self, inst):
    return inst.phase == DECODE  # `_after_step` below pulls only after finishes

  def _after_step(self, inst, finished, now, seconds):
    if self._landed and inst.phase == PREFILL:
      # In the step's order (its prefills were admitted oldest first), whichever
      # landed first: each admission may launch its decode instance's next step.
      landed = [r for r in self._landed if self._copies[r][0] is inst]
      for r in sorted(landed, key=lambda r: r.admitted_seq):
        self.copy_done(r, now, self._landed.pop(r))
    if inst.phase == PREFILL or finished:
      self._pull(now)
    self._launch(inst, now)

  def _sources(self) -> list[Instance]:
    """The instances whose memory may hold hand-offs."""
    return self._alive(self.prefills)

  def _home(self, src: Instance) -> Optional[Instance]:
    """A decode instance over `src`'s own pool, which takes its hand-offs in place."""
    return None

  def _prepare(self, inst, step, now):
    if not self.streaming or inst.phase != PREFILL:
      return
    if any(p.sched.peek_handoff() is not None for p in self._sources()):
      return  # older prompts wait for decode memory: they go first
    decodes = [d for d in self._alive(self.decodes) if d.group != inst.group]
    for c in step.prefills:
      r = c.request
      if not c.last or r.end_reason is not None or r.num_output + 1 >= r.max_tokens:
        continue  # it ends with its first token: nothing to stream
      dst = least_loaded(decodes, lambda d: d.sched.can_accept(r))
      if dst is None:
        break  # decode memory is full: the rest hand off when the step ends
      self._reserve(r, inst, dst)
      inst.sched.stream(r)
      step.streams.append((r, dst))
      self.streams += 1

  def _pull(self, now: float) -> None:
    decodes = self._alive(self.decodes)
    if not decodes:
      self._drop_handoffs(now)
      return
    while True:
      req: Optional[Request] = None
      src: Optional[Instance] = None
      for p in self._sources():
        h = p.sched.peek_handoff()
        if h is not None and (req is None or h.token_times[0] < req.token_times[0]):
          req, src = h, p
      if req is None or src is None:
        return
      home = self._home(src)
      if home is not None and home.sched.can_adopt(req):
        home.sched.adopt(src.sched.detach_handoff())
        self._launch(home, now)
        continue
      dst = least_loaded(decodes, lambda d: d.group != src.group and d.sched.can_accept(req))
      if dst is None:
        return  # decode memory is full: hand-offs wait in prefill memory
      src.sched.take_handoff()
      self._reserve(req, src, dst)
      self.ex.start_copy(req, src, dst, now)

  def _reserve(self, req: Request, src: Instance, dst: Instance) -> None:
    """Takes `req`'s pages on decode instance `dst` for a KV copy from `src` (a
    hand-off, a stream or a migration), mapping what `dst`'s cache holds: the copy
    moves only the pages after `dst.sched.copy_skip(req)`, which the executors
    honour, and the counters say how many pages moved and how many did not."""
    dst.sched.reserve(req)
    skip = dst.sched.copy_skip(req)
    self.copied_pages += len(src.sched.allocator.pages(req)) - skip
    self.copy_pages_saved += skip
    self._copies[req] = (src, dst)

  def copy_done(self, req, now, failed: bool = False):
    """`req`'s KV copy landed, or (`failed`) could not: then, or when its decode
    instance was lost meanwhile, it is recomputed (`_recompute_lost`). A copy
    streamed ahead of its prefill step's end is settled when that step ends: a
    failed one (across processes, a pull from a decode worker that was lost or timed
    out) is then recomputed as a failed hand-off is, unless its step failed too
    (then its request ended with the step's error)."""
    src, dst = self._copies[req]
    if src.step is not None and req in src.step.requests:
      self._landed[req] = failed  # streamed ahead of its step's end: settled when it ends
      return
    if req in self._orphans:
      del self._orphans[req]
      failed = True
    del self._copies[req]
    src.sched.release_handoff(req)
    if (failed or dst.lost) and not req.done:
      dst.sched.cancel_reserved(req)
      self._recompute_lost([req], now)
      self._pull(now)
    elif req.done:  # cancelled, or (streamed) ended with its first token
      dst.sched.cancel_reserved(req)
      req.finish_time = now
      self._end([req], now)
      self._pull(now)  # its decode pages are free again
    else:
      dst.sched.admit(req)
    self._launch(dst, now)
    self._launch(src, now)

  def lose(self, inst, now):
    """Every request `inst` held (but those in a KV copy, which `copy_done` settles)
    is recomputed on a live prefill instance, or ends with an error when none is
    left or it was recomputed `MAX_RECOMPUTES` times. The streams of its step in
    flight fail (its first tokens never come): those already landed now, the others
    when their copies settle."""
    inst.lost = True
    held = inst.sched.held()
    streams = [r for r, _ in inst.step.streams] if inst.step is not None else []
    if inst.step is not None:
      inst.step = None
      inst.sched.drop_step()  # its tokens never come: its requests go on elsewhere
    for r in streams:
      if r in self._landed:
        del self._landed[r]
        self.copy_done(r, now, failed=True)
      else:
        self._orphans[r] = None
    again = []
    if inst.phase == PREFILL:
      while (r := inst.sched.take_handoff()) is not None:
        inst.sched.release_handoff(r)
        again.append(r)
    for r in held:
      if r in self._copies or r.finish_time is not None:
        continue
      if inst.sched.remove(r):
        again.append(r)
    self._recompute_lost(again, now)
    self._relaunch(now)

  def _recompute_lost(self, reqs, now: float) -> None:
    """`reqs`, held nowhere now, start over on the least loaded live prefill
    instance: from the prompt when they produced nothing yet, else recomputing the
    prompt and their tokens (a preemption). Aborted ones, and those with nowhere
    to go (no live prefill, or no live decode instance), end."""
    target = least_loaded(self._alive(self.prefills)) if self._alive(self.decodes) else None
    ended = []
    for r in reqs:
      if r.end_reason is not None or target is None or r.num_preemptions >= MAX_RECOMPUTES:
        ended.append(r)
      elif r.num_output == 0:
        r.num_prefilled = 0
        target.sched.add(r)
      else:
        r.preempt()
        target.sched.requeue(r)
    self._end_with_error(ended, now)
    if target is not None:
      self._launch(target, now)

  def _drop_handoffs(self, now: float) -> None:
    """No decode instance is left: finished prompts have nowhere to go."""
    for p in self._sources():
      while (r := p.sched.take_handoff()) is not None:
        p.sched.release_handoff(r)
        self._end_with_error([r], now)

  def _relaunch(self, now):
    self._pull(now)  # an abort may have freed decode pages
    super()._relaunch(now)

  def _recompute(self, inst, reqs, now):
    remote: list = []
    local: dict = {}
    for r in reversed(reqs):  # each joins a queue's front: the oldest ends up first
      dst = self._local(r, now, fresh=False)
      if dst is None:
        remote.append(r)
      else:
        local[dst] = None
    target = least_loaded(self._alive(self.prefills))
    if remote and target is None:
      self._end_with_error(remote[::-1], now)
    elif remote:
      for r in remote:
        target.sched.requeue(r)
      self._launch(target, now)
    for dst in local:
      if dst is not inst:  # `inst` is launching its next step: its caller goes on
        self._launch(dst, now)


class _Unit:
  """One semi-PD replica: its two phases on one pool, and how they share it: SM
  ratios (x, y), the time share x / (x + y) its controller follows when
  time-shared, and the shares `SmShares` gives each phase when SM-partitioned."""

  def __init__(self, prefill, decode, caps, partitioner, dep: deploy.SemiPD):
    self.prefill, self.decode = prefill, decode
    self.dep = dep
    self.partitioner = partitioner
    self.controller = ShareController(caps[0] / (caps[0] + caps[1]))
    self.set_caps(*caps)

  def set_caps(self, x: float, y: float) -> None:
    self.caps = SmShares(x, y, self.dep.work_conserving)
    self.share = self.caps.time_share
    self.controller.set_share(self.share)

  def slowdown(self, phase: str, prefill_busy: bool, decode_busy: bool) -> float:
    """SM partitioning: the factor on `phase`'s step time while the phases are
    busy as given (its own included)."""
    sp, sd = self.caps.shares(prefill_busy, decode_busy)
    if phase == PREFILL:
      return self.dep.prefill_scaling.factor(sp)
    return self.dep.decode_scaling.factor(sd)

  @property
  def num_waiting(self):
    return self.prefill.num_waiting + self.decode.num_waiting

  @property
  def num_running(self):
    return self.prefill.num_running + self.decode.num_running


class SemiPDCoordinator(Coordinator):
  """semi-PD: per replica one pool and two schedulers, prefill and decode.

  Time-shared (what the engine runs): one step at a time per replica; a
  `ShareController` picks the phase so busy time follows x : y. SM-partitioned
  (`concurrent`, the simulator's what-if): both phases run at once on their own
  device groups, each step slowed by its `ShareScaling` at the share `SmShares`
  gives it while the other phase is busy or idle (the executor asks the unit's
  `slowdown` and re-times a step in flight when the other phase starts or
  stops). Finished prompts move to the decode scheduler without a copy; a
  request preempted by decode goes back to the front of the prefill queue. With
  a partitioner, (x, y) move after steps through its `after_step` hook.
  """

  def __init__(self, dep: deploy.SemiPD, ex, ttft_slo=None, tpot_slo=None,
               start_time: float = 0.0, on_end=None):
    super().__init__(ex, on_end, dep.routing)
    if dep.partitioner is not None and (ttft_slo is None or tpot_slo is None):
      raise ValueError("semi-PD's online partitioner needs ttft_slo and tpot_slo")
    self.concurrent = dep.concurrent
    spec = dep.instance
    self.units = []
    for k in range(dep.replicas):
      group = f"semi_pd{k}"
      alloc = ex.allocator(group, spec, 1.0)
      pg, dg = (f"{group}.prefill", f"{group}.decode") if dep.concurrent else (group, group)
      pi = Instance(f"{group}.prefill", pg, PrefillScheduler(
          alloc, spec.max_batch, spec.max_step_tokens, spec.page_policy, shared=True), spec,
          PREFILL)
      di = Instance(f"{group}.decode", dg, DecodeScheduler(
          alloc, spec.max_batch, spec.page_policy, spec.max_decode_tokens), spec, DECODE)
      unit = _Unit(pi, di, dep.caps, self._partitioner(dep, ttft_slo, tpot_slo, start_time),
                   dep)
      pi.unit = di.unit = unit
      self.instances += [pi, di]
      self.units.append(unit)

  @staticmethod
  def _partitioner(dep, ttft_slo, tpot_slo, start_time):
    cfg, (x, y) = dep.partitioner, dep.caps
    if cfg is None:
      return None
    if isinstance(cfg, ModelPartitionerConfig):
      return ModelPartitioner(ttft_slo, tpot_slo, cfg, x, y, dep.concurrent, start_time)
    return SloPartitioner(ttft_slo, tpot_slo, cfg, x / (x + y), start_time)

  def add(self, req, now):
    live = [u for u in self.units if not (u.prefill.lost or u.decode.lost)]
    if not live:
      raise ValueError("every semi-PD replica is lost")
    unit = None
    if self.routing == "cache_aware" and len(live) > 1 and req.prefix_keys:
      unit = by_backlog(live, req, lambda u: u.prefill.sched)
      self.cache_routed += unit is not None
    unit = unit or least_loaded(live)
    unit.prefill.sched.add(req)
    self._kick(unit, now)

  def resume(self, inst, now):
    if self.concurrent:
      self._launch(inst, now)
    else:
      self._kick(inst.unit, now)

  def _relaunch(self, now):
    for u in self.units:
      self._kick(u, now)

  def _kick(self, unit: _Unit, now: float) -> None:
    pi, di = unit.prefill, unit.decode
    if self.concurrent:
      self._launch(pi, now)
      self._launch(di, now)
      return
    if pi.step is not None or di.step is not None:
      return
    move_handoffs(pi.sched, di.sched)
    phase = unit.controller.pick(pi.sched.num_waiting > 0, not di.sched.idle)
    if phase is None:
      return
    for inst in ((pi, di) if phase == PREFILL else (di, pi)):
      if self._launch(inst, now):
        return

  def _after_step(self, inst, finished, now, seconds):
    unit = inst.unit
    if not self.concurrent:
      unit.controller.record(inst.phase, seconds)
    part = unit.partitioner
    if part is not None:
      caps = part.after_step(inst.phase, seconds, finished, now)
      if caps is not None:
        unit.set_caps(*caps)
    if not self.concurrent:
      self._kick(unit, now)
    elif inst.phase == PREFILL:
      if move_handoffs(unit.prefill.sched, unit.decode.sched):
        self._launch(unit.decode, now)
      self._launch(inst, now)
    else:
      if finished:
        self._launch(unit.prefill, now)  # freed pages may admit a waiting prompt
      self._launch(inst, now)

  def _recompute(self, inst, reqs, now):
    for r in reversed(reqs):
      inst.unit.prefill.sched.requeue(r)
    if self.concurrent:
      self._launch(inst.unit.prefill, now)

  def share_history(self):
    return {u.prefill.group.split(".")[0]: u.partitioner.history
            for u in self.units if u.partitioner is not None}


class PrefillOnlyCoordinator(Coordinator):
  """Prefill alone, with an infinitely fast decode side: a request ends with its
  first token (TTFT only), as DistServe's planner measures the phase."""

  def __init__(self, dep: deploy.PhaseOnly, ex, on_end=None):
    super().__init__(ex, on_end)
    spec = dep.instance
    for k in range(dep.replicas):
      self._make("prefill", spec, k, lambda a: PrefillScheduler(
          a, spec.max_batch, spec.max_step_tokens, spec.page_policy), PREFILL)

  def _after_step(self, inst, finished, now, seconds):
    sched, drained = inst.sched, []
    while (r := sched.take_handoff()) is not None:
      sched.release_handoff(r)
      r.finish_time = now
      drained.append(r)
    self._end(drained, now)
    self._launch(inst, now)


class DecodeOnlyCoordinator(Coordinator):
  """Decode alone: requests arrive prefilled, first token at arrival, and queue
  FCFS for a decode instance with pages (TPOT only). A preempted request is
  prefilled again at once, at the front of the queue."""

  def __init__(self, dep: deploy.PhaseOnly, ex, on_end=None):
    super().__init__(ex, on_end)
    spec = dep.instance
    for k in range(dep.replicas):
      self._make("decode", spec, k, lambda a: DecodeScheduler(
          a, spec.max_batch, spec.page_policy, spec.max_decode_tokens), DECODE)
    self._queue: collections.deque[Request] = collections.deque()

  @property
  def idle(self):
    return not self._queue and super().idle

  def add(self, req, now):
    self.check(req)
    req.num_prefilled, req.num_output, req.token_times = req.prompt_len, 1, [now]
    if req.max_tokens == 1:
      req.finish_time = now
      self._end([req], now)
      return
    self._queue.append(req)
    self._admit(now)

  def _admit(self, now):
    queue = self._queue
    while queue:
      head = queue[0]
      inst = least_loaded(self.instances, lambda i: i.sched.can_accept(head))
      if inst is None:
        return
      queue.popleft()
      inst.sched.reserve(head)
      inst.sched.admit(head)
      self._launch(inst, now)

  def _after_step(self, inst, finished, now, seconds):
    if finished and self._queue:
      self._admit(now)
    self._launch(inst, now)

  def _recompute(self, inst, reqs, now):
    for r in reversed(reqs):
      r.num_prefilled = r.prefill_len
      self._queue.appendleft(r)

  def abort(self, req, now, reason="aborted"):
    if req in self._queue:
      self._queue.remove(req)
      req.end_reason, req.finish_time = req.end_reason or reason, now
      self._end([req], now)
      return
    super().abort(req, now, reason)


def build(dep, ex: Executor, ttft_slo: Optional[float] = None,
          tpot_slo: Optional[float] = None, start_time: float = 0.0,
          on_end: Optional[OnEnd] = None) -> Coordinator:
  """The coordinator of `dep`'s mode, its instances built through `ex`, bound to it;
  `on_end(req, now)` hears of every request that ends."""
  dep.check()
  coord: Coordinator
  if isinstance(dep, deploy.Colocated):
    coord = ColocatedCoordinator(dep, ex, on_end)
  elif isinstance(dep, deploy.Disaggregated) and dep.elastic is not None:
    from pdserve_jax.core.roles import ElasticCoordinator  # it builds on this module

    coord = ElasticCoordinator(dep, ex, ttft_slo, tpot_slo, start_time, on_end)
  elif isinstance(dep, deploy.Disaggregated):
    coord = DisaggregatedCoordinator(dep, ex, on_end)
  elif isinstance(dep, deploy.SemiPD):
    coord = SemiPDCoordinator(dep, ex, ttft_slo, tpot_slo, start_time, on_end)
  elif isinstance(dep, deploy.PhaseOnly) and dep.phase == "prefill":
    coord = PrefillOnlyCoordinator(dep, ex, on_end)
  elif isinstance(dep, deploy.PhaseOnly):
    coord = DecodeOnlyCoordinator(dep, ex, on_end)
  else:
    raise ValueError(f"unknown deployment {dep!r}")
  ex.bind(coord)
  return coord


__all__ = ["Instance", "Coordinator", "ColocatedCoordinator", "DisaggregatedCoordinator",
           "SemiPDCoordinator", "PrefillOnlyCoordinator", "DecodeOnlyCoordinator", "build",
           "PartitionerConfig", "ModelPartitionerConfig"]
