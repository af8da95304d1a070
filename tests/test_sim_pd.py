"""Layer-wise KV streaming and elastic roles in the simulator and the planner (no jax).

The simulator charges a streamed copy from the prefill's first layer group to no
earlier than its end; a hand-made latency model makes every time exact here. The
elastic coordinator follows a shifting workload on the virtual clock, and the
planner proposes both as variants of its best disaggregated placement.
"""

import pytest

from pdserve_jax import workloads as W
from pdserve_jax.core import deploy
from pdserve_jax.core.elastic import ElasticConfig
from pdserve_jax.core.request import Request
from pdserve_jax.model.config import get_preset
from pdserve_jax.sim import hardware as H
from pdserve_jax.sim import latency as L
from pdserve_jax.sim import planner as P
from pdserve_jax.sim import simulator as sim

MODEL = get_preset("llama3-8b")  # 32 layers, 128 KiB of bf16 KV per token
PREFILL_S, DECODE_S = 0.8, 0.01


class Constant(L.LatencyModel):
  """Every prefill step PREFILL_S, every decode step DECODE_S."""

  def prefill_totals(self, num_seqs, tokens, sq_tokens):
    return PREFILL_S

  def decode_totals(self, batch, context):
    return DECODE_S


def _second_token(dep, latency_s, bandwidth, prompt=1000):
  hw = H.HardwareSpec("test", 1e15, 1e12, 1e12, bandwidth, bandwidth, 8, latency_s)
  setup = sim.Setup(MODEL, hw, lambda tp, pp: Constant())
  res = sim.simulate([Request(0, prompt, 3)], setup, dep)
  (r,) = res.requests
  assert r.token_times[0] == pytest.approx(PREFILL_S)
  return r.token_times[1] - DECODE_S  # when the copy landed and decoding began


@pytest.mark.parametrize("latency_s,bandwidth,groups", [
    (0.0, 1e9, 4),  # copy-bound: 1000 tokens of 128 KiB take 0.131 s a group, > 0.2 s / 4
    (0.0, 1e11, 4),  # compute-bound: the last group's copy is all that is left
    (0.05, 1e10, 8),  # each group pays the link latency
])
def test_stream_ends_at_the_overlap_bound(latency_s, bandwidth, groups):
  """A whole copy starts at the prefill's end; a stream of k groups ends at
  max(prefill end + one group's copy, first group's end + k group copies). Catches
  a stream that ignores the overlap, or one charged as a single transfer."""
  spec = deploy.InstanceSpec()
  whole = deploy.Disaggregated(spec, spec)
  stream = deploy.Disaggregated(spec, spec, kv_transfer="layerwise", layer_groups=groups)
  total = 1000 * MODEL.kv_bytes_per_token(2)
  group = latency_s + total / groups / bandwidth
  assert _second_token(whole, latency_s, bandwidth) == pytest.approx(
      PREFILL_S + latency_s + total / bandwidth)
  assert _second_token(stream, latency_s, bandwidth) == pytest.approx(
      max(PREFILL_S + group, PREFILL_S / groups + groups * group))


ROOFLINE = sim.Setup(MODEL, H.get_hardware("a100-80gb"),
                     L.latency_source("roofline", MODEL, H.get_hardware("a100-80gb")))
SPEC = deploy.InstanceSpec(tp=1, max_batch=128, max_step_tokens=8192)


def test_elastic_roles_follow_a_burst_of_long_prompts():
  """Chat, then a burst of long prompts, then chat: the controller moves a decode
  group to prefill once the burst's first tokens miss the TTFT SLO, and the elastic
  deployment keeps more requests within the SLOs than the same split held fixed
  (simulated, so deterministic). Catches a controller that never acts, or acts on
  the wrong phase."""
  reqs = W.long_prompt_burst(4096, 600, 6.0, seed=0)
  burst = [r.arrival_time for r in reqs[200:400]]
  static = deploy.Disaggregated(SPEC, SPEC, 2, 2)
  dep = deploy.Disaggregated(SPEC, SPEC, 2, 2, elastic=ElasticConfig(window=16))
  res = sim.simulate(reqs, ROOFLINE, dep, 1.0, 0.05)
  shares = res.share_history["elastic"]
  assert shares[0][1] == 0.5
  assert any(x > 0.5 and burst[0] <= t <= burst[-1] for t, x in shares), shares
  fixed = sim.simulate(reqs, ROOFLINE, static, 1.0, 0.05)
  assert res.attainment(1.0, 0.05) > fixed.attainment(1.0, 0.05)
  assert all(r.finish_reason == "length" for r in res.requests)


def test_shifting_workload():
  reqs = W.long_prompt_burst(256, 30, 2.0, seed=1)
  assert [r.request_id for r in reqs] == list(range(30))
  times = [r.arrival_time for r in reqs]
  assert times == sorted(times)
  mean = lambda rs, f: sum(map(f, rs)) / len(rs)
  chat, burst = reqs[:10] + reqs[20:], reqs[10:20]
  assert mean(burst, lambda r: r.prompt_len) > 3 * mean(chat, lambda r: r.prompt_len)
  assert mean(burst, lambda r: r.max_tokens) < mean(chat, lambda r: r.max_tokens) / 3
  assert all(r.prompt_len + r.max_tokens <= 256 for r in reqs)
  with pytest.raises(ValueError, match="rate must be positive"):
    W.shifting([W.Phase(3, 0.0, W.Fixed(4), W.Fixed(4))])


def test_planner_proposes_streaming_and_elastic_variants():
  """Each variant is a candidate of its own, built from the best disaggregated
  placement, and what it proposes is a deployment the engine and simulator take."""
  setup = sim.Setup(get_preset("opt-13b"), H.get_hardware("a100-80gb"),
                    lambda tp, pp: L.distserve_a100("opt-13b", tp, pp))
  spec = P.PlanSpec(setup, lambda rate: W.synthetic(100, rate, W.Fixed(512), W.Fixed(64),
                                                    seed=0),
                    ttft_slo=0.4, tpot_slo=0.04, tp_options=(1, 2), pp_options=(1,),
                    tol=0.1, layer_groups=4, elastic=ElasticConfig(window=16))
  plan = P.plan(spec, modes=("disaggregated",))
  algs = {c.algorithm: c for c in plan.candidates}
  streamed = [c for a, c in algs.items() if a.endswith("+layerwise")]
  assert streamed and all(c.deployment.kv_transfer == "layerwise"
                          and c.deployment.layer_groups == 4 for c in streamed)
  assert algs["elastic"].deployment.elastic == ElasticConfig(window=16)
  assert "elastic" in algs["elastic"].describe()
