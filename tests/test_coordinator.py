"""Tests of the mode coordinators over a hand-driven executor.

`ManualExecutor` implements the executor seam of `core.coordinator` and runs
nothing: launched steps and started KV copies wait in lists until the test
completes them (`Harness.complete`, `Harness.finish_copy`), in whatever order it
chooses. `Harness` wraps a coordinator and its executor and checks invariants
after every event: pages conserved and held only by live requests, every request
ended exactly once, tokens already produced never lost, nothing launched on or
copied to or from an instance that was lost.
"""

import collections
import re

import pytest
from hypothesis import event, given, settings, strategies as st

from pdserve_jax.core import deploy
from pdserve_jax.core.deploy import InstanceSpec
from pdserve_jax.core.pages import PageAllocator, pages_for
from pdserve_jax.core import coordinator
from pdserve_jax.core.request import Request
from pdserve_jax.core.share import PartitionerConfig
from pdserve_jax.core.step import DECODE, PREFILL

PAGE = 4  # tokens per page in every test pool
REASONS = {"stop", "length", "aborted", "error"}


class Stuck(AssertionError):
  """Nothing is in flight, yet requests are left that nothing will move."""


class ManualExecutor:
  """The executor seam, run by hand.

  `num_pages`: one number for every pool, or a dict from device group ("decode0")
  or group kind ("decode") to a pool's pages (one page is reserved, as page 0 is
  in the engine). Groups in `held` refuse to launch; `release` resumes them.
  """

  def __init__(self, num_pages, page_size: int = PAGE):
    self.num_pages, self.page_size = num_pages, page_size
    self.coord = None
    self.steps = []  # (inst, step) in flight, oldest first
    self.copies = []  # (req, src, dst) in flight, oldest first
    self.ends = []  # every `ended` request, in order
    self.held: set[str] = set()
    self.refused = []  # instances refused while held, to resume
    self.pools = []  # the groups `allocator` was asked for

  def allocator(self, group, spec, fraction):
    assert fraction == 1.0, "these tests use no pipeline stages"
    self.pools.append(group)
    n = self.num_pages
    if isinstance(n, dict):
      n = n[group] if group in n else n[group.rstrip("0123456789")]
    return PageAllocator(n, self.page_size, reserved=1)

  def bind(self, coord):
    self.coord = coord

  def can_launch(self, inst, now):
    if inst.group in self.held:
      if inst not in self.refused:
        self.refused.append(inst)
      return False
    return True

  def launch(self, inst, step, now):
    assert not inst.lost, f"launched a step on {inst}, which was lost"
    assert inst.step is step and not step.empty
    assert all(i is not inst for i, _ in self.steps), f"{inst} runs two steps"
    assert inst.group not in self.held
    assert all(r.finish_time is None for r in step.requests), "launched an ended request"
    self.steps.append((inst, step))
    for req, dst in step.streams:  # layer-wise KV streaming: copies that start now
      assert inst.phase == PREFILL and dst.phase == DECODE and dst.group != inst.group
      assert req in step.requests and dst.sched.allocator.pages(req)
      self.copies.append((req, inst, dst))

  def start_copy(self, req, src, dst, now):
    assert not src.lost and not dst.lost, f"copy {src} -> {dst} involves a lost instance"
    assert dst.phase == DECODE and src.group != dst.group  # a hand-off, or a migration
    assert req.finish_time is None and req.prefill_done and req.num_output >= 1
    assert src.sched.allocator.pages(req) and dst.sched.allocator.pages(req)
    self.copies.append((req, src, dst))

  def ended(self, req, now):
    assert req.finish_time == now
    self.ends.append(req)

  def release(self, group, now):
    self.held.discard(group)
    refused = [i for i in self.refused if i.group == group]
    self.refused = [i for i in self.refused if i.group != group]
    for inst in refused:
      self.coord.resume(inst, now)


class Harness:
  """A coordinator driven through a `ManualExecutor`, one event at a time, on a
  clock that advances by 1 per event."""

  def __init__(self, dep, num_pages, ttft_slo=None, tpot_slo=None):
    self.ex = ManualExecutor(num_pages)
    self.coord = coordinator.build(dep, self.ex, ttft_slo, tpot_slo, start_time=0.0,
                                   on_end=self.ex.ended)
    self.now = 0.0
    self.reqs = []  # accepted requests
    self.faults = 0  # failed steps, lost groups and failed copies so far
    self._next_id = 0
    self._tokens = {}  # request -> token_times seen at the last check

  def _tick(self) -> float:
    self.now += 1.0
    return self.now

  # -- events ---------------------------------------------------------------------

  def submit(self, prompt_len: int, max_tokens: int) -> Request:
    """Adds a request; a ValueError from `add` propagates and keeps nothing."""
    req = Request(self._next_id, prompt_len, max_tokens, arrival_time=self._tick())
    self._next_id += 1
    self.coord.add(req, self.now)
    self.reqs.append(req)
    self.check()
    return req

  def step_of(self, req: Request):
    """The in-flight (inst, step) that holds `req`, or None."""
    return next(((i, s) for i, s in self.ex.steps if req in s.requests), None)

  def complete(self, inst=None, stop=()):
    """Completes `inst`'s in-flight step (default: the oldest), marking `stop`
    requests as having sampled a stop token. Returns the step."""
    k = 0 if inst is None else next(k for k, (i, _) in enumerate(self.ex.steps)
                                    if i is inst)
    inst, step = self.ex.steps.pop(k)
    for r in stop:
      assert r in step.requests
      r.stopped = True
    self.coord.step_done(inst, self._tick(), 1.0)
    self.check()
    return step

  def finish_copy(self, req=None, failed=False):
    """Lands `req`'s KV copy (default: the oldest in flight). A copy that `failed`, or
    from or to an instance lost meanwhile, ends its request with an error, as the
    engine's executor reports it."""
    k = 0 if req is None else next(k for k, c in enumerate(self.ex.copies) if c[0] is req)
    req, src, dst = self.ex.copies.pop(k)
    if failed or src.lost or dst.lost:
      req.end_reason = "error"
      self.faults += 1
    self.coord.copy_done(req, self._tick())
    self.check()

  def fail(self, inst):
    """`inst`'s step in flight could not run: it never returns, and the coordinator
    ends its requests with an error (the engine's `_fail`)."""
    self.ex.steps = [(i, s) for i, s in self.ex.steps if i is not inst]
    self.faults += 1
    self.coord.fail(inst, self._tick())
    self.check()

  def lose(self, group: str):
    """`group`'s devices are gone (a worker died): the executor reports each of its
    instances lost, one after another; their steps never return."""
    now = self._tick()
    self.faults += 1
    for inst in self.coord.instances:
      if inst.group == group and not inst.lost:
        self.ex.steps = [(i, s) for i, s in self.ex.steps if i is not inst]
        self.coord.lose(inst, now)
        self.check()

  def abort(self, req: Request):
    self.coord.abort(req, self._tick())
    self.check()

  def hold(self, group: str):
    self.ex.held.add(group)

  def release(self, group: str):
    self.ex.release(group, self._tick())
    self.check()

  def run_until(self, cond, limit: int = 1000):
    """Lands the oldest copy, or else completes the oldest step, until `cond()`
    holds."""
    for _ in range(limit):
      if cond():
        return
      if self.ex.copies:
        self.finish_copy()
      elif self.ex.steps:
        self.complete()
      else:
        break
    assert cond(), "ran out of events before the condition held"

  def drain(self, limit: int = 10_000):
    """Releases every hold and completes everything in flight, oldest first; then
    checks that the coordinator is idle with every request ended once and every
    pool full."""
    for g in sorted(self.ex.held):
      self.release(g)
    self.run_until(lambda: not self.ex.steps and not self.ex.copies, limit)
    assert not stuck_handoff(self.coord), "a hand-off waits while a decode pool has room"
    if not self.coord.idle:
      raise Stuck("nothing in flight but the coordinator is not idle; live requests: "
                  f"{[r.request_id for r in self.reqs if r.finish_time is None]}")
    self.check_drained()

  # -- invariants -----------------------------------------------------------------

  def check(self):
    """After every event: pages conserved and held only by live requests, ended
    requests ended exactly once, tokens never lost."""
    for alloc in self.coord.allocators():
      alloc.check()
      for owner in alloc.owners():
        assert owner.finish_time is None, (
            f"request {owner.request_id} ended ({owner.finish_reason}) holding "
            f"{len(alloc.pages(owner))} pages")
    ends = self.ex.ends
    assert len(set(map(id, ends))) == len(ends), "a request ended twice"
    assert {id(r) for r in self.reqs if r.finish_time is not None} == set(map(id, ends))
    for r in self.reqs:
      times = r.token_times
      assert len(times) == r.num_output <= r.max_tokens
      assert times == sorted(times)
      before = self._tokens.get(r, [])
      assert times[:len(before)] == before, f"request {r.request_id} lost tokens"
      self._tokens[r] = list(times)
    for inst in self.coord.instances:
      flying = [s for i, s in self.ex.steps if i is inst]
      assert flying == ([inst.step] if inst.step is not None else [])

  def check_drained(self):
    ends = collections.Counter(map(id, self.ex.ends))
    for r in self.reqs:
      assert ends[id(r)] == 1, f"request {r.request_id} ended {ends[id(r)]} times"
      assert r.finish_reason in REASONS
      if r.finish_reason == "length":
        assert r.num_output == r.max_tokens
      elif r.finish_reason == "stop":
        assert 1 <= r.num_output <= r.max_tokens
      elif r.finish_reason == "error":
        assert self.faults, f"request {r.request_id} failed, but nothing did"
      else:
        assert r.num_output < r.max_tokens
    assert len(self.ex.ends) == len(self.reqs)
    for alloc in self.coord.allocators():
      assert alloc.num_free == alloc.capacity and not alloc.owners()


def pages_of(h: Harness, req: Request) -> dict:
  """`req`'s page count on each pool, by the name of its first instance."""
  out = {}
  for inst in h.coord.instances:
    alloc = inst.sched.allocator
    out.setdefault(id(alloc), (inst.name, len(alloc.pages(req))))
  return dict(out.values())


def assert_freed(h: Harness, req: Request):
  assert req.finish_reason == "aborted"
  assert sum(1 for r in h.ex.ends if r is req) == 1
  for alloc in h.coord.allocators():
    assert alloc.pages(req) == []
    alloc.check()


def stuck_handoff(coord) -> bool:
  """Whether a disaggregated hand-off waits in prefill memory while a decode
  instance has room for it (a pull would move it)."""
  if not isinstance(coord, coordinator.DisaggregatedCoordinator):
    return False
  waiting = [(h, p) for p in coord._sources() if (h := p.sched.peek_handoff()) is not None]
  if not waiting:
    return False
  oldest, src = min(waiting, key=lambda hp: hp[0].token_times[0])
  return any(d.sched.can_accept(oldest) for d in coord.decodes if d.group != src.group)


# --- deployments ----------------------------------------------------------------------

SPEC = InstanceSpec(max_batch=4, max_step_tokens=32)
SLOS = dict(ttft_slo=4.0, tpot_slo=1.5)


def make(mode: str, spec: InstanceSpec = SPEC, n: int = 1):
  """(deployment, build kwargs) of `mode`; `n` replicas (prefill and decode
  instances each, when disaggregated)."""
  if mode in ("prefill_first", "chunked"):
    return deploy.Colocated(spec, replicas=n, policy=mode), {}
  if mode == "disaggregated":
    return deploy.Disaggregated(spec, spec, num_prefill=n, num_decode=n), {}
  if mode == "semi_pd":
    return deploy.SemiPD(spec, replicas=n), {}
  if mode == "semi_pd_dynamic":
    return deploy.SemiPD(spec, replicas=n, partitioner=PartitionerConfig(window=1)), SLOS
  if mode == "semi_pd_concurrent":
    return deploy.SemiPD(spec, replicas=n, concurrent=True), {}
  raise ValueError(mode)


MODES = ["prefill_first", "chunked", "disaggregated", "semi_pd", "semi_pd_dynamic",
         "semi_pd_concurrent"]


def harness(mode: str, num_pages=17, spec: InstanceSpec = SPEC, n: int = 1) -> Harness:
  dep, kw = make(mode, spec, n)
  return Harness(dep, num_pages, **kw)


# --- 1. abort at every stage ----------------------------------------------------------


def _others_finish(h: Harness, aborted: Request):
  h.drain()
  for r in h.reqs:
    if r is not aborted:
      assert r.finish_reason == "length" and r.num_output == r.max_tokens


@pytest.mark.parametrize("mode", MODES)
def test_abort_queued(mode):
  h = harness(mode)
  a = h.submit(8, 3)
  b = h.submit(8, 3)
  assert h.step_of(b) is None and sum(pages_of(h, b).values()) == 0
  h.abort(b)
  assert b.finish_time == h.now and b.token_times == []
  assert_freed(h, b)
  h.abort(b)  # a second abort changes nothing
  assert h.ex.ends.count(b) == 1
  assert a.finish_time is None
  _others_finish(h, b)


@pytest.mark.parametrize("mode", MODES)
def test_abort_in_prefill_step(mode):
  h = harness(mode)
  a = h.submit(8, 3)
  inst, step = h.step_of(a)
  assert [c.request for c in step.prefills] == [a]
  h.submit(6, 4)
  h.abort(a)
  # It ends when its step completes, not before, and keeps its pages till then.
  assert a.finish_time is None and a not in h.ex.ends
  assert sum(pages_of(h, a).values()) > 0
  h.complete(inst)
  assert a.token_times == [] and a.num_output == 0
  assert_freed(h, a)
  _others_finish(h, a)


def test_abort_between_chunks():
  """Chunked prefill: a prompt longer than the token budget aborted between its
  chunks ends at once and frees the pages its first chunks took."""
  h = harness("chunked", spec=InstanceSpec(max_batch=2, max_step_tokens=8))
  a = h.submit(20, 3)
  inst, _ = h.step_of(a)
  h.hold(inst.group)
  h.complete(inst)
  assert a.num_prefilled == 8 and h.step_of(a) is None
  assert pages_of(h, a) == {inst.name: 2}
  h.submit(4, 2)
  h.abort(a)
  assert a.finish_time == h.now and a.token_times == []
  assert_freed(h, a)
  _others_finish(h, a)


@pytest.mark.parametrize("n", [1, 2])
def test_abort_waiting_for_handoff(n):
  """Disaggregated: the decode pools are kept full by long requests, so a finished
  prompt waits in prefill memory; aborting it there frees its prefill pages."""
  # Decode pools of 4 usable pages: a blocker (8 + 8 tokens) takes 3 of them on
  # arrival and grows to 4, so no other 8-token prompt (3 pages) fits beside it.
  h = harness("disaggregated", num_pages={"prefill": 17, "decode": 5}, n=n)
  blockers = [h.submit(8, 8) for _ in range(n)]
  h.run_until(lambda: all(b.num_output >= 2 for b in blockers))
  a = h.submit(8, 3)
  src, _ = h.step_of(a)
  h.complete(src)
  assert a.num_output == 1 and a in src.sched.handoffs and not h.ex.copies
  assert pages_of(h, a)[src.name] == 2
  c = h.submit(4, 2)
  first = list(a.token_times)
  h.abort(a)
  assert a.finish_time == h.now and a.token_times == first
  assert_freed(h, a)
  _others_finish(h, a)
  assert c.finish_reason == "length"


@pytest.mark.parametrize("n", [1, 2])
def test_abort_in_kv_transfer(n):
  """Aborted during its KV copy, a request ends when the copy lands; the decode
  side's pages, which the copy writes into, are freed only then."""
  h = harness("disaggregated", n=n)
  a = h.submit(8, 4)
  h.submit(5, 3)
  h.complete()
  assert [c[0] for c in h.ex.copies] == [a]
  _, src, dst = h.ex.copies[0]
  h.abort(a)
  assert a.finish_time is None and a not in h.ex.ends
  assert pages_of(h, a)[src.name] == 2 and pages_of(h, a)[dst.name] == 3
  h.finish_copy(a)
  assert a.finish_time == h.now and a.num_output == 1
  assert_freed(h, a)
  _others_finish(h, a)


def test_disaggregated_abort_frees_decode_pages_for_waiting_handoff():
  # Decode pool: 3 usable pages, room for one 8-token prompt (kv + 1 = 9 tokens).
  h = harness("disaggregated", num_pages={"prefill": 17, "decode": 4})
  a = h.submit(8, 4)
  b = h.submit(8, 4)
  h.complete()  # a's prefill: its copy takes every decode page
  h.complete()  # b's prefill: b waits in prefill memory for decode pages
  assert [c[0] for c in h.ex.copies] == [a] and h.coord.prefills[0].sched.handoffs == (b,)
  h.abort(a)
  h.finish_copy(a)  # a ends, its decode pages are freed...
  assert_freed(h, a)
  h.drain()  # ...but nothing pulls b to decode: Stuck
  assert b.finish_reason == "length"


def test_disaggregated_abort_between_decode_steps_frees_pages_for_waiting_handoff():
  h = harness("disaggregated", num_pages={"prefill": 17, "decode": 5})
  a = h.submit(8, 8)
  inst, _ = _decoding(h, a)
  b = h.submit(8, 3)
  h.complete(h.step_of(b)[0])  # b waits in prefill memory: a fills the decode pool
  assert h.coord.prefills[0].sched.handoffs == (b,)
  h.hold(inst.group)
  h.complete(inst)
  h.abort(a)  # between decode steps: ends at once, decode pages freed
  assert_freed(h, a)
  h.drain()  # releases the decode group; nothing pulls b: Stuck
  assert b.finish_reason == "length"


def _decoding(h: Harness, req: Request):
  """Runs until `req` has two tokens and is in a decode step in flight."""
  def ready():
    found = h.step_of(req)
    return req.num_output >= 2 and found is not None and req in found[1].decodes
  h.run_until(ready)
  return h.step_of(req)


@pytest.mark.parametrize("mode", MODES)
def test_abort_decoding_in_flight(mode):
  h = harness(mode)
  a = h.submit(8, 6)
  h.submit(6, 4)
  inst, _ = _decoding(h, a)
  n = a.num_output
  h.abort(a)
  assert a.finish_time is None and a not in h.ex.ends
  h.complete(inst)
  assert a.num_output == len(a.token_times) == n  # the step produced nothing for it
  assert_freed(h, a)
  _others_finish(h, a)


@pytest.mark.parametrize("mode", MODES)
def test_abort_decoding_between_steps(mode):
  h = harness(mode)
  a = h.submit(8, 6)
  h.submit(6, 4)
  inst, _ = _decoding(h, a)
  h.hold(inst.group)  # its next step cannot launch
  h.complete(inst)
  assert h.step_of(a) is None and a.finish_time is None
  n = a.num_output
  h.abort(a)
  assert a.finish_time == h.now and a.num_output == len(a.token_times) == n
  assert_freed(h, a)
  _others_finish(h, a)


def test_abort_decoding_between_steps_prefill_first():
  """Prefill-first pauses decodes while a prefill runs: no hold needed."""
  h = harness("prefill_first")
  a = h.submit(8, 6)
  _decoding(h, a)
  b = h.submit(6, 4)
  h.complete()  # a's decode; b's prefill runs next, a waits
  _, step = h.step_of(b)
  assert step.decodes == [] and h.step_of(a) is None
  h.abort(a)
  assert a.finish_time == h.now
  assert_freed(h, a)
  _others_finish(h, a)


# --- 2. preemption with on-demand pages -----------------------------------------------

# Four requests of 4 + 12 tokens (4 pages each over their life) in pools of 6
# usable pages: admitted on demand, the batch outgrows the pool.
CROWD = [(4, 12)] * 4
SMALL = {"prefill_first": 7, "chunked": 7, "semi_pd": 7, "semi_pd_concurrent": 7,
         "disaggregated": {"prefill": 17, "decode": 7}}


@pytest.mark.parametrize("n", [1, 2])
@pytest.mark.parametrize("mode", list(SMALL))
def test_preemption_on_demand(mode, n):
  spec = InstanceSpec(max_batch=4, max_step_tokens=32)
  h = harness(mode, SMALL[mode], spec, n)
  reqs = [h.submit(p, m) for p, m in CROWD * n]
  h.drain()  # checks after every event that no produced token is ever lost
  assert h.coord.num_preemptions > 0
  assert sum(r.num_preemptions for r in reqs) == h.coord.num_preemptions
  # Some request was preempted after producing tokens, and kept them.
  assert any(r.num_preemptions and r.num_recompute for r in reqs)
  for r in reqs:
    assert r.finish_reason == "length"
    assert r.num_output == r.max_tokens == len(r.token_times)


@pytest.mark.parametrize("n", [1, 2])
@pytest.mark.parametrize("mode", list(SMALL))
def test_reserve_never_preempts(mode, n):
  spec = InstanceSpec(max_batch=4, max_step_tokens=32, page_policy="reserve")
  h = harness(mode, SMALL[mode], spec, n)
  reqs = [h.submit(p, m) for p, m in CROWD * n]
  h.drain()
  assert h.coord.num_preemptions == 0
  for r in reqs:
    assert r.num_preemptions == 0 and r.num_recompute == 0
    assert r.finish_reason == "length" and r.num_output == r.max_tokens


def test_preemption_with_stops_and_aborts():
  """A request preempted on decode, waiting in the prefill queue to recompute, is
  aborted there at once; the rest still stop or finish."""
  h = harness("disaggregated", SMALL["disaggregated"])
  reqs = [h.submit(p, m) for p, m in CROWD * 2]
  h.run_until(lambda: all(r.num_output for r in reqs))
  assert h.coord.num_preemptions == 0
  h.hold("prefill0")  # recomputations wait in the prefill queue
  h.run_until(lambda: h.coord.num_preemptions > 0)
  victim = next(r for r in reqs if r.num_preemptions)
  assert h.step_of(victim) is None and victim.finish_time is None
  assert victim.num_output > 1 and victim.num_prefilled == 0
  assert h.coord.prefills[0].sched.num_waiting > 0
  h.abort(victim)
  assert victim.finish_time == h.now
  assert_freed(h, victim)
  h.run_until(lambda: any(s.decodes for _, s in h.ex.steps))
  inst, step = next((i, s) for i, s in h.ex.steps if s.decodes)
  h.complete(inst, stop=step.decodes[:1])
  assert step.decodes[0].finish_reason == "stop"
  h.drain()


# --- 3. random event sequences --------------------------------------------------------

MAX_PROMPT, MAX_OUT = 12, 8  # requests up to 20 tokens: 5 pages of 4
BIG_PROMPT, BIG_OUT = 20, 10  # and some too big for the smaller pools


@st.composite
def deployments(draw):
  """(deployment, build kwargs, pages per pool): a random mode and policy, 1-2
  instances of each kind, and pools that fit the largest ordinary request."""
  mode = draw(st.sampled_from(["prefill_first", "chunked", "disaggregated", "semi_pd"]))
  page_policy = draw(st.sampled_from(["on_demand", "reserve"]))
  n = draw(st.integers(1, 2))

  def spec():
    max_batch = draw(st.integers(1, 4))
    budget = draw(st.integers(max_batch + 1, 16))
    return InstanceSpec(max_batch=max_batch, max_step_tokens=budget, page_policy=page_policy)

  need = pages_for(MAX_PROMPT + MAX_OUT, PAGE) + 1  # one page is reserved
  pages = st.integers(need, need + 2)
  if mode == "disaggregated":
    dep = deploy.Disaggregated(prefill=spec(), decode=spec(), num_prefill=n,
                               num_decode=draw(st.integers(1, 2)))
    return dep, {}, {"prefill": draw(pages), "decode": draw(pages)}
  if mode == "semi_pd":
    part = draw(st.sampled_from([None, PartitionerConfig(window=1),
                                 PartitionerConfig(window=3, step=0.2)]))
    dep = deploy.SemiPD(spec(), replicas=n, partitioner=part,
                        concurrent=draw(st.booleans()))
    return dep, (SLOS if part else {}), draw(pages)
  return deploy.Colocated(spec(), replicas=n, policy=mode), {}, draw(pages)


def _fits(h: Harness, prompt: int, out: int) -> bool:
  return all(pages_for(prompt + out, PAGE) <= a.capacity for a in h.coord.allocators())


def _shape(e: ValueError) -> tuple:
  head, tail = str(e).split(", but ")
  return head, tail.split()[-2:]


def _refused(h: Harness, prompt: int, out: int):
  """A request too big for a pool: `check` and `add` raise the same ValueError,
  and the coordinator keeps nothing of it."""
  state = [(i.num_waiting, i.num_running) for i in h.coord.instances]
  free = [a.num_free for a in h.coord.allocators()]
  req = Request(-1, prompt, out, arrival_time=h.now)
  with pytest.raises(ValueError, match=r"needs \d+ pages") as checked:
    h.coord.check(req)
  with pytest.raises(ValueError, match=r"needs \d+ pages") as added:
    h.coord.add(req, h.now)
  event(f"refused ({h.coord.__class__.__name__})")
  # The same request, pages and pool size (semi-PD's `add` calls its shared pool
  # "the prefill KV pool", `check` "the KV pool").
  assert _shape(added.value) == _shape(checked.value)
  assert [(i.num_waiting, i.num_running) for i in h.coord.instances] == state
  assert [a.num_free for a in h.coord.allocators()] == free
  assert all(r is not req for r in h.ex.ends)
  h.check()


def _arrivals_refused(coord) -> bool:
  """Whether every instance an arrival needs is lost (a worker process died)."""
  if isinstance(coord, coordinator.DisaggregatedCoordinator):
    return all(i.lost for i in coord.prefills) or all(i.lost for i in coord.decodes)
  return all(i.lost for i in coord.instances)


def _arrive(h: Harness, prompt: int, out: int):
  """An arrival: served if some instance can take it, else refused (keeping
  nothing) because it cannot fit a pool or every instance it needs is lost."""
  if _arrivals_refused(h.coord):
    before = [(i.num_waiting, i.num_running) for i in h.coord.instances]
    with pytest.raises(ValueError, match=r"is lost|needs \d+ pages"):
      h.coord.add(Request(-1, prompt, out, arrival_time=h.now), h.now)
    assert [(i.num_waiting, i.num_running) for i in h.coord.instances] == before
    event("arrival refused: every instance it needs is lost")
  elif _fits(h, prompt, out):
    h.submit(prompt, out)
  else:
    _refused(h, prompt, out)


def _pick(seq, k: int):
  return seq[k % len(seq)]


def apply_event(h: Harness, kind: str, args, groups, fail: bool = True, lose: bool = True):
  """One of EVENTS done to `h`: "fail" and "lose" only where asked for; an event with
  nothing to act on (no step, copy or request yet) does nothing."""
  if kind == "submit":
    _arrive(h, *args)
  elif kind == "burst":
    prompt, out, n = args
    for _ in range(n):
      _arrive(h, prompt, out)
  elif kind == "step" and h.ex.steps:
    inst, step = _pick(h.ex.steps, args[0])
    samplers = [c.request for c in step.prefills if c.last] + list(step.decodes)
    stop = args[1]
    h.complete(inst, stop=[_pick(samplers, stop)] if stop >= 0 and samplers else [])
  elif kind in ("copy", "copy_fail") and h.ex.copies:
    h.finish_copy(_pick(h.ex.copies, args[0])[0], failed=kind == "copy_fail")
  elif kind == "abort" and h.reqs:
    h.abort(_pick(h.reqs, args[0]))
  elif kind == "hold":
    h.hold(_pick(groups, args[0]))
  elif kind == "release" and h.ex.held:
    h.release(_pick(sorted(h.ex.held), args[0]))
  elif kind == "fail" and fail and h.ex.steps:
    h.fail(_pick(h.ex.steps, args[0])[0])
  elif kind == "lose" and lose:
    h.lose(_pick(groups, args[0]))


_submit = st.tuples(st.just("submit"), st.integers(1, MAX_PROMPT),
                    st.integers(1, MAX_OUT))
_step = st.tuples(st.just("step"), st.integers(0, 7), st.integers(-1, 7))  # which, stop
EVENTS = st.lists(st.one_of(
    _submit, _submit, _step, _step, _step,
    st.tuples(st.just("burst"), st.integers(1, MAX_PROMPT), st.integers(1, MAX_OUT),
              st.integers(2, 4)),  # a few alike requests at once: pages run short
    st.tuples(st.just("submit"), st.integers(MAX_PROMPT + 1, BIG_PROMPT),
              st.integers(1, BIG_OUT)),
    st.tuples(st.just("copy"), st.integers(0, 7)),
    st.tuples(st.just("abort"), st.integers(0, 63)),
    st.tuples(st.just("hold"), st.integers(0, 7)),
    st.tuples(st.just("release"), st.integers(0, 7)),
    # Faults, as the engine's executor reports them: a step that could not run, a
    # KV copy that could not land, a device group gone for good.
    st.tuples(st.just("fail"), st.integers(0, 7)),
    st.tuples(st.just("copy_fail"), st.integers(0, 7)),
    st.tuples(st.just("lose"), st.integers(0, 7))), min_size=10, max_size=80)


@settings(max_examples=500, deadline=None, derandomize=True)
@given(deployments(), EVENTS)
def test_random_events(deployment, events):
  """Random arrivals, step and copy completions (with stop tokens), aborts, device
  holds and faults (failed steps and copies, lost instances), in any order: pages
  stay consistent after every event, nothing runs on a lost instance, and once
  drained every request has ended exactly once and every pool is full."""
  dep, kw, pages = deployment
  h = Harness(dep, pages, **kw)
  groups = sorted({i.group for i in h.coord.instances})
  # The engine runs no SM-partitioned semi-PD, so nothing reports its faults.
  faults = not getattr(dep, "concurrent", False)
  for kind, *args in events:
    apply_event(h, kind, args, groups, fail=faults, lose=faults)
  h.drain()
  # Coverage, shown by pytest --hypothesis-show-statistics.
  event(f"{dep.mode}, {len(h.reqs) // 10 * 10}+ requests")
  event(f"aborted: {any(r.finish_reason == 'aborted' for r in h.reqs)}")
  event(f"failed: {any(r.finish_reason == 'error' for r in h.reqs)}")
  event(f"preempted: {h.coord.num_preemptions > 0}")
  lost = {i.phase or "colocated" for i in h.coord.instances if i.lost}
  event(f"lost: {sorted(lost)}")
  if isinstance(h.coord, coordinator.DisaggregatedCoordinator):
    if all(i.lost for i in h.coord.prefills):
      event("every prefill instance lost")


# --- 4. deployment errors -------------------------------------------------------------

BAD = [
    (deploy.Colocated(SPEC, policy="fifo"), "policy"),
    (deploy.Colocated(InstanceSpec(page_policy="lazy")), "page_policy"),
    (deploy.Colocated(SPEC, replicas=0), "replicas"),
    (deploy.Colocated(SPEC, replicas=True), "replicas"),
    (deploy.Colocated(InstanceSpec(max_batch=-1)), "instance.max_batch"),
    (deploy.Colocated(InstanceSpec(max_batch=8, max_step_tokens=8), policy="chunked"),
     "max_step_tokens"),
    (deploy.Disaggregated(num_prefill=-1), "num_prefill"),
    (deploy.Disaggregated(num_decode=0), "num_decode"),
    (deploy.Disaggregated(prefill=InstanceSpec(tp=0)), "prefill.tp"),
    (deploy.Disaggregated(decode=InstanceSpec(max_step_tokens=-4)), "decode.max_step_tokens"),
    (deploy.Disaggregated(decode=InstanceSpec(page_policy="eager")), "page_policy"),
    (deploy.SemiPD(SPEC, replicas=-2), "replicas"),
    (deploy.SemiPD(SPEC, prefill_share=1.0), "prefill_share"),
    (deploy.SemiPD(InstanceSpec(pp=2)), "pp"),
    (deploy.SemiPD(SPEC, partitioner=PartitionerConfig(window=0)), "window"),
]


@pytest.mark.parametrize("dep,field", BAD, ids=[f for _, f in BAD])
def test_bad_deployment(dep, field):
  named = rf"\b{re.escape(field)}\b"
  with pytest.raises(ValueError, match=named):
    dep.check()
  ex = ManualExecutor(17)
  with pytest.raises(ValueError, match=named):
    coordinator.build(dep, ex, **SLOS)
  assert ex.pools == []  # refused before any pool was made


@pytest.mark.parametrize("slos", [{}, {"ttft_slo": 1.0}, {"tpot_slo": 1.0}])
def test_semi_pd_partitioner_needs_slos(slos):
  dep = deploy.SemiPD(SPEC, partitioner=PartitionerConfig())
  dep.check()  # the deployment is fine; building it without SLOs is not
  ex = ManualExecutor(17)
  with pytest.raises(ValueError, match="ttft_slo and tpot_slo"):
    coordinator.build(dep, ex, **slos)
  assert ex.pools == []
  coordinator.build(dep, ManualExecutor(17), **SLOS)  # with both it builds
  coordinator.build(deploy.SemiPD(SPEC), ManualExecutor(17))  # no partitioner, no SLOs


def test_bad_slos_and_unknown_deployment():
  dep = deploy.SemiPD(SPEC, partitioner=PartitionerConfig())
  with pytest.raises(ValueError, match="SLOs must be positive"):
    coordinator.build(dep, ManualExecutor(17), ttft_slo=0.0, tpot_slo=1.0)

  class Unknown:
    def check(self):
      pass

  with pytest.raises(ValueError, match="unknown deployment"):
    coordinator.build(Unknown(), ManualExecutor(17))


# --- phase-only coordinators (the planner's), aborted ---------------------------------


def test_prefill_only_abort():
  h = Harness(deploy.PhaseOnly("prefill", SPEC), 17)
  a, b, c = h.submit(8, 5), h.submit(8, 5), h.submit(4, 5)
  h.abort(b)  # queued
  assert b.finish_time == h.now
  h.abort(a)  # in flight
  h.run_until(lambda: not h.ex.steps)
  assert h.coord.idle and sorted(r.request_id for r in h.ex.ends) == [0, 1, 2]
  assert a.finish_reason == b.finish_reason == "aborted" and a.token_times == []
  assert c.num_output == 1 and c.finish_time is not None  # ends with its first token
  assert all(al.num_free == al.capacity for al in h.coord.allocators())


def test_decode_only_abort_queued():
  # 4 usable pages: the first request (kv + 1 = 9 tokens, 3 pages) leaves no room.
  h = Harness(deploy.PhaseOnly("decode", SPEC), 5)
  a, b = h.submit(8, 4), h.submit(8, 4)
  assert h.step_of(b) is None
  h.abort(b)
  assert b.finish_time == h.now, "a queued request did not end at once"
  h.drain()
  assert a.finish_reason == "length"


def test_a_lost_instance_ends_what_it_holds_and_takes_no_more_work():
  """`lose`: an instance whose devices are gone (a worker process died). Every
  request it holds is recomputed on the other prefill instance (none ends), arrivals
  go elsewhere; with no decode instance left, copies to it fail their requests and
  arrivals are refused; `readmit` takes it back."""
  h = Harness(deploy.Disaggregated(SPEC, SPEC, num_prefill=2, num_decode=1), 64)
  for _ in range(6):
    h.submit(8, 6)
  p0, p1 = h.coord.prefills
  held = p0.sched.held()
  assert held and p0.step is not None
  h.ex.steps = [(i, s) for i, s in h.ex.steps if i is not p0]  # its step never returns
  h.coord.lose(p0, h._tick())
  h.check()
  assert all(r.finish_time is None for r in held)  # recomputed on p1, or copied out
  assert not p0.sched.held() and p0.sched.allocator.num_free == p0.sched.allocator.capacity
  late = h.submit(8, 6)
  assert late in p1.sched.held()
  # Copies under way to the decode instance when it is lost fail their requests.
  h.run_until(lambda: h.ex.copies)
  d0 = h.coord.decodes[0]
  h.ex.steps = [(i, s) for i, s in h.ex.steps if i is not d0]
  h.coord.lose(d0, h._tick())
  h.check()
  with pytest.raises(ValueError, match="every decode instance is lost"):
    h.submit(8, 6)
  h.run_until(lambda: not h.ex.steps and not h.ex.copies)
  assert h.coord.idle and all(r.finish_time is not None for r in h.reqs)
  done = [r for r in h.reqs if r.finish_reason != "error"]
  assert all(r.num_output == r.max_tokens for r in done)
  for alloc in h.coord.allocators():
    assert alloc.num_free == alloc.capacity
  h.coord.readmit(d0, h._tick())
  assert h.coord.unservable() is None
  back = h.submit(8, 6)
  h.run_until(lambda: back.finish_time is not None)
  assert back.finish_reason == "length"


def test_every_prefill_instance_lost_leaves_preempted_requests_nowhere_to_recompute():
  """Disaggregated, its only prefill instance lost while two requests decode in a
  pool too small for both to finish: the hand-offs it held end with an error, the
  decode request preempted later has nowhere to recompute and ends with an error
  too (its pages freed), the other finishes, and arrivals are refused."""
  h = harness("disaggregated", SMALL["disaggregated"])  # 6 usable decode pages
  reqs = [h.submit(p, m) for p, m in CROWD]  # 4 pages each over their life
  h.run_until(lambda: all(r.num_output for r in reqs) and not h.ex.copies)
  (prefill,), (decode,) = h.coord.prefills, h.coord.decodes
  waiting, decoding = list(prefill.sched.handoffs), decode.sched.held()
  assert len(waiting) == len(decoding) == 2
  h.lose(prefill.group)
  assert all(r.finish_reason == "error" and r.num_output == 1 for r in waiting)
  with pytest.raises(ValueError, match="every prefill instance is lost"):
    h.submit(4, 2)
  h.drain()  # the two decoding requests outgrow the pool: one is preempted
  preempted = [r for r in decoding if r.num_preemptions]
  assert len(preempted) == 1 and preempted[0].finish_reason == "error"
  assert preempted[0].num_output > 1  # the tokens it made are kept in its result
  (finished,) = [r for r in decoding if r not in preempted]
  assert finished.finish_reason == "length" and finished.num_output == finished.max_tokens


def test_a_lost_semi_pd_replica_takes_no_more_arrivals():
  """semi-PD: both phases of a lost replica go (they share its devices); arrivals go
  to a live replica, and once none is left they are refused."""
  h = harness("semi_pd", n=2)
  a = h.submit(8, 4)
  unit = next(u for u in h.coord.units if a in u.prefill.sched.held())
  h.lose(unit.prefill.group)
  assert a.finish_reason == "error" and unit.prefill.lost and unit.decode.lost
  b = h.submit(8, 4)
  live = next(u for u in h.coord.units if u is not unit)
  assert b in live.prefill.sched.held()
  h.lose(live.prefill.group)
  with pytest.raises(ValueError, match="every semi-PD replica is lost"):
    h.submit(8, 4)
  h.drain()
  assert b.finish_reason == "error"
