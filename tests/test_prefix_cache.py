"""The prefix cache without devices: page keys, the allocator's cache, the schedulers'
use of it, and random event sequences on every coordinator with shared prefixes
(the `test_coordinator` harness, with caching pools and requests that carry keys).
"""

import dataclasses
import os

import pytest
from hypothesis import event, given, settings, strategies as st

from pdserve_jax import workloads as W
from pdserve_jax.core import coordinator, deploy
from pdserve_jax.core import policies as S
from pdserve_jax.core.deploy import InstanceSpec
from pdserve_jax.core.pages import OutOfPages, PageAllocator, pages_for
from pdserve_jax.core.prefix import Blocks, block_keys, block_tokens, reuse_bound, token_keys
from pdserve_jax.core.request import Request
from pdserve_jax.model.config import get_preset
from pdserve_jax.sim import hardware as H
from pdserve_jax.sim import latency as L
from pdserve_jax.sim import simulator as sim
from pdserve_jax.core.elastic import ElasticConfig
from pdserve_jax.core.step import DECODE, PREFILL
from test_coordinator import PAGE, SLOS, Harness, ManualExecutor, apply_event

# --- page keys ----------------------------------------------------------------------


def test_token_keys_name_a_page_with_everything_before_it():
  """A key must change with any earlier token (or two prompts that differ early
  would share later pages: wrong KV), and a partial page has none."""
  a = list(range(20))
  keys = token_keys(a, 4)
  assert len(keys) == 5 and len(token_keys(a[:19], 4)) == 4
  b = list(a)
  b[6] = 99  # page 1
  kb = token_keys(b, 4)
  assert kb[0] == keys[0] and all(x != y for x, y in zip(kb[1:], keys[1:]))
  assert token_keys(a + [7, 8], 4)[:5] == keys  # a longer prompt shares every page


@pytest.mark.parametrize("page", [4, 8, 16, 32])
def test_block_keys_and_block_tokens_agree_on_what_is_shared(page):
  """The simulator's keys (from block ids) and the engine's (from the tokens made
  from them) must share exactly the same pages, or the two executors would see
  different hits."""
  x = Blocks((0, 1, 2, 3), 8)
  y = Blocks((0, 1, 5, 6), 8)  # shares 16 tokens with x
  z = Blocks((9, 10, 11, 12), 8)  # shares nothing (an id names its whole prefix)
  for other in (y, z):
    bk = [a == b for a, b in zip(block_keys(x, 30, page), block_keys(other, 30, page))]
    tx = token_keys(block_tokens(x, 30, 256), page)
    to = token_keys(block_tokens(other, 30, 256), page)
    assert bk == [a == b for a, b in zip(tx, to)]
  assert block_keys(x, 30, 8) == [0, 1, 2]  # a page per block: the ids themselves
  with pytest.raises(ValueError, match="do not cover"):
    block_keys(x, 33, 8)


def test_reuse_bound_counts_tokens_of_repeated_blocks():
  blocks = [Blocks((0, 1), 4), Blocks((0, 2), 4), Blocks((0, 1, 3), 4)]
  # 7 + 8 + 10 tokens; repeated: block 0 twice (4 + 4), block 1 once (4).
  assert reuse_bound(blocks, [7, 8, 10]) == pytest.approx(12 / 25)


# --- the allocator's cache ----------------------------------------------------------


def _cached(alloc, owner, keys, tokens):
  """Admits `owner` with whatever `keys` hit and registers its pages."""
  hits = alloc.lookup(keys, len(keys))
  alloc.admit(owner, hits, tokens, keys, tokens)
  alloc.commit(owner, keys, tokens)
  return hits


def test_shared_pages_are_counted_kept_and_evicted_lru_tail_first():
  alloc = PageAllocator(9, 4, reserved=1, prefix_cache=True)
  k = token_keys(range(12), 4)
  assert _cached(alloc, "a", k, 12) == []
  shared = alloc.pages("a")
  assert _cached(alloc, "b", k, 12) == shared  # maps all three pages
  assert alloc.num_free == 5 and alloc.num_cached == 3
  alloc.free("a")
  assert alloc.num_free == 5  # still held by b
  alloc.free("b")
  assert alloc.num_free == 8 and alloc.num_cached == 3  # evictable, still cached
  alloc.check()
  # Free pages go first; then cached ones, the tail of the prefix first.
  alloc.ensure("c", 20)
  assert alloc.evictions == 0 and alloc.num_cached == 3
  alloc.ensure("c", 24)
  assert alloc.evictions == 1 and alloc.lookup(k, 3) == shared[:2]
  alloc.check()
  with pytest.raises(OutOfPages):
    alloc.admit("d", alloc.lookup(k, 3), 16)  # 2 hits (evictable) + 2 new > 2 free
  assert alloc.owners() == ["c"]
  alloc.free("c")
  assert alloc.num_free == alloc.capacity
  alloc.check()


def test_a_key_registered_meanwhile_leaves_the_duplicate_page_private():
  alloc = PageAllocator(9, 4, reserved=1, prefix_cache=True)
  k = token_keys(range(8), 4)
  alloc.admit("a", [], 8, k, 8)
  alloc.admit("b", [], 8, k, 8)  # both compute the same prefix
  alloc.commit("a", k, 8)
  alloc.commit("b", k, 8)
  assert alloc.num_cached == 2 and all(alloc.key_of(p) is None for p in alloc.pages("b"))
  alloc.check()
  alloc.free("b")
  alloc.free("a")
  assert alloc.num_free == alloc.capacity and alloc.num_cached == 2
  alloc.check()


def test_pending_keys_and_forget():
  alloc = PageAllocator(9, 4, reserved=1, prefix_cache=True)
  k = token_keys(range(12), 4)
  alloc.admit("a", [], 12, k, 12)
  assert alloc.pending(k, 0, 3)  # a computes page 0: a sharer should wait
  alloc.commit("a", k, 8)
  assert alloc.lookup(k, 3) == alloc.pages("a")[:2] and alloc.pending(k, 2, 3)
  alloc.free("a")  # a left before computing page 2: nobody waits for it any more
  assert not alloc.pending(k, 2, 3)
  _cached(alloc, "b", k, 12)
  alloc.forget()  # the pool's KV is lost: nothing may be matched again
  assert alloc.lookup(k, 3) == [] and alloc.num_cached == 0
  alloc.check()
  alloc.free("b")
  assert alloc.num_free == alloc.capacity
  alloc.check()


def test_check_catches_a_page_both_free_and_shared():
  alloc = PageAllocator(9, 4, reserved=1, prefix_cache=True)
  k = token_keys(range(8), 4)
  _cached(alloc, "a", k, 8)
  _cached(alloc, "b", k, 8)
  alloc._free.append(alloc.pages("a")[0])  # a bug that frees a page still shared
  with pytest.raises(AssertionError):
    alloc.check()


# --- the schedulers -----------------------------------------------------------------


def _req(i, tokens, out=4):
  return Request(i, len(tokens), out, prefix_keys=token_keys(tokens, PAGE))


def _run(sched, step, now=1.0):
  return sched.complete(step, now)


@pytest.mark.parametrize("make", [
    lambda a: S.PrefillFirstScheduler(a, 4, 64),
    lambda a: S.ChunkedPrefillScheduler(a, 4, 64),
    lambda a: S.PrefillScheduler(a, 4, 64)])
def test_samples_of_one_prompt_compute_it_once(make):
  """n samples of a 13-token prompt: the first computes it; the others wait one
  step (its pages are being computed) and then compute only the last token's page
  (tokens 12..13), reading 3 shared pages."""
  sched = make(PageAllocator(40, PAGE, reserved=1, prefix_cache=True))
  prompt = list(range(13))
  reqs = [_req(i, prompt) for i in range(3)]
  for r in reqs:
    sched.add(r)
  step = sched.schedule()
  assert step.describe()[0] == ((0, 0, 13),)
  _run(sched, step)
  step = sched.schedule()
  assert [(c.start, c.end) for c in step.prefills] == [(12, 13), (12, 13)]
  pages = sched.allocator.pages
  assert pages(reqs[1])[:3] == pages(reqs[0])[:3] == pages(reqs[2])[:3]
  assert pages(reqs[1])[3] != pages(reqs[2])[3]  # the partial page is never shared
  assert [r.num_cached for r in reqs] == [0, 12, 12]
  sched.allocator.check()


def test_an_aligned_prompt_recomputes_its_last_page():
  """A prompt of whole pages all cached still computes its last token, in a page of
  its own (writing it into the shared page would race the other readers)."""
  sched = S.PrefillFirstScheduler(PageAllocator(40, PAGE, reserved=1, prefix_cache=True),
                                  4, 64)
  a, b = _req(0, list(range(12))), _req(1, list(range(12)))
  sched.add(a)
  _run(sched, sched.schedule())
  sched.add(b)
  step = sched.schedule()
  assert step.describe()[0] == ((1, 8, 12),)
  pages = sched.allocator.pages
  assert pages(b)[:2] == pages(a)[:2] and pages(b)[2] != pages(a)[2]


def test_a_preempted_request_recomputes_from_its_cached_pages():
  """Preemption frees a request's pages, but its full prompt pages stay cached: the
  recomputation maps them and computes the rest (prompt tail + output so far)."""
  alloc = PageAllocator(8, PAGE, reserved=1, prefix_cache=True)  # 7 usable pages
  sched = S.PrefillFirstScheduler(alloc, 4, 64)
  old, new = _req(0, list(range(8)), 12), _req(1, list(range(100, 109)), 12)
  sched.add(old)
  _run(sched, sched.schedule())
  sched.add(new)
  now = 2.0
  while not new.num_preemptions and not old.num_preemptions:
    _run(sched, sched.schedule(), now)
    now += 1
  victim = new if new.num_preemptions else old
  assert victim is new  # the newest is preempted
  while new.num_prefilled == 0:
    _run(sched, sched.schedule(), now)
    now += 1
  assert new.num_cached == 8 and new.num_computed >= 9 + 1  # pages 0-1 reused
  alloc.check()


def test_decode_instance_cache_skips_pages_it_holds():
  """A decode pool with a cache maps the hand-off's prompt pages it holds: the KV
  copy moves only the others, and the copied prompt pages are registered."""
  alloc = PageAllocator(20, PAGE, reserved=1, prefix_cache=True)
  dec = S.DecodeScheduler(alloc, 4)
  prompt = list(range(10))

  def prefilled(i):
    r = _req(i, prompt, 3)
    r.num_prefilled, r.num_output, r.token_times = 10, 1, [0.0]
    return r

  a, b = prefilled(0), prefilled(1)
  dec.reserve(a)
  assert dec.copy_skip(a) == 0
  dec.admit(a)  # copy landed: pages 0-1 (tokens 0-7) registered
  dec.reserve(b)
  assert dec.copy_skip(b) == 2 and alloc.pages(b)[:2] == alloc.pages(a)[:2]
  alloc.check()


# --- routing and conditional disaggregation in the simulator ------------------------

SETUP = sim.Setup(get_preset("opt-13b"), H.get_hardware("a100-80gb"),
                  lambda tp, pp: L.distserve_a100("opt-13b", tp, pp))


def _prefixed(n=300, rate=6.0, seed=0):
  return W.shared_prefix(n, rate, W.Uniform(20, 200), W.Uniform(5, 60),
                         system_prompt_len=800, system_prompt_share=0.9, turns=2,
                         think_time=2.0, max_total_tokens=2048, seed=seed)


def test_cache_aware_routing_keeps_a_prefix_on_one_replica():
  """With the cache, arrivals follow their cached prefix (fewer prompt tokens
  computed than least-loaded routing); both policies finish everything."""
  reqs = _prefixed()
  runs = {r: sim.simulate(reqs, SETUP, sim.Colocated(replicas=2, routing=r))
          for r in deploy.ROUTINGS}
  aware, least = runs["cache_aware"], runs["least_loaded"]
  assert aware.prefix["cache_routed"] > 0 and least.prefix["cache_routed"] == 0
  computed = {k: sum(r.num_computed for r in v.requests) for k, v in runs.items()}
  assert computed["cache_aware"] < computed["least_loaded"]
  assert all(r.done for v in runs.values() for r in v.requests)


def test_conditional_disaggregation_prefills_short_remainders_on_decode():
  """Threshold 0: every prompt visits a prefill instance. A threshold above every
  prompt: none does, and nothing is copied. In between, both happen."""
  reqs = _prefixed()
  runs = {t: sim.simulate(reqs, SETUP, sim.Disaggregated(conditional_threshold=t))
          for t in (0, 150, 10_000)}
  assert runs[0].prefix["local_prefills"] == 0 and runs[0].prefix["kv_copy_pages"] > 0
  assert runs[10_000].prefix["local_prefills"] == len(reqs)
  assert runs[10_000].prefix["kv_copy_pages"] == 0
  assert 0 < runs[150].prefix["local_prefills"] < len(reqs)
  assert all(r.done for v in runs.values() for r in v.requests)


@pytest.mark.parametrize("kv_transfer", deploy.KV_TRANSFERS)
def test_decode_cache_moves_fewer_pages(kv_transfer):
  """Whole copies and layer-wise streams alike move only what the decode side lacks,
  and take less time for it (the second token comes sooner)."""
  reqs = _prefixed()
  on = sim.simulate(reqs, SETUP, sim.Disaggregated(kv_transfer=kv_transfer))
  off = sim.simulate(reqs, SETUP, sim.Disaggregated(kv_transfer=kv_transfer,
                                                    decode_cache=False))
  assert off.prefix["kv_copy_pages_saved"] == 0 and on.prefix["kv_copy_pages_saved"] > 0
  assert on.prefix["kv_copy_pages"] < off.prefix["kv_copy_pages"]
  gap = lambda res: sum(r.token_times[1] - r.token_times[0] for r in res.requests
                        if len(r.token_times) > 1)
  assert gap(on) < gap(off)


ESPEC = InstanceSpec(max_batch=4, max_step_tokens=32)
PROMPT = list(range(12))  # three full pages of 4


def test_an_instance_back_from_a_loss_maps_nothing_cached_before():
  """A worker that restarted has an empty pool: a prompt cached before the loss is
  computed again in full (mapping the old pages would read KV that is gone)."""
  h = CacheHarness(deploy.Colocated(ESPEC), 17)
  a = h.submit_tokens(PROMPT, 2)
  h.drain()
  inst = h.coord.instances[0]
  assert inst.sched.allocator.lookup(a.prefix_keys, 3)  # cached
  h.lose(inst.group)
  h.coord.readmit(inst, h._tick())
  b = h.submit_tokens(PROMPT, 2)
  _, step = h.step_of(b)
  assert [(c.start, c.end) for c in step.prefills] == [(0, 12)]
  h.drain()
  assert b.finish_reason == "length"


# --- with layer-wise streaming and elastic roles ---------------------------------------


def test_elastic_refuses_a_decode_side_without_cache():
  with pytest.raises(ValueError, match="decode_cache=False does not combine with elastic"):
    deploy.Disaggregated(elastic=ElasticConfig(), decode_cache=False).check()
  deploy.Disaggregated(elastic=ElasticConfig(), conditional_threshold=8).check()


def test_queue_counts_prompt_tokens_through_elastic_moves():
  """Cache-aware routing reads a queue's prompt tokens; elastic moves take requests
  from either end of it, clear it and merge queues. Catches a count that goes stale
  (or a merged queue without one)."""
  sched = S.PrefillScheduler(PageAllocator(17, PAGE), 4, 32)
  reqs = [Request(i, n, 2, float(i)) for i, n in enumerate((5, 7, 11))]
  for r in reqs:
    sched.add(r)
  assert sched.pending_prefill_tokens() == 23
  assert sched.take_newest() is reqs[2] and sched.pending_prefill_tokens() == 12
  sched.merge_waiting([reqs[2]])
  assert sched.pending_prefill_tokens() == 23
  assert sched.take_waiting() == reqs and sched.pending_prefill_tokens() == 0


def test_group_moved_to_decode_prefills_locally():
  """Conditional disaggregation with elastic roles: a prefill group that moved to
  decode takes local prefills like the decode instances born so (catches a decode
  twin built without local prefill, which refuses them)."""
  h = Harness(deploy.Disaggregated(ESPEC, ESPEC, 2, 1, elastic=ElasticConfig(window=1000),
                                   conditional_threshold=100), 17, **SLOS)
  assert h.coord.move(DECODE, h._tick()) is not None
  assert len(h.coord.decodes) == 2 and len(h.coord.prefills) == 1
  a, b = h.submit(8, 4), h.submit(8, 4)
  held = [next(i for i in h.coord.decodes if r in i.sched.held()) for r in (a, b)]
  assert held[0] is not held[1]  # each decode instance prefills one of them
  assert h.coord.prefix_stats()["local_prefills"] == 2
  h.drain()
  assert not h.ex.copies and {a.finish_reason, b.finish_reason} == {"length"}


def _handed_off(h, tokens, out):
  """Submits a request and runs its prefill and its KV copy; returns it."""
  r = h.submit_tokens(tokens, out)
  h.complete(h.step_of(r)[0])
  h.finish_copy(r)
  return r


def test_migration_copies_only_pages_the_destination_lacks():
  """A decode group moving to prefill migrates its request to the other decode
  instance, whose cache holds the same prompt: the copy skips those pages."""
  h = CacheHarness(deploy.Disaggregated(ESPEC, ESPEC, 1, 2, elastic=ElasticConfig(
      window=1000)), 17, **SLOS)
  a, b = _handed_off(h, PROMPT, 8), _handed_off(h, PROMPT, 8)
  on = lambda r: next(i for i in h.coord.decodes if r in i.sched.held())
  assert on(a) is not on(b)  # the second decode instance was the less loaded
  assert h.coord.prefix_stats()["kv_copy_pages_saved"] == 0
  assert h.coord.move(PREFILL, h._tick()) is not None
  h.run_until(lambda: h.ex.copies)
  (r, src, dst), = h.ex.copies
  assert src.phase == DECODE and dst.sched.copy_skip(r) == 3
  stats = h.coord.prefix_stats()
  assert stats["kv_copy_pages_saved"] == 3
  h.drain()
  assert {a.finish_reason, b.finish_reason} == {"length"}


def test_streamed_copy_skips_pages_the_decode_cache_holds():
  h = CacheHarness(deploy.Disaggregated(ESPEC, ESPEC, kv_transfer="layerwise"), 17)
  a = h.submit_tokens(PROMPT, 4)
  src, step = h.step_of(a)
  assert step.streams and h.coord.decodes[0].sched.copy_skip(a) == 0
  h.complete(src)
  h.finish_copy(a)  # a decodes there: the prompt's pages are cached on the decode side
  b = h.submit_tokens(PROMPT, 4)
  src, step = h.step_of(b)
  dst = h.coord.decodes[0]
  assert step.streams == [(b, dst)] and dst.sched.copy_skip(b) == 3
  assert h.coord.prefix_stats()["kv_copy_pages_saved"] == 3
  h.drain()
  assert {a.finish_reason, b.finish_reason} == {"length"}


def test_cache_off_in_the_setup_computes_every_prompt():
  reqs = _prefixed(100)
  off = sim.simulate(reqs, dataclasses.replace(SETUP, prefix_cache=False), sim.Colocated())
  assert off.prefix["hit_tokens"] == 0 and not off.prefix["enabled"]
  assert sum(r.num_computed for r in off.requests) == sum(r.prompt_len for r in reqs)
  on = sim.simulate(reqs, SETUP, sim.Colocated())
  assert on.summary()["prefix_hit_rate"] > 0.3


def test_mooncake_hit_rate_approaches_the_trace_bound(shared_data):
  """With a pool that never evicts and pages of Mooncake's 512-token blocks, the
  simulated hit rate is the trace's infinite-cache bound, less the last page of
  whole-page prompts that hit entirely (always computed) and the partial blocks."""
  trace = W.load_mooncake(os.path.join(shared_data, "traces", "mooncake",
                                       "conversation_trace.jsonl"))
  assert len(trace) == 12031 and trace.blocks[0].size == 512
  reqs = trace.requests(n=2000)
  setup = dataclasses.replace(SETUP, model=get_preset("llama3-8b"), page_size=512,
                              kv_tokens=10**8)
  res = sim.simulate(reqs, setup, sim.PhaseOnly("prefill"))
  bound = trace.hit_bound(2000)
  assert res.prefix["evictions"] == 0
  assert 0.9 * bound <= res.summary()["prefix_hit_rate"] <= bound


# --- random event sequences on every coordinator ------------------------------------


class CachingExecutor(ManualExecutor):
  """`ManualExecutor` whose pools keep a prefix cache."""

  def allocator(self, group, spec, fraction):
    alloc = super().allocator(group, spec, fraction)
    alloc.prefix_cache = True
    return alloc


class CacheHarness(Harness):
  """`Harness` on caching pools, whose requests carry page keys; its checks add the
  cache's: no page both free and held (`PageAllocator.check`: counts, evictable
  exactly when unheld), every registered page a request maps is the page of its own
  key at that position, no step writes into a registered (shareable) page, and
  every chunk computes at least its last token."""

  def __init__(self, dep, num_pages, **kw):
    self.ex = CachingExecutor(num_pages)
    self.coord = coordinator.build(dep, self.ex, kw.get("ttft_slo"), kw.get("tpot_slo"),
                                   start_time=0.0, on_end=self.ex.ended)
    self.now = 0.0
    self.reqs = []
    self.faults = 0
    self._next_id = 0
    self._tokens = {}

  def submit_tokens(self, tokens, max_tokens):
    """Adds a request for `tokens` (None, refused with a ValueError, while every
    instance of a role it needs is lost)."""
    if self.coord.unservable() is not None:
      with pytest.raises(ValueError, match="lost"):
        self.coord.add(Request(-1, len(tokens), max_tokens, self.now), self.now)
      return None
    req = Request(self._next_id, len(tokens), max_tokens, arrival_time=self._tick(),
                  prefix_keys=token_keys(tokens, PAGE))
    self._next_id += 1
    self.coord.add(req, self.now)
    self.reqs.append(req)
    self.check()
    return req

  def check(self):
    super().check()
    for alloc in self.coord.allocators():
      for owner in alloc.owners():
        keys = owner.prefix_keys or ()
        for j, p in enumerate(alloc.pages(owner)):
          k = alloc.key_of(p)
          assert k is None or (j < len(keys) and keys[j] == k), (
              f"request {owner.request_id} maps page {p} of another prefix at {j}")
    for req, src, dst in self.ex.copies:
      # A copy (whole, streamed or migrated) skips exactly the leading pages the
      # destination mapped from its own cache: those hold this prompt's KV there.
      skip, keys = dst.sched.copy_skip(req), req.prefix_keys or ()
      pages = dst.sched.allocator.pages(req)
      assert skip <= len(keys) and skip <= len(src.sched.allocator.pages(req))
      for j in range(skip):
        assert dst.sched.allocator.key_of(pages[j]) == keys[j], \
            f"request {req.request_id}'s copy skips page {j}, not cached there"
    for inst, step in self.ex.steps:
      alloc = inst.sched.allocator
      for c in step.prefills:
        assert c.end > c.start, "an empty chunk: a prefill must compute its last token"
        pages = alloc.pages(c.request)
        for j in range(c.start // PAGE, (c.end - 1) // PAGE + 1):
          assert alloc.key_of(pages[j]) is None, "a prefill writes into a shared page"
      for r in step.decodes:
        assert alloc.key_of(alloc.pages(r)[r.kv_len // PAGE]) is None, \
            "a decode writes into a shared page"


FAMILIES = 3  # prompts share prefixes within a family
MAX_PROMPT, MAX_OUT = 14, 6


def _tokens(family: int, shared: int, length: int, salt: int) -> list:
  """`length` tokens: the family's first `shared`, then ones of this request alone."""
  return [family * 1000 + i for i in range(min(shared, length))] + \
      [10**6 + salt * 100 + i for i in range(length - min(shared, length))]


@st.composite
def cached_deployments(draw):
  mode = draw(st.sampled_from(["prefill_first", "chunked", "disaggregated",
                               "conditional", "semi_pd"]))
  page_policy = draw(st.sampled_from(["on_demand", "reserve"]))
  n = draw(st.integers(1, 2))
  routing = draw(st.sampled_from(deploy.ROUTINGS))

  def spec():
    max_batch = draw(st.integers(1, 4))
    return InstanceSpec(max_batch=max_batch, max_step_tokens=draw(
        st.integers(max_batch + 1, 16)), page_policy=page_policy)

  need = pages_for(MAX_PROMPT + MAX_OUT, PAGE) + 1
  pages = st.integers(need, need + 3)  # small pools: evictions and preemptions
  if mode in ("disaggregated", "conditional"):
    # Streamed copies and elastic moves (migrations, groups changing role) skip
    # cached pages as hand-offs do; an elastic group keeps its cache in both roles.
    window = draw(st.sampled_from([None, 1, 4, 1000]))
    dep = deploy.Disaggregated(
        spec(), spec(), num_prefill=n, num_decode=draw(st.integers(1, 2)),
        kv_transfer=draw(st.sampled_from(deploy.KV_TRANSFERS)),
        elastic=None if window is None else ElasticConfig(window=window, hysteresis=0.0),
        routing=routing, decode_cache=window is not None or draw(st.booleans()),
        conditional_threshold=draw(st.integers(1, 12)) if mode == "conditional" else 0)
    return dep, {"prefill": draw(pages), "decode": draw(pages)}
  if mode == "semi_pd":
    return deploy.SemiPD(spec(), replicas=n, routing=routing), draw(pages)
  return deploy.Colocated(spec(), replicas=n, policy=mode, routing=routing), draw(pages)


_submit = st.tuples(st.just("submit"), st.integers(0, FAMILIES - 1),
                    st.integers(0, MAX_PROMPT), st.integers(1, MAX_PROMPT),
                    st.integers(1, MAX_OUT))
_step = st.tuples(st.just("step"), st.integers(0, 7), st.integers(-1, 7))
CACHE_EVENTS = st.lists(st.one_of(
    _submit, _submit, _submit, _step, _step, _step, _step,
    st.tuples(st.just("samples"), st.integers(0, FAMILIES - 1), st.integers(1, MAX_PROMPT),
              st.integers(1, MAX_OUT), st.integers(2, 4)),  # n > 1: one prompt, n requests
    st.tuples(st.just("copy"), st.integers(0, 7)),
    st.tuples(st.just("abort"), st.integers(0, 63)),
    st.tuples(st.just("hold"), st.integers(0, 7)),
    st.tuples(st.just("release"), st.integers(0, 7)),
    st.tuples(st.just("move"), st.sampled_from([PREFILL, DECODE])),
    st.tuples(st.just("lose"), st.integers(0, 7)),  # a worker process died
    st.tuples(st.just("back"), st.integers(0, 7))), min_size=10, max_size=80)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(cached_deployments(), CACHE_EVENTS)
def test_random_events_with_shared_prefixes(deployment, events):
  """Random arrivals sharing prefixes (n > 1 samples among them), step and copy
  completions with stop tokens, aborts and holds, streams and elastic moves, lost
  instances and their return with empty pools, on pools small enough to evict
  and preempt: after every event the cache's invariants hold (see `CacheHarness`);
  once drained every request ended once and every page is free or cached."""
  dep, pages = deployment
  elastic = isinstance(dep, deploy.Disaggregated) and dep.elastic is not None
  h = CacheHarness(dep, pages, **(SLOS if elastic else {}))
  groups = sorted({i.group for i in h.coord.instances})
  salt = 0
  for kind, *args in events:
    salt += 1
    if kind == "submit":
      family, shared, length, out = args
      h.submit_tokens(_tokens(family, shared, length, salt), out)
    elif kind == "samples":
      family, length, out, n = args
      tokens = _tokens(family, length, length, salt)
      for _ in range(n):
        h.submit_tokens(tokens, out)
    elif kind == "move":
      if elastic:
        h.coord.move(args[0], h._tick())
        h.check()
    elif kind == "back":  # its worker restarted, with an empty pool: each instance back
      lost = sorted({i.group for i in h.coord.instances if i.lost})
      if lost:
        now = h._tick()
        for inst in h.coord.instances:
          if inst.group == lost[args[0] % len(lost)]:
            h.coord.readmit(inst, now)
        h.check()
    else:  # a step or copy ending, an abort, a hold or its release, a lost instance
      apply_event(h, kind, args, groups)
  for inst in h.coord.instances:  # every worker restarted, so the rest can drain
    if inst.lost:
      h.coord.readmit(inst, h._tick())
  h.drain()
  for alloc in h.coord.allocators():  # every page free or cached, none held
    assert alloc.num_free == alloc.capacity and not alloc.owners()
  stats = h.coord.prefix_stats()
  event(f"{dep.mode}: hits {stats['hit_tokens'] > 0}, evictions {stats['evictions'] > 0}")
  event(f"preempted: {h.coord.num_preemptions > 0}")
  event(f"lost: {h.faults > 0}")
  if isinstance(dep, deploy.Disaggregated) and dep.conditional_threshold:
    event(f"local prefills: {stats['local_prefills'] > 0}")
  if isinstance(dep, deploy.Disaggregated):
    event(f"{dep.kv_transfer}, elastic={elastic}, pages skipped: "
          f"{stats['kv_copy_pages_saved'] > 0}")
  if elastic:
    assert all(g.target is None for g in h.coord.groups), "a move never completed"
    event(f"moves: {min(len(h.coord.role_history) - 1, 3)}")
