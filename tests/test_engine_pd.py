"""The engine with layer-wise KV streaming and elastic roles, against the cache-less
greedy reference, on 8 virtual devices.

Streaming runs a disaggregated prefill as layer groups and moves each group's pages
to the decode mesh while the next group computes; a wrong page, layer range or
order would change the tokens. Elastic groups change role mid-run, decoding in
pools they prefilled into and prefilling with decode-born weights; a wrong twin
pairing, a page freed under a live request or a program not compiled would show as
other tokens, a leak or a compile after warm-up. (`test_same_decisions` serves
elastic moves the other way, decode to prefill with migrations, against the same
reference.) Steps of at most 64 tokens keep each instance at one packed program.
"""

import numpy as np
import pytest

import pdserve_jax as pdj
from pdserve_jax.core.elastic import ElasticConfig
from pdserve_jax.core.request import Request
from pdserve_jax.runtime.programs import CompileCounter

pytestmark = pytest.mark.slow  # engines compile their programs: minutes on 2 cores

# Four layers: two pipeline stages of two layer groups each.
CFG = pdj.get_preset("tiny").replace(num_heads=8, num_kv_heads=4, head_dim=8, num_layers=4)
BASE = dict(page_size=8, max_seq_len=64, warmup=False, min_token_bucket=64, log_steps=True)


def _inst(tp, pp=1):
  return pdj.InstanceSpec(tp=tp, pp=pp, max_batch=4, max_step_tokens=64)


@pytest.fixture(scope="module")
def model():
  return pdj.random_model(CFG, seed=11, std=0.25)


def _burst(model, n, seed, spread=0.0):
  """`n` requests arriving in order within `spread` seconds (results come in arrival
  order) and their greedy references."""
  rng = np.random.default_rng(seed)
  reqs = []
  for i, t in enumerate(np.sort(rng.uniform(0, spread, n))):
    p = int(rng.integers(4, 30))
    reqs.append(Request(i, p, int(rng.integers(8, 30)), float(t),
                        payload=rng.integers(0, CFG.vocab_size, p).tolist()))
  ref = pdj.greedy_reference(model, [r.payload for r in reqs], max(r.max_tokens for r in reqs))
  return reqs, [ref[i][:r.max_tokens] for i, r in enumerate(reqs)]


def test_layerwise_streaming_pp2_greedy_tokens_with_preemption(model):
  """A prefill pipeline of 2 stages of 2 one-layer groups each streams to a tp 2
  decode mesh holding all 4 layers: each group lands in part of the decode pool.
  (`test_same_decisions` streams pp 1 groups, with moves and forced preemption.)"""
  dep = pdj.Disaggregated(_inst(1, pp=2), _inst(2), kv_transfer="layerwise", layer_groups=4)
  reqs, want = _burst(model, 24, seed=3)
  # 19 usable decode pages (and 9 per prefill virtual engine): far fewer than the
  # burst's running requests grow into, so decodes preempt and recompute.
  cfg = pdj.EngineConfig(**BASE, num_pages=20)
  with pdj.Engine(model, dep, cfg) as engine:
    runner = engine.executor.runner(engine.coordinator.prefills[0]).runner
    assert [len(p.layers) for p in runner.pools] == [1] * 4
    report = engine.run_workload([r.fresh() for r in reqs], timeout=600)
    assert [res.token_ids for res in report.results] == want
    stats = engine.stats()
    streamed = {rid for rec in engine.step_log if len(rec.work) == 3
                for rid, _ in rec.work[2]}
    assert stats["preemptions"] > 0 and len(streamed) >= 4, (stats, streamed)
    assert stats["finished"] == len(reqs) and stats["pages_in_use"] == 0
    for alloc in engine.allocators():
      alloc.check()


def test_elastic_moves_to_decode_keep_greedy_tokens_and_compile_nothing_after_warmup():
  """SLOs only TPOT can miss: prefill groups turn decode and decode the prompts they
  prefilled in place, on the runner that prefilled them. Warm-up compiled both
  programs on every group and the KV movers between any two (streams and migrations
  use the same), so nothing compiles while serving. (Small shapes keep warm-up
  short: 2 layers, contexts of 32 tokens, decode steps of at most 2 rows.)"""
  tiny = pdj.get_preset("tiny")
  model = pdj.random_model(tiny, seed=2, std=0.25)
  dep = pdj.Disaggregated(pdj.InstanceSpec(max_batch=4, max_step_tokens=32),
                          pdj.InstanceSpec(max_batch=2), num_prefill=2, num_decode=1,
                          kv_transfer="layerwise", elastic=ElasticConfig(window=4))
  cfg = pdj.EngineConfig(page_size=8, num_pages=24, max_seq_len=32, min_token_bucket=32,
                         ttft_slo=100.0, tpot_slo=1e-6, log_steps=True)
  rng = np.random.default_rng(0)
  prompts = [rng.integers(0, tiny.vocab_size, int(rng.integers(1, 16))).tolist()
             for _ in range(24)]
  params = pdj.SamplingParams(max_tokens=12, ignore_eos=True)
  want = pdj.greedy_reference(model, prompts, 12)
  with pdj.Engine(model, dep, cfg) as engine:
    assert set(engine.executor._programs().values()) == {(True, True)}
    assert len(engine.coordinator.copy_pairs()) == 3 * 2
    with CompileCounter() as counter:
      got = [r.token_ids for r in engine.generate(prompts, params)]
    history = engine.coordinator.role_history
    adopted = [r for i in engine.coordinator.decodes if ":" in i.name
               for r in engine.step_log if r.instance == i.name and r.work[1]]
  assert got == want
  assert [h[1:] for h in history][-1] == (1, 2), history
  assert adopted  # a prefill group decoded after its move
  assert counter.count == 0, f"{counter.count} compilations after warm-up"


def test_layer_groups_must_divide_the_layers():
  """Catches: a deployment whose groups would split the layers unevenly served."""
  from pdserve_jax.serving.config import check_servable

  with pytest.raises(ValueError, match="layer_groups=3 does not divide the model's 4 layers"):
    check_servable(pdj.Disaggregated(kv_transfer="layerwise", layer_groups=3), CFG, 8)
