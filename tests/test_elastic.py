"""Layer-wise KV streaming and elastic roles in the coordinator, by hand (no jax).

The hand-driven executor of `test_coordinator` (`ManualExecutor`, `Harness`) runs
the disaggregated coordinator with streaming on (`kv_transfer="layerwise"`: a step's
`streams` join its copies in flight, and a test may land them before or after the
step) and the elastic coordinator (`core.roles`), whose moves the tests start by
hand (`move`) or leave to its `RoleController`. The harness checks after every
event that pages are conserved and held only by live requests and that produced
tokens are never lost; `drain` that every request ended exactly once.
"""

import dataclasses

import pytest
from hypothesis import event, given, settings, strategies as st

from pdserve_jax.core import coordinator, deploy
from pdserve_jax.core.deploy import InstanceSpec
from pdserve_jax.core.elastic import ElasticConfig, RoleController
from pdserve_jax.core.pages import pages_for
from pdserve_jax.core.request import Request
from pdserve_jax.core.step import DECODE, PREFILL
from test_coordinator import (EVENTS, MAX_OUT, MAX_PROMPT, PAGE, SLOS, Harness,
                              ManualExecutor, apply_event, assert_freed, pages_of)

SPEC = InstanceSpec(max_batch=4, max_step_tokens=32)


def streaming(num_pages=17, n_prefill=1, n_decode=1, **kw) -> Harness:
  dep = deploy.Disaggregated(SPEC, SPEC, n_prefill, n_decode, kv_transfer="layerwise", **kw)
  return Harness(dep, num_pages, **(SLOS if dep.elastic else {}))


def elastic(n_prefill=1, n_decode=1, num_pages=17, window=1000, slos=SLOS, decode=SPEC,
            **kw) -> Harness:
  """An elastic deployment; the default window keeps its controller from moving."""
  dep = deploy.Disaggregated(SPEC, decode, n_prefill, n_decode,
                             elastic=ElasticConfig(window=window), **kw)
  return Harness(dep, num_pages, **slos)


def held_by(h: Harness, req: Request):
  return next(i for i in h.coord.instances if req in i.sched.held())


# --- layer-wise streaming --------------------------------------------------------------


@pytest.mark.parametrize("lands", ["before", "after"])
def test_stream_starts_with_the_prefill_and_admits_when_both_ended(lands):
  """The copy starts at the prefill's launch with decode pages reserved; the request
  joins the decode batch only once the copy landed and the step ended, in either
  order, and its prefill pages are freed only then. Catches admitting a request
  whose prefill has not finished, or freeing its prefill pages while they stream."""
  h = streaming()
  a = h.submit(8, 4)
  src, step = h.step_of(a)
  dst = h.coord.decodes[0]
  assert [c[0] for c in h.ex.copies] == [a] and step.streams == [(a, dst)]
  assert pages_of(h, a) == {src.name: 2, dst.name: 3}  # prompt 8; 8 + 1 on decode
  if lands == "before":
    h.finish_copy(a)
    assert a.num_output == 0 and h.step_of(a) == (src, step)  # landed, prefill running
    assert pages_of(h, a)[src.name] == 2
    h.complete(src)
  else:
    h.complete(src)
    assert a.num_output == 1 and pages_of(h, a)[src.name] == 2  # prefilled, still copying
    assert h.step_of(a) is None
    h.finish_copy(a)
  assert pages_of(h, a) == {src.name: 0, dst.name: 3}
  assert h.step_of(a)[0] is dst  # decoding
  h.drain()
  assert a.finish_reason == "length"


def test_stream_failed_before_its_step_ended_is_recomputed_when_the_step_ends():
  """Across worker processes a stream can fail while its prefill runs (a pull from a
  decode worker lost or past the copy time-out; the prefill itself fine): at the
  step's end the request is recomputed, as a failed hand-off is, and finishes
  (the harness checks after every event that no page is left behind). Catches
  ending it with an error although it could be served, or admitting KV that never
  landed."""
  h = streaming()
  a = h.submit(8, 4)
  src, step = h.step_of(a)
  h.ex.copies = [c for c in h.ex.copies if c[0] is not a]
  h.coord.copy_done(a, h._tick(), failed=True)  # the executor's report, step running
  assert a.end_reason is None and h.step_of(a) == (src, step)
  h.complete(src)
  assert a.num_preemptions == 1 and a.end_reason is None
  assert h.step_of(a)[0] is src  # its prompt and token prefilled again (and streamed)
  h.drain()
  assert a.finish_reason == "length" and a.num_output == 4


@pytest.mark.parametrize("order", [(0, 1, 2), (2, 1, 0), (1, 2, 0)])
def test_streams_landed_before_their_step_are_admitted_in_the_steps_order(order):
  """Copies that land while their prefill step runs are admitted when it ends in
  the step's order (oldest first), whatever order they landed in: the first
  admitted starts the decode instance's next step alone. Catches walking them in an
  order of their own (a set iterates by address, which the engine and the
  simulator's replay of it do not share)."""
  h = streaming(num_pages={"prefill": 17, "decode": 33})
  h.hold("prefill0")
  reqs = [h.submit(8, 4) for _ in range(3)]
  h.release("prefill0")
  src, step = h.step_of(reqs[0])
  dst = h.coord.decodes[0]
  assert step.streams == [(r, dst) for r in reqs]
  for k in order:
    h.finish_copy(reqs[k])
  h.complete(src)
  assert dst.sched.admitted == reqs
  assert h.step_of(reqs[0])[1].decodes == [reqs[0]]
  h.drain()
  assert all(r.finish_reason == "length" for r in reqs)


def test_no_stream_while_a_handoff_waits():
  """FCFS: a prompt that waits in prefill memory for decode pages goes first; a
  later prefill does not take decode pages ahead of it by streaming."""
  h = streaming(num_pages={"prefill": 17, "decode": 4})  # 3 usable decode pages
  a = h.submit(8, 4)  # streams: takes all 3 decode pages
  b = h.submit(8, 4)
  h.complete()  # a's prefill
  assert b.num_output == 0 and h.step_of(b) is not None
  h.complete()  # b's prefill ran unstreamed: no decode room; it waits as a hand-off
  assert h.coord.prefills[0].sched.handoffs == (b,)
  c = h.submit(4, 4)
  _, step = h.step_of(c)
  assert step.streams == []  # b waits: c does not stream past it
  h.drain()
  assert {r.finish_reason for r in (a, b, c)} == {"length"}


def test_no_stream_for_a_request_ending_with_its_first_token():
  h = streaming()
  a = h.submit(8, 1)
  _, step = h.step_of(a)
  assert step.streams == [] and not h.ex.copies
  h.drain()
  assert a.finish_reason == "length" and a.num_output == 1


@pytest.mark.parametrize("how", ["stop", "abort"])
def test_streamed_request_ending_at_its_prefill_ends_when_the_copy_lands(how):
  """A stop token at the first output (or an abort during the prefill) ends a
  streamed request only once its copy has landed: the decode pages the copy writes
  into are freed then, never under it."""
  h = streaming()
  a = h.submit(8, 4)
  src, _ = h.step_of(a)
  dst = h.coord.decodes[0]
  if how == "abort":
    h.abort(a)
  h.complete(src, stop=[a] if how == "stop" else [])
  assert a.finish_time is None and pages_of(h, a) == {src.name: 2, dst.name: 3}
  h.finish_copy(a)
  assert a.finish_time == h.now and pages_of(h, a) == {src.name: 0, dst.name: 0}
  if how == "abort":
    assert_freed(h, a)
  else:
    assert a.finish_reason == "stop" and a.num_output == 1
  h.drain()


def test_streamed_requests_preempted_on_decode_recompute_and_stream_again():
  h = streaming(num_pages={"prefill": 17, "decode": 7})
  reqs = [h.submit(4, 12) for _ in range(4)]
  h.drain()
  assert h.coord.num_preemptions > 0
  assert all(r.finish_reason == "length" and r.num_output == 12 for r in reqs)


# --- elastic roles ---------------------------------------------------------------------


def test_move_prefill_to_decode_hands_its_queue_on_and_keeps_its_finished_prompts():
  """A prefill group moving to decode: its queued prompts go to the other prefill
  group, its step in flight ends, then its decode twin serves the prompts it
  finished, in place (their KV stays in its pool: no copy). The decode twin keeps
  the deployment's decode limits: a twin built without its `max_decode_tokens`
  would let a moved group's decode steps attend over more tokens than the cap (a
  cap far above this test's contexts, so the decisions are those without one)."""
  h = elastic(n_prefill=2, n_decode=1,
              decode=dataclasses.replace(SPEC, max_decode_tokens=4096))
  c = h.coord
  h.hold("decode0")  # hand-offs stay in prefill memory
  a = h.submit(8, 4)
  b = h.submit(8, 4)  # on the other prefill group
  q = h.submit(6, 3)  # queued behind a
  h.submit(6, 3)  # queued behind b: equal loads
  p0, p1 = h.step_of(a)[0], h.step_of(b)[0]
  assert h.step_of(q) is None and p0.sched.num_waiting == 1
  assert c.move(DECODE, h.now) == p0.group  # equal loads: the first
  assert p0 not in c.prefills and p0.sched.num_waiting == 0
  assert p1.sched.num_waiting == 2  # q moved
  assert c.move(PREFILL, h.now) is None  # one move at a time
  h.complete(p0)  # a prefilled; p0 drained: its decode twin serves
  twin = c._twin[p0]
  assert twin in c.decodes and a in twin.sched.held() and pages_of(h, a)[p0.group] == 3
  assert twin.sched.max_decode_tokens == c.decodes[0].sched.max_decode_tokens == 4096
  assert not h.ex.copies or all(r is not a for r, *_ in h.ex.copies)
  assert c.role_history[-1][1:] == (1, 2)
  h.drain()
  assert all(r.finish_reason == "length" for r in (a, b, q))


def test_move_decode_to_prefill_migrates_its_requests():
  """A decode group moving to prefill takes no more hand-offs; between its steps its
  requests move (a KV copy of all they cached) to the other decode group, and only
  once it holds nothing does its prefill twin take prompts. Catches a lost token, a
  page freed under a copy, or a prefill twin serving beside live decodes."""
  h = elastic(n_prefill=1, n_decode=2)
  c = h.coord
  a, b = h.submit(8, 6), h.submit(8, 6)
  h.run_until(lambda: a.num_output >= 2 and b.num_output >= 2)
  d0, d1 = c.decodes
  x = next(r for r in (a, b) if held_by(h, r) is d0)
  step = h.step_of(x)
  assert c.move(PREFILL, h.now) == d0.group  # equal loads: the first
  assert d0 not in c.decodes and c._twin[d0] not in c.prefills
  if step is not None:  # in a step: it migrates once that step ends
    assert not h.ex.copies
    h.complete(step[0])
  (r, src, dst), = h.ex.copies
  assert (r, src, dst) == (x, d0, d1) and x.finish_time is None
  assert pages_of(h, x)[d0.name] == pages_of(h, x)[d1.name] == pages_for(x.kv_len + 1, PAGE)
  assert c._twin[d0] in c.prefills  # d0 holds no request: it prefills now
  n = x.num_output
  h.finish_copy(x)
  assert pages_of(h, x)[d0.name] == 0 and held_by(h, x) is d1 and x.num_output == n
  assert c.role_history[-1][1:] == (2, 1)
  e = h.submit(8, 4)
  h.submit(8, 4)
  h.run_until(lambda: e.num_output >= 1)
  h.drain()
  assert all(r.finish_reason == "length" for r in h.reqs)


def test_group_lost_while_moving_keeps_its_role_and_serves_it_once_readmitted():
  """A decode group lost while it drains toward prefill: the move is called off and
  the group is listed as decode again, so once its worker is back it takes hand-offs.
  Catches the move's cancellation leaving the group in no role's list (readmitted, it
  would never serve again)."""
  h = elastic(n_prefill=1, n_decode=2)
  c = h.coord
  a, b = h.submit(8, 6), h.submit(8, 6)
  h.run_until(lambda: a.num_output >= 2 and b.num_output >= 2)
  d0, d1 = c.decodes
  assert c.move(PREFILL, h.now) == d0.group
  assert any(g.target == PREFILL for g in c.groups), "moved at once: nothing to lose mid-way"
  h.lose(d0.group)
  assert all(g.target is None for g in c.groups) and c.decodes == [d0, d1]
  for inst in c.instances:
    if inst.group == d0.group:
      c.readmit(inst, h._tick())
  h.check()
  reqs = [h.submit(8, 4) for _ in range(6)]
  handed_to = set()

  def ended():
    handed_to.update(dst for _, _, dst in h.ex.copies)
    return all(r.finish_time is not None for r in reqs)
  h.run_until(ended)
  h.drain()
  assert all(r.finish_reason == "length" for r in reqs)
  assert d0 in handed_to, "the readmitted decode group took no hand-off"


def test_new_prefill_group_takes_the_newest_queued_prompts():
  """A group that starts prefilling levels the queues: it takes the newest prompts
  queued on the busiest prefill group (they hold no pages), keeping their order."""
  h = elastic(n_prefill=1, n_decode=2)
  h.hold("prefill0")
  reqs = [h.submit(8, 3) for _ in range(6)]
  p0 = h.coord.prefills[0]
  assert p0.sched.num_waiting == 6
  g = h.coord.move(PREFILL, h.now)
  new = h.coord._twin[h.coord.groups[[x.name for x in h.coord.groups].index(g)].twins[
      DECODE][0]]
  assert new in h.coord.prefills and p0.sched.num_waiting == 3
  assert [c.request for c in h.step_of(reqs[3])[1].prefills][:1] == [reqs[3]]
  assert h.step_of(reqs[3])[0] is new
  h.drain()
  assert all(r.finish_reason == "length" for r in reqs)


def test_migration_waits_for_room_and_decodes_meanwhile():
  """With no room on the other decode group, the draining group keeps decoding its
  request until it ends (or room appears)."""
  h = elastic(n_prefill=1, n_decode=2, num_pages={"prefill": 17, "decode": 5})
  c = h.coord
  a, b = h.submit(8, 8), h.submit(8, 8)  # one per decode pool; each fills it
  h.run_until(lambda: a.num_output >= 2 and b.num_output >= 2)
  assert c.move(PREFILL, h.now) is not None
  h.run_until(lambda: not h.ex.steps or any(s.decodes for _, s in h.ex.steps))
  assert not h.ex.copies  # no room: no migration
  h.drain()
  assert a.finish_reason == b.finish_reason == "length"
  assert c.role_history[-1][1:] == (2, 1)


def test_the_last_instance_of_a_role_never_moves():
  h = elastic(n_prefill=1, n_decode=1)
  assert h.coord.move(PREFILL, h.now) is None and h.coord.move(DECODE, h.now) is None
  with pytest.raises(ValueError, match="role must be"):
    h.coord.move("both", h.now)


def test_controller_moves_a_decode_instance_when_ttft_misses():
  """Every first token later than the TTFT SLO, every TPOT met: after a window the
  controller moves one decode group to prefill, and stops at the decode minimum."""
  h = elastic(n_prefill=1, n_decode=3, window=2, slos=dict(ttft_slo=0.5, tpot_slo=100.0))
  for _ in range(10):
    h.submit(8, 3)
    h.submit(8, 3)
    h.run_until(lambda: all(r.num_output for r in h.reqs))
  h.drain()
  counts = [(p, d) for _, p, d in h.coord.role_history]
  assert counts[0] == (1, 3) and counts[-1] == (3, 1)
  assert all(p + d == 4 for p, d in counts)


def test_elastic_with_streaming_moves_and_finishes():
  h = elastic(n_prefill=2, n_decode=2, kv_transfer="layerwise",
              num_pages={"prefill": 17, "decode": 9})
  reqs = [h.submit(p, o) for p, o in [(8, 6), (4, 8), (12, 3), (6, 6)] * 2]
  h.run_until(lambda: any(r.num_output >= 2 for r in reqs))
  assert h.coord.move(PREFILL, h.now) is not None
  h.run_until(lambda: h.coord.groups and all(g.target is None for g in h.coord.groups))
  assert h.coord.move(DECODE, h.now) is not None
  h.drain()
  assert all(r.finish_reason == "length" for r in reqs)
  assert len(h.coord.role_history) == 3


# --- the controller's rule -------------------------------------------------------------


def _served(ttft: float, tpot: float) -> Request:
  r = Request(0, 4, 3, arrival_time=0.0)
  r.token_times = [ttft, ttft + tpot, ttft + 2 * tpot]
  r.num_output, r.finish_time = 3, ttft + 2 * tpot
  return r


@pytest.mark.parametrize("ttft_ok,tpot_ok,want", [
    (10, 10, None),  # both met
    (2, 10, PREFILL),  # TTFT misses: prefill gains an instance
    (10, 2, DECODE),
    (5, 6, None),  # 0.5 vs 0.6: within the hysteresis
    (0, 0, None),  # both miss alike: no move helps
])
def test_role_controller_rule(ttft_ok, tpot_ok, want):
  """Of a window of 10 requests, `ttft_ok` meet the TTFT SLO and `tpot_ok` the TPOT
  SLO (target 0.9, hysteresis 0.15)."""
  ctl = RoleController(1.0, 0.1, ElasticConfig(window=10, hysteresis=0.15), 2, 2)
  for k in range(10):
    r = _served(0.5 if k < ttft_ok else 2.0, 0.05 if k < tpot_ok else 0.2)
    ctl.first_token(r)
    ctl.finished(r)
    assert ctl.decide(2, 2) is (want if k == 9 else None)


def test_role_controller_holds_during_a_move_and_keeps_minimums():
  ctl = RoleController(1.0, 0.1, ElasticConfig(window=2, min_decode=2), 2, 2, start_time=5.0)
  slow = _served(3.0, 0.05)
  for _ in range(2):
    ctl.first_token(slow)
  assert ctl.decide(2, 2) is None  # PREFILL wanted, but decode is at its minimum
  for _ in range(2):
    ctl.first_token(slow)
  assert ctl.decide(1, 3) == PREFILL
  ctl.hold()
  for _ in range(4):
    ctl.first_token(slow)
  assert ctl.decide(1, 3) is None  # samples during a move are dropped
  ctl.moved(9.0, 2, 2)
  assert ctl.history == [(5.0, 2, 2), (9.0, 2, 2)]


@pytest.mark.parametrize("bad,field", [(dict(window=0), "window"), (dict(target=0), "target"),
                                       (dict(hysteresis=1.0), "hysteresis"),
                                       (dict(min_decode=0), "min_decode")])
def test_bad_elastic_config(bad, field):
  dep = deploy.Disaggregated(elastic=ElasticConfig(**bad))
  with pytest.raises(ValueError, match=field):
    dep.check()


def test_bad_streaming_deployments():
  with pytest.raises(ValueError, match="kv_transfer"):
    deploy.Disaggregated(kv_transfer="pipelined").check()
  with pytest.raises(ValueError, match="layer_groups=3 must be a multiple of pp=2"):
    deploy.Disaggregated(InstanceSpec(pp=2), kv_transfer="layerwise", layer_groups=3).check()
  with pytest.raises(ValueError, match="layer_groups=4 does not divide"):
    deploy.Disaggregated(kv_transfer="layerwise", layer_groups=4).check_layers(6)
  deploy.Disaggregated(kv_transfer="whole", layer_groups=3).check_layers(4)  # unused: fine
  with pytest.raises(ValueError, match="ttft_slo and tpot_slo"):
    coordinator.build(deploy.Disaggregated(elastic=ElasticConfig()), ManualExecutor(17))


# --- random event sequences ------------------------------------------------------------


@st.composite
def deployments(draw):
  """A disaggregated deployment with streaming or not, elastic or not (a controller
  that moves on windows of 1-4 requests, or only by hand), and pools that fit the
  largest ordinary request."""
  page_policy = draw(st.sampled_from(["on_demand", "reserve"]))

  def spec():
    max_batch = draw(st.integers(1, 4))
    return InstanceSpec(max_batch=max_batch, max_step_tokens=draw(st.integers(max_batch + 1,
                                                                              16)),
                        page_policy=page_policy)

  window = draw(st.sampled_from([None, 1, 4, 1000]))
  dep = deploy.Disaggregated(
      spec(), spec(), draw(st.integers(1, 2)), draw(st.integers(1, 2)),
      kv_transfer=draw(st.sampled_from(deploy.KV_TRANSFERS)),
      elastic=None if window is None else ElasticConfig(window=window, hysteresis=0.0))
  need = pages_for(MAX_PROMPT + MAX_OUT, PAGE) + 1  # one page is reserved
  pages = st.integers(need, need + 2)
  return dep, {"prefill": draw(pages), "decode": draw(pages)}


MOVES = st.lists(st.one_of(st.tuples(st.just("move"), st.sampled_from([PREFILL, DECODE]))),
                 max_size=6)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(deployments(), EVENTS, MOVES, st.randoms(use_true_random=False))
def test_random_events_with_streams_and_moves(deployment, events, moves, rng):
  """Random arrivals, step and copy completions (streamed copies landing before or
  after their step), stop tokens, aborts, device holds, failed steps and copies,
  lost instances (a worker process died: a prefill's streams in flight fail with
  its step) and role moves, in any order: pages stay consistent after every event
  (no page leaked, none held by an ended request), and once drained every request
  has ended exactly once, every pool is full and every group serves one role."""
  dep, pages = deployment
  h = Harness(dep, pages, **(SLOS if dep.elastic else {}))
  groups = sorted({i.group for i in h.coord.instances})
  seq = list(events)
  for m in moves:  # moves interleaved at random points of the sequence
    seq.insert(rng.randint(0, len(seq)), m)
  moved = 0
  for kind, *args in seq:
    if kind == "move":
      if dep.elastic is not None:
        moved += h.coord.move(args[0], h._tick()) is not None
        h.check()
    else:  # "lose" too: a worker process died (both run across processes)
      apply_event(h, kind, args, groups)
  h.drain()
  if dep.elastic is not None:
    c = h.coord
    assert all(g.target is None for g in c.groups), "a move never completed"
    assert sorted(c.prefills + c.decodes, key=c.instances.index) == sorted(
        (i for g in c.groups for i in g.twins[g.role]), key=c.instances.index)
    event(f"moves by hand: {min(moved, 3)}, in all: {min(len(c.role_history) - 1, 6)}")
  event(f"{dep.kv_transfer}, elastic={dep.elastic is not None}")
  event(f"preempted: {h.coord.num_preemptions > 0}")
  event(f"failed: {any(r.finish_reason == 'error' for r in h.reqs)}")
