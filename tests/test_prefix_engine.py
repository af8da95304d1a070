"""The prefix cache in the engine, against the cache-less reference, on 8 virtual
devices: greedy tokens on prompts that share prefixes heavily with pp = 2,
preemption and eviction pressure and n > 1; and the hostile cases, with the cache on
and off, each ending with no page leaked and the engine serving.

Other modes' greedy tokens with shared prefixes (disaggregated with conditional
prefills and cache-aware routing, semi-PD) are checked by
tests/test_same_decisions.py's prefix-cache runs, which replay them through the
simulator too; one engine per case costs the suite's time budget."""

import numpy as np
import pytest

import pdserve_jax as pdj
from pdserve_jax import workloads as W
from pdserve_jax.core.prefix import block_tokens

CFG = pdj.get_preset("tiny").replace(num_heads=8, num_kv_heads=4, head_dim=8)
# test_engine's shapes (its preemption tests' 16-page pools): programs compiled there
# are reused here through the persistent compilation cache of `make test`.
BASE = dict(page_size=8, num_pages=16, max_seq_len=64, warmup=False, min_token_bucket=64)

pytestmark = pytest.mark.slow


def _inst(chunked=False, **kw):
  return pdj.InstanceSpec(max_batch=8, max_step_tokens=24 if chunked else 96, **kw)



@pytest.fixture(scope="module")
def model():
  return pdj.random_model(CFG, seed=11, std=0.25)


@pytest.fixture(scope="module")
def shared(model):
  """28 requests in two-turn sessions, most starting with one 24-token system prompt,
  arriving in a burst; prompts made from their blocks; greedy references. At most 56
  tokens each: 7 pages, what a pipeline stage's half of a 16-page pool holds."""
  reqs = W.shared_prefix(28, 400.0, W.Uniform(1, 10), W.Uniform(4, 16), system_prompt_len=24,
                         system_prompt_share=0.8, turns=2, think_time=0.005, block_size=8,
                         max_total_tokens=56, seed=2)
  for r in reqs:
    r.payload = block_tokens(r.blocks, r.prompt_len, CFG.vocab_size)
  ref = pdj.greedy_reference(model, [r.payload for r in reqs], max(r.max_tokens for r in reqs))
  return reqs, [ref[i][:r.max_tokens] for i, r in enumerate(reqs)]


def _check_clean(engine):
  assert engine.pages_in_use() == 0
  for alloc in engine.allocators():
    alloc.check()
    assert not alloc.owners()


def test_greedy_tokens_with_shared_prefixes_match_reference(model, shared):
  """Catches KV read from the wrong page, a chunk started at the wrong offset, a page
  shared before its KV was written, and a recomputation that skips the wrong pages:
  any of them changes greedy tokens. Chunked prefill on a pp = 2 pipeline (two
  virtual engines, each with its own half of the pool and its own cache, arrivals
  routed by the cache between them); each half (7 pages of 8 tokens) is small
  enough to preempt and evict; then 3 samples of each of 3 prompts (n > 1) share
  pages."""
  reqs, want = shared
  dep = pdj.Colocated(_inst(True, pp=2), policy="chunked")
  with pdj.Engine(model, dep, pdj.EngineConfig(**BASE)) as engine:
    report = engine.run_workload([r.fresh() for r in reqs], timeout=600)
    assert [res.token_ids for res in report.results] == want
    stats = engine.stats()
    prompts = [r.payload for r in reqs[:3]]
    hits_before = stats["prefix_hit_tokens"]
    results = engine.generate(prompts, [pdj.SamplingParams(max_tokens=r.max_tokens, n=3)
                                        for r in reqs[:3]])
    for res, w in zip(results, want):
      assert [c.token_ids for c in res.outputs] == [w] * 3
    stats = engine.stats()
    _check_clean(engine)
  assert stats["preemptions"] > 0, stats
  assert stats["prefix_hit_tokens"] > hits_before  # the samples shared the prompt
  assert stats["prefix_hit_rate"] > 0.2 and stats["prefix_evictions"] > 0, stats
  assert stats["prefix_cache_routed"] > 0, stats
  assert report.summary["prefix_hit_tokens"] > 0
  assert stats["finished"] == len(reqs) + 9


# --- hostile cases --------------------------------------------------------------------

PREFIX = list(range(1, 17))  # two pages every hostile request shares


def _want(model, prompts, max_tokens):
  """Greedy references of `prompts`, computed once per distinct prompt."""
  distinct = sorted({tuple(p) for p in prompts})
  ref = pdj.greedy_reference(model, [list(p) for p in distinct], max_tokens)
  by = dict(zip(distinct, ref))
  return [by[tuple(p)] for p in prompts]


def _serves(engine, model):
  prompt = PREFIX + [40, 41]
  got = engine.generate([prompt], pdj.SamplingParams(max_tokens=5))[0].token_ids
  assert got == _want(model, [prompt], 5)[0]


@pytest.fixture(scope="module", params=[True, False], ids=["cache", "no_cache"])
def hostile(model, request):
  """One engine per cache setting, 7 usable pages of 8 tokens, serving every hostile
  case in turn (the same workload with the cache disabled in the config)."""
  cfg = pdj.EngineConfig(**dict(BASE, num_pages=8), prefix_cache=request.param)
  with pdj.Engine(model, pdj.Colocated(_inst()), cfg) as engine:
    yield engine, request.param


def test_cached_prefix_whose_remainder_cannot_fit(model, hostile):
  """A prompt whose first two pages are cached but whose whole life needs 8 pages of
  a 7-page pool is refused at submit, naming the sizes; cached pages are pool pages
  like any other. One that fits only once others finish waits and then runs."""
  engine, cache = hostile
  _serves(engine, model)  # PREFIX is cached now (with the cache on)
  with pytest.raises(ValueError, match="needs 8 pages of 8 tokens.*holds only 7 pages"):
    engine.submit(PREFIX + list(range(50, 74)), pdj.SamplingParams(max_tokens=20))
  _check_clean(engine)
  # Three requests of 5 pages each over their life: they cannot all run at once.
  prompts = [PREFIX + [60 + i] * 8 for i in range(3)]
  res = engine.generate(prompts, pdj.SamplingParams(max_tokens=14))
  assert [r.token_ids for r in res] == _want(model, prompts, 14)
  _check_clean(engine)
  _serves(engine, model)


def test_a_thousand_requests_sharing_a_prefix_under_eviction(model, hostile):
  """1,000 requests share PREFIX; every tenth is a long prompt of its own that needs
  the pool and evicts the cached prefix. Tokens equal the reference, nothing leaks."""
  engine, cache = hostile
  rng = np.random.default_rng(0)
  prompts = []
  for i in range(1000):
    if i % 10 == 9:
      prompts.append(rng.integers(0, CFG.vocab_size, 40).tolist())
    else:
      prompts.append(PREFIX + rng.integers(0, CFG.vocab_size, int(rng.integers(1, 4))).tolist())
  before = engine.stats()
  res = engine.generate(prompts, pdj.SamplingParams(max_tokens=2), timeout=1200)
  assert [r.token_ids for r in res] == _want(model, prompts, 2)
  stats = engine.stats()
  _check_clean(engine)
  if cache:
    assert stats["prefix_evictions"] > before["prefix_evictions"]
    assert stats["prefix_hit_tokens"] - before["prefix_hit_tokens"] >= 16 * 800
  else:
    assert stats["prefix_hit_tokens"] == 0
  _serves(engine, model)


def test_cancelling_a_request_others_share_pages_with(model, hostile):
  """The first of three requests on one prefix is cancelled while the others read
  its pages: they finish with the reference's tokens; its own pages are freed, the
  shared ones kept for the others (then cached), none leaked."""
  engine, cache = hostile
  prompts = [PREFIX + [70 + i] for i in range(3)]
  want = _want(model, prompts, 20)
  first = engine.submit(prompts[0], pdj.SamplingParams(max_tokens=30))  # outlives the next
  it = iter(first)
  next(it)  # its prefill ran: PREFIX is cached
  others = [engine.submit(p, pdj.SamplingParams(max_tokens=20)) for p in prompts[1:]]
  next(iter(others[0]))
  assert first.cancel()
  assert first.result(timeout=600).finish_reason == "aborted"
  assert [h.result(timeout=600).token_ids for h in others] == want[1:]
  _check_clean(engine)
  _serves(engine, model)
