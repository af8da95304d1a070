"""Engine and simulator make the same decisions, and the planner's pick is servable.

One trace runs through the real engine, then through the simulator driven by the
engine's own event times (`sim.simulator.Replay`: when each request was seen, each
step ended and each KV copy landed). Both executors drive the same coordinator, so
every instance must have run the same sequence of steps: the same requests, the
same prefill chunks, in every mode, with preemptions and the semi-PD partitioner on,
with KV streamed layer by layer (the same streams to the same decode instances),
with elastic roles (the same moves at the same times), and with the prefix cache
on prompts that share prefixes: the same hits, evictions, routing and
conditional-prefill choices.
"""

import numpy as np
import pytest

import pdserve_jax as pdj
from pdserve_jax import workloads
from pdserve_jax.core.elastic import ElasticConfig
from pdserve_jax.core.prefix import block_tokens
from pdserve_jax.core.request import Request
from pdserve_jax.runtime.programs import InstanceRunner, RunnerShape
from pdserve_jax.model import sharding
from pdserve_jax.runtime import profiler
from pdserve_jax.sim import hardware, planner, simulator as sim

CFG = pdj.get_preset("tiny").replace(num_heads=8, num_kv_heads=4, head_dim=8)
ENGINE = dict(page_size=8, max_seq_len=64, warmup=False,
              min_token_bucket=64, log_steps=True)
HOST = hardware.HardwareSpec("host-cpu", 1e12, 1e10, 1e10, 1e10, 1e10, 4)


def _inst(tp, chunked=False):
  return pdj.InstanceSpec(tp=tp, max_batch=8, max_step_tokens=24 if chunked else 64)


DEPLOYMENTS = {
    "prefill_first": pdj.Colocated(_inst(1)),
    "chunked": pdj.Colocated(_inst(1, True), policy="chunked"),
    "disagg_2p1_1d1": pdj.Disaggregated(_inst(1), _inst(1), num_prefill=2),
    "semi_pd_dynamic": pdj.SemiPD(_inst(1), partitioner=pdj.PartitionerConfig(window=4,
                                                                            step=0.1)),
    # KV streamed layer by layer, and SLOs only TTFT can miss: the controller moves a
    # decode group to prefill (it migrates its requests first) mid-run.
    "disagg_layerwise_elastic": pdj.Disaggregated(_inst(1), _inst(1), num_decode=2,
                                                  kv_transfer="layerwise",
                                                  elastic=ElasticConfig(window=4)),
    # semi-PD's own partitioner (its Algorithm 1 and latency model), time-shared.
    "semi_pd_paper": pdj.SemiPD(_inst(1), prefill_share=0.5, decode_share=0.5,
                                partitioner=pdj.ModelPartitionerConfig(window=4, step=0.1)),
}
# The paper's partitioner moves nothing when both SLOs fail ("no room"): a TPOT SLO
# that holds lets the failing TTFT move it. The elastic roles likewise: only TTFT can
# miss there.
SLOS = {"semi_pd_paper": dict(ttft_slo=0.05, tpot_slo=10.0),
        "disagg_layerwise_elastic": dict(ttft_slo=1e-4, tpot_slo=10.0)}


@pytest.fixture(scope="module")
def model():
  return pdj.random_model(CFG, seed=11, std=0.25)


def _replay(engine) -> sim.Replay:
  arrivals, copies, steps = {}, {}, {}
  for kind, rid, t in engine.event_log:
    if kind == "arrival":
      arrivals[rid] = t
    else:
      copies.setdefault(rid, []).append(t)
  for rec in engine.step_log:
    steps.setdefault(rec.instance, []).append((rec.finished, rec.finished - rec.started))
  return sim.Replay(arrivals, steps, copies)


# Preemption forced by the workload, not by timing: every request grows to 6 or 7
# pages of 8 tokens (prompt 12-20 + output 32-36 tokens) and a pool holds 11, so any
# two requests that decode side by side outgrow it. They all arrive at t=0: the
# last is queued while the first still has 30-odd decode steps to run, so requests
# overlap on every instance (the decode instance when disaggregated, whose pulls
# take hand-offs while it has pages for their prompts).
NUM_PAGES = 12  # per pool; page 0 is scratch


def _crowd():
  rng = np.random.default_rng(5)
  return [Request(i, int(rng.integers(12, 21)), int(rng.integers(32, 37)), 0.0)
          for i in range(8)]


def test_the_crowd_cannot_fit_two_at_a_time():
  usable = NUM_PAGES - 1
  lifetimes = [-(-(r.prompt_len + r.max_tokens) // ENGINE["page_size"]) for r in _crowd()]
  assert all(usable < 2 * n <= 2 * usable for n in lifetimes), lifetimes


@pytest.mark.parametrize("name", sorted(DEPLOYMENTS))
def test_engine_and_simulator_run_the_same_steps(model, name, record_property):
  dep = DEPLOYMENTS[name]
  reqs = _crowd()
  want = None
  if name == "disagg_layerwise_elastic":  # and the greedy tokens across moves and streams
    rng = np.random.default_rng(7)
    for r in reqs:
      r.payload = rng.integers(0, CFG.vocab_size, r.prompt_len).tolist()
    longest = max(r.max_tokens for r in reqs)
    ref = pdj.greedy_reference(model, [r.payload for r in reqs], longest)
    want = [ref[i][:r.max_tokens] for i, r in enumerate(reqs)]
  # Tight SLOs move the semi-PD share (and the elastic roles: only TTFT can miss there).
  cfg = pdj.EngineConfig(**ENGINE, num_pages=NUM_PAGES,
                         **SLOS.get(name, dict(ttft_slo=0.05, tpot_slo=0.01)))
  with pdj.Engine(model, dep, cfg) as engine:
    report = engine.run_workload(reqs, timeout=600)
    if want is not None:
      assert [res.token_ids for res in report.results] == want
    replay = _replay(engine)
    by_engine = {}
    for rec in engine.step_log:
      by_engine.setdefault(rec.instance, []).append(rec.work)
    preemptions = engine.stats()["preemptions"]
  record_property("preemptions", preemptions)  # in --junitxml reports
  history = engine.share_history  # after close: the last finishes are observed too
  setup = sim.Setup(model.config, HOST, lambda tp, pp: None, page_size=cfg.page_size,
                    kv_tokens=(cfg.num_pages - 1) * cfg.page_size)
  res = sim.simulate(report.requests, setup, dep, cfg.ttft_slo, cfg.tpot_slo, replay=replay,
                     record_steps=True)
  assert res.steps == by_engine
  assert res.num_preemptions == preemptions > 0
  if name == "disagg_layerwise_elastic":
    assert any(len(work) == 3 for steps in by_engine.values() for work in steps)  # streams
  if name.startswith("semi_pd") or name == "disagg_layerwise_elastic":
    simulated = next(iter(res.share_history.values()))
    assert [x for _, x in simulated] == [x for _, x in history] and len(history) > 1
    assert [t for t, _ in simulated[1:]] == [t for t, _ in history[1:]]
  done = {r.request_id: r.token_times for r in res.requests}
  assert all(done[r.request_id] == r.token_times for r in report.requests)


# Colocated replicas route by the cache as prefill instances do (one `_place`); the
# crowd runs above, whose engines fill `prefix_keys` from the prompts, replay
# recomputations that map their own cached pages after preemption in every mode.
PREFIX_DEPLOYMENTS = {
    # Streamed hand-offs too: each stream moves only the pages the decode cache lacks
    # (the simulator times the same pages; the greedy tokens catch a skip that is wrong).
    "disagg_2p1_conditional": pdj.Disaggregated(_inst(1), _inst(1, True), num_prefill=2,
                                                kv_transfer="layerwise",
                                                conditional_threshold=12),
    "semi_pd": pdj.SemiPD(_inst(1)),
}


@pytest.mark.parametrize("name", sorted(PREFIX_DEPLOYMENTS))
def test_same_steps_with_the_prefix_cache(model, name):
  """Two-turn sessions, most on one system prompt, into 11-page pools: the cache hits
  and evicts, arrivals follow cached prefixes between two instances, and short
  remainders prefill on the decode instance. The first session runs alone first, so
  that one instance holds the system prompt when the others arrive, however slow
  the first compilations. The simulator, replaying the engine's event times, must
  take every one of those decisions alike (a cache, router or threshold that
  differed would change the steps). Greedy tokens equal the cache-less reference
  (catches KV mapped from the wrong page, a chunk at the wrong offset, a copy that
  skips pages the decode side does not hold)."""
  dep = PREFIX_DEPLOYMENTS[name]
  reqs = workloads.shared_prefix(32, 40.0, workloads.Uniform(1, 10), workloads.Uniform(2, 14),
                                 system_prompt_len=24, system_prompt_share=0.8, turns=2,
                                 think_time=0.05, block_size=8, max_total_tokens=64, seed=4)
  first = [r for r in reqs if r.blocks.ids[:3] == (0, 1, 2)][:1]  # on the system prompt
  cfg = pdj.EngineConfig(**ENGINE, num_pages=12)
  with pdj.Engine(model, dep, cfg) as engine:
    warm = engine.run_workload(first, timeout=600)
    rest = [r for r in reqs if r not in first]
    report = engine.run_workload(rest, timeout=600)
    results = report.results
    report.requests[:0] = warm.requests
    replay = _replay(engine)
    by_engine = {}
    for rec in engine.step_log:
      by_engine.setdefault(rec.instance, []).append(rec.work)
    stats = engine.stats()
  setup = sim.Setup(model.config, HOST, lambda tp, pp: None, page_size=cfg.page_size,
                    kv_tokens=(cfg.num_pages - 1) * cfg.page_size)
  res = sim.simulate(report.requests, setup, dep, replay=replay, record_steps=True)
  assert res.steps == by_engine
  for key in ("lookups", "hit_tokens", "evictions", "cached_pages", "cache_routed",
              "local_prefills", "kv_copy_pages", "kv_copy_pages_saved", "kv_streams"):
    assert res.prefix.get(key) == stats.get(f"prefix_{key}"), key
  assert stats["prefix_hit_tokens"] > 0 and stats["prefix_evictions"] > 0, stats
  if name != "semi_pd":  # two instances of a kind to route between
    assert stats["prefix_cache_routed"] > 0, stats
  if name == "disagg_2p1_conditional":
    assert 0 < stats["prefix_local_prefills"] < len(reqs), stats
    assert stats["prefix_kv_copy_pages_saved"] > 0, stats
    assert any(len(work) == 3 for steps in by_engine.values() for work in steps)  # streams
  done = {r.request_id: r.token_times for r in res.requests}
  assert all(done[r.request_id] == r.token_times for r in report.requests)
  # Each run's results follow its requests in arrival order; prompts as the engine
  # made them from the blocks.
  asked = first + sorted(rest, key=lambda r: r.arrival_time)
  prompts = [block_tokens(r.blocks, r.prompt_len, CFG.vocab_size) for r in asked]
  want = pdj.greedy_reference(model, prompts, max(r.max_tokens for r in asked))
  assert [res.token_ids for res in warm.results + results] == \
      [w[:r.max_tokens] for w, r in zip(want, asked)]


def test_planner_pick_is_served_by_the_engine(model):
  """Plan with a latency model profiled here; the best placement serves greedy tokens
  equal to the reference."""
  mesh = sharding.split_devices([1])[0]
  runner = InstanceRunner(model, mesh, RunnerShape(page_size=8, num_pages=72, max_rows=8,
                                                   max_step_tokens=256, max_seq_len=64,
                                                   min_step_tokens=16))
  latency, _, _ = profiler.profile(runner, [1, 2, 4], [16, 32, 64], [1, 2, 4, 8],
                                   [16, 32, 64], max_tokens=128, reps=3)
  setup = sim.Setup(model.config, HOST, lambda tp, pp: latency, page_size=8, kv_tokens=71 * 8)
  make = lambda rate: workloads.synthetic(40, rate, workloads.Uniform(4, 40),
                                          workloads.Uniform(2, 20), seed=1)
  spec = planner.PlanSpec(setup, make, ttft_slo=1.0, tpot_slo=0.2, tp_options=(1, 2),
                          pp_options=(1,), max_batch=8, max_step_tokens=64,
                          chunked_max_step_tokens=24, semi_pd_shares=(0.5,))
  best = planner.plan(spec).best()
  assert best is not None and best.goodput > 0
  reqs = make(20.0)
  rng = np.random.default_rng(0)
  prompts = [rng.integers(0, CFG.vocab_size, r.prompt_len).tolist() for r in reqs]
  for r, p in zip(reqs, prompts):
    r.payload = p
  want = pdj.greedy_reference(model, prompts, max(r.max_tokens for r in reqs))
  cfg = pdj.EngineConfig(**dict(ENGINE, log_steps=False), num_pages=72)
  with pdj.Engine(model, best.deployment, cfg) as engine:
    report = engine.run_workload(reqs, timeout=600)
  assert [res.token_ids for res in report.results] == [
      want[i][:r.max_tokens] for i, r in enumerate(reqs)]
