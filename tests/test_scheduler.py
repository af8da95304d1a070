"""Tests of the scheduling policies, the share controller and the partitioner."""

import random

import pytest
from hypothesis import given, settings, strategies as st

from pdserve_jax.core.pages import OutOfPages, PageAllocator, pages_for
from pdserve_jax.core import policies as S
from pdserve_jax.core import share
from pdserve_jax.core.share import PartitionerConfig
from pdserve_jax.core.step import DECODE, PREFILL, PrefillChunk, Step
from pdserve_jax.core.request import Request


def _req(i, prompt, out, t=0.0):
  return Request(request_id=i, prompt_len=prompt, max_tokens=out, arrival_time=t)


# --- Request -------------------------------------------------------------------------


def test_request_properties():
  r = _req(0, 10, 3, t=1.0)
  assert not r.done and r.ttft is None and r.tpot is None and r.kv_len == 0
  r.num_prefilled, r.num_output, r.token_times = 10, 1, [1.5]
  assert r.kv_len == 10 and r.ttft == pytest.approx(0.5) and r.tpot is None
  r.num_output, r.token_times = 3, [1.5, 2.0, 2.5]
  assert r.done and r.kv_len == 12 and r.tpot == pytest.approx(0.5)
  f = r.fresh()
  assert f.num_output == 0 and f.token_times == [] and f.prompt_len == 10
  assert f != r and len({r, f}) == 2  # identity hashing
  with pytest.raises(ValueError, match="prompt_len"):
    _req(1, 0, 1)
  with pytest.raises(ValueError, match="max_tokens"):
    _req(1, 1, 0)


# --- A generic driver ----------------------------------------------------------------


def _drive(sched, reqs, rng, stop_prob=0.0, arrivals_per_step=2, max_steps=10_000):
  """Runs `reqs` through a colocated scheduler, checking invariants every step.

  Returns the admission order and the steps taken, with each step's chunks'
  `last` as they were when it was scheduled (a later preemption changes them).
  """
  pending = list(reqs)
  admitted, steps, now, lasts = [], [], 0.0, []
  seen = set()
  for _ in range(max_steps):
    for _ in range(rng.randint(0, arrivals_per_step)):
      if pending:
        sched.add(pending.pop(0))
    step = sched.schedule()
    sched.allocator.check()
    if step is None:
      if not pending:
        break
      continue
    assert not step.empty
    for c in step.prefills:
      if c.request not in seen:
        seen.add(c.request)
        admitted.append(c.request)
      assert 0 <= c.start < c.end <= c.request.prefill_len
    for r in [c.request for c in step.prefills if c.last]:
      if rng.random() < stop_prob:
        r.stopped = True
    assert step.decode_context == sum(r.kv_len + 1 for r in step.decodes)
    for r in step.decodes:
      assert r.prefill_done and not r.done
      if rng.random() < stop_prob:
        r.stopped = True
    now += 1.0
    steps.append(step)
    lasts.append([c.last for c in step.prefills])
    done = sched.complete(step, now)
    sched.allocator.check()
    for r in done:
      assert r.done and r.finish_time == now and not sched.allocator.pages(r)
  else:
    raise AssertionError("did not drain")
  assert sched.idle and sched.num_running == 0 and sched.num_waiting == 0
  assert sched.allocator.num_free == sched.allocator.capacity  # no page leaks
  return admitted, steps, lasts


_reqs_strategy = st.lists(st.tuples(st.integers(1, 48), st.integers(1, 12)),
                          min_size=1, max_size=25)


@settings(max_examples=40, deadline=None)
@given(shapes=_reqs_strategy, page_size=st.integers(1, 8), max_batch=st.integers(1, 6),
       budget=st.integers(48, 96), extra_pages=st.integers(0, 30),
       stop=st.sampled_from([0.0, 0.2]), seed=st.integers(0, 2**16),
       policy=st.sampled_from(S.PAGE_POLICIES))
def test_prefill_first_randomized(shapes, page_size, max_batch, budget, extra_pages,
                                  stop, seed, policy):
  reqs = [_req(i, p, o) for i, (p, o) in enumerate(shapes)]
  need = max(pages_for(r.lifetime_tokens, page_size) for r in reqs)
  alloc = PageAllocator(need + extra_pages + 1, page_size, reserved=1)
  sched = S.PrefillFirstScheduler(alloc, max_batch, budget, policy)
  admitted, steps, lasts = _drive(sched, reqs, random.Random(seed), stop)
  assert admitted == reqs  # FCFS
  for step, last in zip(steps, lasts):
    assert not (step.prefills and step.decodes)
    assert step.num_prefill_tokens <= budget or len(step.prefills) == 1
    assert len(step.prefills) <= max_batch and len(step.decodes) <= max_batch
    assert all(c.start == 0 for c in step.prefills) and all(last)
  if policy == "reserve":
    assert sched.num_preemptions == 0
  for r in reqs:
    assert len(r.token_times) == r.num_output
    assert r.num_output == r.max_tokens or r.stopped


@settings(max_examples=40, deadline=None)
@given(shapes=_reqs_strategy, page_size=st.integers(1, 8), max_batch=st.integers(1, 6),
       budget=st.integers(7, 40), extra_pages=st.integers(0, 30),
       stop=st.sampled_from([0.0, 0.2]), seed=st.integers(0, 2**16),
       policy=st.sampled_from(S.PAGE_POLICIES))
def test_chunked_prefill_randomized(shapes, page_size, max_batch, budget, extra_pages,
                                    stop, seed, policy):
  reqs = [_req(i, p, o) for i, (p, o) in enumerate(shapes)]
  need = max(pages_for(r.lifetime_tokens, page_size) for r in reqs)
  alloc = PageAllocator(need + extra_pages, page_size)
  sched = S.ChunkedPrefillScheduler(alloc, max_batch, budget, policy)
  admitted, steps, lasts = _drive(sched, reqs, random.Random(seed), stop)
  assert admitted == reqs
  for step, last in zip(steps, lasts):
    assert step.num_prefill_tokens + step.num_decode_tokens <= budget
    assert len({c.request for c in step.prefills} | set(step.decodes)) <= max_batch
    # At most one request is left with a partly cached prefill by any step.
    assert sum(not x for x in last) <= 1
    assert all(last[:-1])
  if policy == "reserve":
    assert sched.num_preemptions == 0
  for r in reqs:
    assert len(r.token_times) == r.num_output


def test_prefill_first_batches_and_budget():
  alloc = PageAllocator(100, 4)
  sched = S.PrefillFirstScheduler(alloc, max_batch=3, max_step_tokens=20)
  reqs = [_req(i, 8, 2) for i in range(5)]
  for r in reqs:
    sched.add(r)
  step = sched.schedule()  # 8 + 8 fit the budget of 20, a third does not
  assert [c.request for c in step.prefills] == reqs[:2] and not step.decodes
  sched.complete(step, 1.0)
  step = sched.schedule()  # one slot left under max_batch=3
  assert [c.request for c in step.prefills] == reqs[2:3]
  sched.complete(step, 2.0)
  step = sched.schedule()  # batch full: decode everything running
  assert not step.prefills and step.decodes == reqs[:3]
  done = sched.complete(step, 3.0)
  assert done == reqs[:3] and all(alloc.pages(r) == [] for r in done)
  long = _req(9, 21, 1)  # over the budget: runs in a step of its own
  sched.add(long)
  assert [c.request for c in sched.schedule().prefills] == reqs[3:5]


def test_prefill_first_waits_for_pages():
  alloc = PageAllocator(4, 4)  # 16 tokens
  sched = S.PrefillFirstScheduler(alloc, 4, 64)
  a, b = _req(0, 6, 4), _req(1, 6, 4)  # 10 tokens -> 3 pages each
  sched.add(a)
  sched.add(b)
  step = sched.schedule()
  assert [c.request for c in step.prefills] == [a]
  sched.complete(step, 1.0)
  for t in range(2, 5):
    step = sched.schedule()
    assert step.decodes == [a], "b must wait for a's pages"
    sched.complete(step, float(t))
  assert a.done and alloc.num_free == 4
  step = sched.schedule()
  assert [c.request for c in step.prefills] == [b]


def test_chunked_prefill_splits_and_resumes():
  alloc = PageAllocator(64, 4)
  sched = S.ChunkedPrefillScheduler(alloc, max_batch=4, max_step_tokens=8)
  a, b = _req(0, 20, 3), _req(1, 6, 2)
  sched.add(a)
  sched.add(b)
  spans = []
  while not sched.idle:
    step = sched.schedule()
    spans.append(([(c.request.request_id, c.start, c.end) for c in step.prefills],
                  [r.request_id for r in step.decodes]))
    sched.complete(step, float(len(spans)))
  assert spans[:4] == [
      ([(0, 0, 8)], []),
      ([(0, 8, 16)], []),
      ([(0, 16, 20), (1, 0, 4)], []),
      ([(1, 4, 6)], [0]),  # a decodes; b's remaining chunk uses the rest of the budget
  ]
  assert a.token_times[0] == 3.0 and b.token_times[0] == 4.0
  assert a.num_output == 3 and b.num_output == 2


def test_chunked_prefill_rejects_bad_budget():
  with pytest.raises(ValueError, match="max_step_tokens"):
    S.ChunkedPrefillScheduler(PageAllocator(8, 4), max_batch=8, max_step_tokens=8)


@pytest.mark.parametrize("make", [
    lambda a: S.PrefillFirstScheduler(a, 4, 1000),
    lambda a: S.ChunkedPrefillScheduler(a, 4, 64),
])
def test_too_long_request_rejected_cleanly(make):
  alloc = PageAllocator(5, 4, reserved=1)  # 16 tokens usable
  sched = make(alloc)
  with pytest.raises(ValueError, match=r"request 7 \(prompt 10 \+ max_tokens 7\).*5 pages"):
    sched.add(_req(7, 10, 7))
  assert sched.idle and alloc.num_free == alloc.capacity and not alloc.owners()
  sched.add(_req(8, 10, 6))  # exactly 16 tokens fits
  assert sched.num_waiting == 1


def test_protocol_errors():
  sched = S.PrefillFirstScheduler(PageAllocator(16, 4), 2, 64)
  r = _req(0, 4, 2)
  sched.add(r)
  step = sched.schedule()
  with pytest.raises(RuntimeError, match="in flight"):
    sched.schedule()
  with pytest.raises(RuntimeError, match="did not schedule"):
    sched.complete(Step([], [r]), 1.0)
  sched.complete(step, 1.0)
  with pytest.raises(ValueError, match="fresh"):
    sched.add(r)


def test_chunk_start_mismatch_is_refused():
  """A chunk must start where the request's cached tokens end: a step completed
  after something else advanced its request would write KV at the wrong place."""
  sched = S.ChunkedPrefillScheduler(PageAllocator(16, 4), max_batch=2, max_step_tokens=8)
  r = _req(0, 20, 2)
  sched.add(r)
  step = sched.schedule()
  assert [(c.start, c.end) for c in step.prefills] == [(0, 8)]
  r.num_prefilled = 3
  with pytest.raises(RuntimeError, match="request 0: chunk starts at 0 but 3 tokens are cached"):
    sched.complete(step, 1.0)


def test_phase_schedulers_refuse_steps_of_the_other_phase():
  """A prefill-only scheduler never completes a decode step, nor a decode-only one a
  prefill step; the refused step changes nothing, and the real one completes."""
  pre = S.PrefillScheduler(PageAllocator(16, 4), max_batch=2, max_step_tokens=64)
  a = _req(0, 4, 3)
  pre.add(a)
  step = pre.schedule()
  with pytest.raises(RuntimeError, match="prefill scheduler's step has no decodes"):
    pre.complete(Step(step.prefills, [a]), 1.0)
  assert pre.complete(step, 1.0) == [] and pre.handoffs == (a,)

  dec = S.DecodeScheduler(PageAllocator(16, 4), max_batch=2)
  b = _req(1, 4, 3)
  b.num_prefilled, b.num_output, b.token_times = 4, 1, [0.0]
  dec.reserve(b)
  dec.admit(b)
  step = dec.schedule()
  with pytest.raises(RuntimeError, match="decode scheduler's step has no prefills"):
    dec.complete(Step([PrefillChunk(b, 0, b.prompt_len)], step.decodes), 2.0)
  assert dec.complete(step, 2.0) == [] and b.num_output == 2


def test_requeue_takes_only_preempted_requests():
  """`requeue` is for a request preempted elsewhere (no KV cached, tokens to
  recompute): a fresh request, or one with KV cached, is refused and not queued."""
  pre = S.PrefillScheduler(PageAllocator(16, 4), max_batch=2, max_step_tokens=64)
  fresh = _req(0, 4, 3)
  with pytest.raises(ValueError, match="request 0 was not preempted"):
    pre.requeue(fresh)
  cached = _req(1, 4, 3)
  cached.num_prefilled, cached.num_output, cached.num_recompute = 4, 2, 1
  with pytest.raises(ValueError, match="request 1 was not preempted"):
    pre.requeue(cached)
  assert pre.num_waiting == 0 and pre.schedule() is None


def test_reserving_twice_is_refused():
  """A second `reserve` of one request would give it two page lists' worth of a
  copy target: refused, and its pages are unchanged."""
  alloc = PageAllocator(16, 4)
  dec = S.DecodeScheduler(alloc, max_batch=2)
  r = _req(0, 6, 3)
  r.num_prefilled, r.num_output, r.token_times = 6, 1, [0.0]
  dec.reserve(r)
  pages = list(alloc.pages(r))
  with pytest.raises(ValueError, match="request 0 already holds pages here"):
    dec.reserve(r)
  assert alloc.pages(r) == pages and dec.num_waiting == 1
  alloc.check()


# --- Disaggregated -------------------------------------------------------------------


def test_handoff_waits_when_decode_memory_is_full():
  p_alloc, d_alloc = PageAllocator(16, 4), PageAllocator(4, 4)  # decode: 16 tokens
  pre = S.PrefillScheduler(p_alloc, max_batch=4, max_step_tokens=64)
  dec = S.DecodeScheduler(d_alloc, max_batch=4, page_policy="reserve")
  a, b = _req(0, 6, 3), _req(1, 6, 3)  # 9 tokens -> 3 decode pages each
  pre.add(a)
  pre.add(b)
  step = pre.schedule()
  assert len(step.prefills) == 2
  assert pre.complete(step, 1.0) == []
  assert pre.handoffs == (a, b) and len(p_alloc.pages(a)) == 2  # prompt only
  # Decode pulls a; b stays in prefill memory.
  assert dec.can_accept(a)
  dec.reserve(pre.take_handoff())
  assert not dec.can_accept(b) and pre.peek_handoff() is b
  with pytest.raises(OutOfPages):
    dec.reserve(b)
  assert not d_alloc.pages(b)
  assert dec.num_waiting == 1 and dec.schedule() is None  # copy not done
  pre.release_handoff(a)
  assert p_alloc.pages(a) == [] and p_alloc.pages(b)
  dec.admit(a)
  for t in (2.0, 3.0):
    step = dec.schedule()
    assert step.decodes == [a]
    done = dec.complete(step, t)
  assert done == [a] and a.token_times == [1.0, 2.0, 3.0]
  assert dec.can_accept(b)
  dec.reserve(pre.take_handoff())
  pre.release_handoff(b)
  dec.admit(b)
  assert pre.idle and p_alloc.num_free == p_alloc.capacity
  p_alloc.check()
  d_alloc.check()
  with pytest.raises(KeyError):
    pre.release_handoff(b)


def test_prefill_memory_is_the_queue():
  p_alloc = PageAllocator(4, 4)  # 16 tokens of prompt
  pre = S.PrefillScheduler(p_alloc, max_batch=8, max_step_tokens=64)
  reqs = [_req(i, 8, 2) for i in range(3)]
  for r in reqs:
    pre.add(r)
  step = pre.schedule()
  assert [c.request for c in step.prefills] == reqs[:2]
  pre.complete(step, 1.0)
  assert pre.schedule() is None  # hand-offs hold all pages
  pre.take_handoff()
  assert pre.schedule() is None  # still held during the copy
  pre.release_handoff(reqs[0])
  step = pre.schedule()
  assert [c.request for c in step.prefills] == reqs[2:]


def test_prefill_scheduler_frees_single_token_requests():
  alloc = PageAllocator(8, 4)
  pre = S.PrefillScheduler(alloc, 4, 64)
  a, b = _req(0, 5, 1), _req(1, 5, 2)
  pre.add(a)
  pre.add(b)
  step = pre.schedule()
  assert pre.complete(step, 1.0) == [a]
  assert alloc.pages(a) == [] and pre.handoffs == (b,)


def test_decode_rejects_unfit_and_unready():
  dec = S.DecodeScheduler(PageAllocator(4, 4), 2)
  big = _req(3, 10, 7)
  with pytest.raises(ValueError, match="request 3.*decode KV pool"):
    dec.reserve(big)
  r = _req(4, 4, 4)
  dec.reserve(r)
  with pytest.raises(ValueError, match="not ready"):
    dec.admit(r)
  with pytest.raises(ValueError, match="too few pages"):
    dec.admit(_req(5, 4, 4))


def test_decode_batch_cap_and_fcfs():
  dec = S.DecodeScheduler(PageAllocator(100, 4), max_batch=2)
  reqs = []
  for i in range(3):
    r = _req(i, 4, 3)
    r.num_prefilled, r.num_output, r.token_times = 4, 1, [0.0]
    dec.reserve(r)
    dec.admit(r)
    reqs.append(r)
  step = dec.schedule()
  assert step.decodes == reqs[:2] and dec.num_waiting == 1
  assert step.decode_context == 2 * 5
  dec.complete(step, 1.0)
  step = dec.schedule()
  assert step.decodes == reqs[:2]
  dec.complete(step, 2.0)
  assert dec.schedule().decodes == reqs[2:]


@settings(max_examples=25, deadline=None)
@given(shapes=_reqs_strategy, n_dec=st.integers(1, 3), dec_pages=st.integers(0, 12),
       seed=st.integers(0, 2**16))
def test_disaggregated_randomized(shapes, n_dec, dec_pages, seed):
  rng = random.Random(seed)
  reqs = [_req(i, p, o) for i, (p, o) in enumerate(shapes)]
  ps = 4
  need = max(pages_for(r.lifetime_tokens, ps) for r in reqs)
  pre = S.PrefillScheduler(PageAllocator(need + 2, ps), 3, 96)
  decs = [S.DecodeScheduler(PageAllocator(need + dec_pages, ps), 3) for _ in range(n_dec)]
  for r in reqs:
    pre.add(r)
  copying, steps = [], 0
  while not (pre.idle and all(d.idle for d in decs)):
    steps += 1
    assert steps < 5000
    step = pre.schedule()
    if step is not None:
      pre.complete(step, float(steps))
    # Copies finish one step after they start.
    for r, d in copying:
      pre.release_handoff(r)
      d.admit(r)
    copying = []
    while pre.peek_handoff() is not None:
      head = pre.peek_handoff()
      d = S.least_loaded(decs, lambda d: d.can_accept(head))
      if d is None:
        break
      d.reserve(pre.take_handoff())
      copying.append((head, d))
    for d in decs:
      step = d.schedule()
      for r in reversed(d.take_preempted()):  # recomputed by prefill, as coordinators do
        pre.requeue(r)
      if step is not None:
        assert step.decode_context == sum(r.kv_len + 1 for r in step.decodes)
        for r in step.decodes:
          r.stopped = rng.random() < 0.1
        d.complete(step, float(steps))
      d.allocator.check()
    pre.allocator.check()
  for a in [pre.allocator] + [d.allocator for d in decs]:
    assert a.num_free == a.capacity
  assert all(r.done and r.finish_time is not None for r in reqs)


def test_least_loaded_ties_and_filter():
  class Inst:
    def __init__(self, w, r):
      self.num_waiting, self.num_running = w, r
  insts = [Inst(1, 1), Inst(0, 2), Inst(0, 1), Inst(1, 0)]
  assert S.least_loaded(insts) is insts[2]
  assert S.least_loaded(insts, lambda i: i is not insts[2]) is insts[3]
  assert S.least_loaded(insts, lambda i: False) is None


# --- semi-PD ---------------------------------------------------------------------------


def test_semi_pd_handoff_keeps_pages():
  alloc = PageAllocator(16, 4)
  pre = S.PrefillScheduler(alloc, 4, 64, "reserve", shared=True)
  dec = S.DecodeScheduler(alloc, 4)
  r = _req(0, 6, 5)
  pre.add(r)
  step = pre.schedule()
  assert len(alloc.pages(r)) == pages_for(11, 4)  # the whole life, at admission
  pre.complete(step, 1.0)
  pages = list(alloc.pages(r))
  assert S.move_handoffs(pre, dec) == 1
  assert alloc.pages(r) == pages and pre.idle and dec.num_waiting == 1
  while not dec.idle:
    step = dec.schedule()
    dec.complete(step, 2.0)
  assert alloc.num_free == alloc.capacity
  alloc.check()
  with pytest.raises(ValueError, match="one allocator"):
    S.move_handoffs(pre, S.DecodeScheduler(PageAllocator(4, 4), 1))


def test_share_controller_follows_share():
  rng = random.Random(0)
  for x in (0.2, 0.5, 0.7):
    c = share.ShareController(x)
    for _ in range(4000):
      phase = c.pick(True, True)
      c.record(phase, rng.uniform(0.001, 0.05) if phase == PREFILL
               else rng.uniform(0.01, 0.02))
    p, d = c.busy[PREFILL], c.busy[DECODE]
    assert p / (p + d) == pytest.approx(x, abs=0.01)


def test_share_controller_no_debt_after_idle_spell():
  c = share.ShareController(0.5)
  for _ in range(100):  # decode runs alone for a while
    assert c.pick(False, True) == DECODE
    c.record(DECODE, 1.0)
  picks = []
  for _ in range(10):
    ph = c.pick(True, True)
    picks.append(ph)
    c.record(ph, 1.0)
  assert picks.count(DECODE) == 5
  assert c.pick(False, False) is None
  c.set_share(0.8)
  assert c.prefill_share == 0.8
  with pytest.raises(ValueError, match="strictly between"):
    c.set_share(1.0)
  with pytest.raises(ValueError, match="phase"):
    c.record("both", 1.0)


def _finished(ttft, tpot, n=8, t=0.0):
  r = _req(0, 4, n, t=t)
  r.token_times = [t + ttft + i * tpot for i in range(n)]
  r.num_output = n
  r.finish_time = r.token_times[-1]
  return r


def test_partitioner_moves_toward_violated_phase():
  p = share.SloPartitioner(1.0, 0.1, PartitionerConfig(window=10, step=0.1, min_share=0.2,
                                                        max_share=0.8, hysteresis=0.1))
  for _ in range(6):  # TTFT 3x over, TPOT fine: prefill share rises to the bound
    for _ in range(10):
      p.observe(_finished(3.0, 0.05))
  assert p.share == pytest.approx(0.8)
  shares = [s for _, s in p.history]
  assert shares == pytest.approx([0.5, 0.6, 0.7, 0.8])
  for _ in range(10):  # TPOT violated: decode's share rises to its bound
    for _ in range(10):
      p.observe(_finished(0.5, 0.3))
  assert p.share == pytest.approx(0.2)
  diffs = [b[1] - a[1] for a, b in zip(p.history, p.history[1:])]
  assert all(abs(abs(d) - 0.1) < 1e-9 for d in diffs)


def test_partitioner_holds_within_slo_and_hysteresis():
  p = share.SloPartitioner(1.0, 0.1, PartitionerConfig(window=5, step=0.1, hysteresis=0.2))
  for i in range(200):  # both within SLO, alternating which is closer
    p.observe(_finished(0.9 if i % 10 < 5 else 0.3, 0.03 if i % 10 < 5 else 0.09))
  assert p.history == [(0.0, 0.5)]
  for _ in range(50):  # both violated by similar ratios: no oscillation
    p.observe(_finished(1.5, 0.16))
  assert p.history == [(0.0, 0.5)]
  for i in range(5):  # single-token requests count towards TTFT only
    assert p.observe(_finished(2.0, 0.05, n=1 if i else 8)) in (None, 0.6)
  assert p.share == pytest.approx(0.6)
  with pytest.raises(ValueError, match="positive"):
    share.SloPartitioner(0.0, 0.1)
