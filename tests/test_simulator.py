"""Tests of the discrete-event simulator on DistServe's A100 latency figures."""

import dataclasses
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pdserve_jax import workloads as W
from pdserve_jax.model.config import get_preset
from pdserve_jax.core import coordinator as C
from pdserve_jax.core.request import Request
from pdserve_jax.sim import hardware as H
from pdserve_jax.sim import latency as L
from pdserve_jax.core.share import PartitionerConfig
from pdserve_jax.sim import goodput
from pdserve_jax.sim import simulator as sim

CONV = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "traces",
                    "splitwise_conv.csv")
SETUP = sim.Setup(get_preset("opt-13b"), H.get_hardware("a100-80gb"),
                  lambda tp, pp: L.distserve_a100("opt-13b", tp, pp))
MODEL = L.distserve_a100("opt-13b", 1)


def _one(prompt=512, out=4):
  return [Request(0, prompt, out, arrival_time=1.0)]


def test_single_request_timings_colocated_and_disaggregated():
  pre, dec = MODEL.prefill_time([512]), MODEL.decode_time([513])
  for policy in ("prefill_first", "chunked"):
    r = sim.simulate(_one(), SETUP, sim.Colocated(policy=policy)).requests[0]
    assert r.ttft == pytest.approx(pre) and r.num_output == 4
    assert r.token_times[1] - r.token_times[0] == pytest.approx(dec)
  res = sim.simulate(_one(), SETUP, sim.Disaggregated())
  r = res.requests[0]
  kv = 512 * get_preset("opt-13b").kv_bytes_per_token()
  copy = kv / H.get_hardware("a100-80gb").intra_node_bw
  assert r.ttft == pytest.approx(pre)
  assert r.token_times[1] - r.token_times[0] == pytest.approx(copy + dec)
  far = sim.simulate(_one(), SETUP, sim.Disaggregated(same_node=False)).requests[0]
  assert far.tpot > r.tpot  # the network is slower than NVLink
  assert set(res.utilization) == {"prefill0", "decode0"}


def test_runs_are_fresh_and_deterministic():
  reqs = W.synthetic(200, 3.0, W.Uniform(100, 900), W.Uniform(1, 80), seed=1)
  a = sim.simulate(reqs, SETUP, sim.Disaggregated(num_prefill=2))
  b = sim.simulate(reqs, SETUP, sim.Disaggregated(num_prefill=2))
  assert all(r.num_output == 0 for r in reqs)  # inputs untouched
  assert [r.token_times for r in a.requests] == [r.token_times for r in b.requests]
  assert all(r.done and len(r.token_times) == r.max_tokens for r in a.requests)
  s = a.summary(0.4, 0.04)
  assert s["num_finished"] == 200 and 0 <= s["attainment"] <= 1 and s["num_devices"] == 3


@pytest.mark.parametrize("dep", [
    sim.Colocated(replicas=2),
    sim.Colocated(sim.InstanceSpec(max_step_tokens=512), policy="chunked"),
    sim.Disaggregated(num_prefill=2, num_decode=2),
    sim.SemiPD(), sim.SemiPD(concurrent=True, decode_scaling=L.ShareScaling(0.3, 0.7)),
    sim.PhaseOnly("prefill"), sim.PhaseOnly("decode"),
])
def test_every_mode_finishes_everything(dep):
  reqs = W.synthetic(150, 4.0, W.Uniform(16, 1500), W.Uniform(1, 100), seed=2)
  res = sim.simulate(reqs, SETUP, dep, ttft_slo=0.4, tpot_slo=0.04)
  assert all(r.finish_time is not None for r in res.requests)
  assert all(0 <= u <= 1 + 1e-9 for u in res.utilization.values())


def test_decode_memory_limits_the_batch():
  # Requests as long as a fifth of the decode pool: at most 5 decode together.
  cap = sim.kv_capacity_tokens(SETUP, 1, 1)
  reqs = [Request(i, cap // 5 - 100, 50, arrival_time=0.0) for i in range(20)]
  res = sim.simulate(reqs, SETUP, sim.PhaseOnly("decode"))
  times = sorted(t for r in res.requests for t in r.token_times[1:2])
  assert times[4] < times[5]  # the sixth waits for pages
  big = [Request(0, cap, 64)]
  with pytest.raises(sim.DoesNotFit, match="request 0"):
    sim.simulate(big, SETUP, sim.Colocated())


def test_weights_that_do_not_fit():
  setup = sim.Setup(get_preset("opt-175b"), H.get_hardware("a100-40gb"),
                    lambda tp, pp: MODEL)
  with pytest.raises(sim.DoesNotFit, match=r"opt-175b .* does not fit tp=1 x pp=1"):
    sim.simulate(_one(), setup, sim.Colocated())
  with pytest.raises(ValueError, match="no requests"):
    sim.simulate([], SETUP, sim.Colocated())
  with pytest.raises(ValueError, match="policy"):
    sim.simulate(_one(), SETUP, sim.Colocated(policy="fcfs"))


def test_semi_pd_sharing():
  pre = MODEL.prefill_time([512])
  # Concurrent SM partitioning: a prefill given half the device takes twice as long.
  dep = sim.SemiPD(prefill_share=0.5, concurrent=True)
  r = sim.simulate(_one(), SETUP, dep).requests[0]
  assert r.ttft == pytest.approx(2 * pre)
  # Time slicing: a lone request has the whole device.
  r = sim.simulate(_one(), SETUP, sim.SemiPD(prefill_share=0.2)).requests[0]
  assert r.ttft == pytest.approx(pre)
  with pytest.raises(ValueError, match="partitioner needs"):
    sim.simulate(_one(), SETUP, sim.SemiPD(partitioner=PartitionerConfig()))


def test_semi_pd_partitioner_moves_share_toward_prefill_under_ttft_pressure():
  # Long prompts, short outputs and a tight TTFT: prefill is the bottleneck.
  reqs = W.synthetic(600, 9.0, W.Fixed(1024), W.Fixed(8), seed=3)
  dep = sim.SemiPD(prefill_share=0.3,
                   partitioner=PartitionerConfig(window=50, step=0.1, max_share=0.9))
  res = sim.simulate(reqs, SETUP, dep, ttft_slo=0.3, tpot_slo=1.0)
  hist = res.share_history["semi_pd0"]
  assert hist[0][1] == 0.3 and hist[-1][1] > 0.3
  assert all(b[0] >= a[0] and abs(b[1] - a[1]) <= 0.1 + 1e-9 for a, b in zip(hist, hist[1:]))
  fixed = sim.simulate(reqs, SETUP, sim.SemiPD(prefill_share=0.3))
  assert res.attainment(0.3, 1.0) >= fixed.attainment(0.3, 1.0)


def test_distserve_figure1_disaggregation_beats_colocation():
  """DistServe's Figure 1: OPT-13B, 512 in / 64 out, P90 TTFT <= 0.4 s and TPOT <=
  0.04 s. Paper: 1.6 (colocated, 1 GPU) and 3.3 (2 prefill + 1 decode) req/s/GPU.

  Ours come from DistServe's own latency fits, which leave out the serving system's
  per-step overheads (scheduling, sampling, detokenisation, Python) that the
  paper's measured systems pay, so ours are higher; we accept up to 3x the paper's
  figure per GPU, and require disaggregation to win by at least 1.3x (paper: 2.1x).
  """
  make = lambda rate: W.synthetic(400, rate, W.Fixed(512), W.Fixed(64), seed=0)
  colo = goodput.goodput(make, SETUP, sim.Colocated(), 0.4, 0.04)
  dis = goodput.goodput(make, SETUP, sim.Disaggregated(num_prefill=2, num_decode=1), 0.4, 0.04) / 3
  assert dis > 1.3 * colo
  assert 1.6 <= colo <= 3 * 1.6
  assert 3.3 <= dis <= 3 * 3.3


def test_simulator_serves_the_conversation_trace():
  # Its speed (target: under 1 s for these 10,000 requests) is printed by
  # benchmarks/sim_speed.py; a bound here would fail on a loaded machine.
  if not os.path.exists(CONV):
    pytest.skip(f"shared trace not found at {CONV}")
  reqs = W.load_csv_trace(CONV).requests(n=10_000)
  res = sim.simulate(reqs, SETUP, sim.Disaggregated())
  assert len(res.requests) == 10_000 and all(r.done for r in res.requests)
  assert all(r.token_times[0] >= r.arrival_time for r in res.requests)


def test_pipeline_stages():
  # A lone request crosses both stages: the full prefill time, not half of it.
  r = sim.simulate(_one(), SETUP, sim.Colocated(sim.InstanceSpec(pp=2))).requests[0]
  assert r.ttft == pytest.approx(MODEL.prefill_time([512]))
  # Two engines keep two steps in flight, one stage apart.
  spec = sim.InstanceSpec(pp=2, max_step_tokens=512)
  two = [Request(i, 512, 1, arrival_time=0.0) for i in range(2)]
  a, b = sorted(sim.simulate(two, SETUP, sim.PhaseOnly("prefill", spec)).requests,
                key=lambda r: r.ttft)
  full = MODEL.prefill_time([512])
  assert a.ttft == pytest.approx(full) and b.ttft == pytest.approx(1.5 * full)
  # A short step behind a long one leaves the pipe one of its stages after it.
  staged = L.distserve_a100("opt-13b", 1, pp=2)
  mixed = [Request(0, 2000, 1, arrival_time=0.0), Request(1, 100, 1, arrival_time=0.001)]
  long, short = sim.simulate(mixed, SETUP, sim.PhaseOnly("prefill", spec)).requests
  assert short.token_times[0] == pytest.approx(long.token_times[0]
                                               + staged.prefill_time([100]))
  with pytest.raises(ValueError, match="semi-PD"):
    sim.simulate(_one(), SETUP, sim.SemiPD(sim.InstanceSpec(pp=2)))


def test_link_latency_and_overlap_slowdown():
  hw = dataclasses.replace(H.get_hardware("a100-80gb"), link_latency_s=0.01)
  setup = dataclasses.replace(SETUP, hardware=hw, overlap_slowdown=2.0)
  pre, d1, d2 = MODEL.prefill_time([512]), MODEL.decode_time([513]), MODEL.decode_time([514])
  copy = 0.01 + 512 * get_preset("opt-13b").kv_bytes_per_token() / hw.intra_node_bw
  # Alone, nothing contends: only the copy's fixed cost shows.
  r = sim.simulate(_one(out=3), setup, sim.Disaggregated()).requests[0]
  assert r.ttft == pytest.approx(pre) and r.token_times[1] - r.token_times[0] == pytest.approx(
      copy + d1)
  # A second prompt arrives halfway through the first's first decode step: it runs at
  # half speed until that step ends, and the next decode step, wholly beside it, at
  # half speed throughout.
  start = 1.0 + pre + copy
  reqs = [Request(0, 512, 3, arrival_time=1.0), Request(1, 512, 1, arrival_time=start + d1 / 2)]
  a, b = sim.simulate(reqs, setup, sim.Disaggregated()).requests
  assert b.ttft == pytest.approx(d1 / 2 + pre - d1 / 4)
  assert a.token_times[2] - a.token_times[1] == pytest.approx(2 * d2)


@pytest.mark.parametrize("field, value", [("memory_utilization", 5.0),
                                          ("memory_utilization", 0.0), ("page_size", 0),
                                          ("overlap_slowdown", 0.0)])
def test_setup_refuses_out_of_range_values(field, value):
  with pytest.raises(ValueError, match=f"^{field}"):
    dataclasses.replace(SETUP, **{field: value})


class _WithHost(L.LatencyModel):
  """Every step 0.1 s, of which 0.01 s is host work (`step_overhead_s`)."""
  step_overhead_s = 0.01

  def prefill_totals(self, num_seqs, tokens, sq_tokens):
    return 0.1

  def decode_totals(self, batch, context):
    return 0.1

  def mixed_totals(self, *a):
    return 0.1


def test_shared_host_serialises_the_instances_host_work():
  """Two replicas start a step at once: with one engine thread the second waits for
  the first's 10 ms of host work (a simulator that gave each instance its own host
  would finish both at 0.1 s)."""
  reqs = [Request(0, 16, 2, 0.0), Request(1, 16, 2, 0.0)]
  dep = sim.Colocated(replicas=2)
  own = sim.Setup(get_preset("opt-13b"), H.get_hardware("a100-80gb"), lambda tp, pp: _WithHost())
  firsts = lambda setup: sorted(r.token_times[0] for r in sim.simulate(reqs, setup, dep).requests)
  assert firsts(own) == pytest.approx([0.1, 0.1])
  assert firsts(dataclasses.replace(own, shared_host=True)) == pytest.approx([0.1, 0.11])


def _outcome(reqs, setup, dep):
  res = sim.simulate(reqs, setup, dep, record_steps=True)
  per_request = [(r.request_id, r.token_times, r.finish_time, r.num_preemptions,
                  r.num_cached, r.num_computed) for r in res.requests]
  return res.steps, per_request, res.summary(), res.num_preemptions


@pytest.mark.parametrize("dep, kv_tokens", [
    (sim.Disaggregated(num_decode=2), None),
    (sim.Disaggregated(), 4000),  # decode pool short: growth preempts
    (sim.Disaggregated(num_decode=2, conditional_threshold=300), 6000),
    (sim.Disaggregated(decode=sim.InstanceSpec(max_batch=4)), None),  # joiners wait
    (sim.Disaggregated(kv_transfer="layerwise", decode_cache=False), None),
])
def test_back_to_back_decode_steps_change_no_decision_and_no_time(dep, kv_tokens,
                                                                    monkeypatch):
  """The simulator's fast path (a decode instance's steps handled back to back when
  nothing comes between them, runs that change nothing at once: `LatencyExecutor._done`)
  gives the steps, token times, preemptions and counters of handling each step
  through the heap and the coordinator. Catches a run that goes past a finishing
  request, a page due, a joining request or another instance's event, or that
  times or counts a step differently (peak pages, busy time)."""
  reqs = W.shared_prefix(250, 8.0, W.Uniform(20, 300), W.Uniform(1, 300),
                         system_prompt_len=600, system_prompt_share=0.8, turns=2,
                         think_time=1.0, max_total_tokens=2048, seed=3)
  setup = dataclasses.replace(SETUP, kv_tokens=kv_tokens)
  ran = {"skipped": 0, "repeated": 0}
  skip, repeat = C.Coordinator.skip, C.Coordinator.repeat

  def counting_skip(self, inst, times):
    ran["skipped"] += len(times)
    return skip(self, inst, times)

  def counting_repeat(self, inst, now, seconds):
    step = repeat(self, inst, now, seconds)
    ran["repeated"] += step is not None
    return step

  monkeypatch.setattr(C.Coordinator, "skip", counting_skip)
  monkeypatch.setattr(C.Coordinator, "repeat", counting_repeat)
  fast = _outcome(reqs, setup, dep)
  assert ran["skipped"] > 100 and ran["repeated"] > 100  # the fast path ran
  if kv_tokens == 4000:
    assert fast[3] > 0  # and met preemptions
  monkeypatch.setattr(C.DisaggregatedCoordinator, "repeats", lambda self, inst: False)
  ran["skipped"] = 0
  slow = _outcome(reqs, setup, dep)
  assert ran["skipped"] == 0
  assert fast == slow


def test_peak_kv_counts_pages_reserved_while_decode_steps_run_back_to_back():
  """A prompt copied to the decode instance while its one batch slot is taken holds
  its pages there beside the running request's: the peak counts both, though the
  decode steps then run back to back, no page growing (a fast path that noted pages
  only at steps through the general launch saw each request alone)."""
  a, b = Request(0, 512, 400, 0.0), Request(1, 1024, 10, 1.0)
  setup = dataclasses.replace(SETUP, kv_tokens=10_000, page_size=512)  # 19 pages
  dep = sim.Disaggregated(decode=sim.InstanceSpec(max_batch=1))
  res = sim.simulate([a, b], setup, dep)
  assert res.requests[1].token_times[1] > res.requests[0].finish_time  # b waited for a
  assert res.peak_kv["decode0"] == pytest.approx((2 + 3) / 19)  # a's 912 tokens, b's 1025


@settings(max_examples=40, deadline=None, derandomize=True)
@given(seed=st.integers(0, 10**6), page_size=st.sampled_from([1, 4, 16, 64]),
       tokens=st.integers(600, 6000), max_batch=st.integers(1, 24),
       num_decode=st.integers(1, 3), threshold=st.sampled_from([0, 64, 512]),
       cap=st.sampled_from([None, 3000]), rate=st.sampled_from([2.0, 8.0, 30.0]))
def test_back_to_back_decode_steps_match_one_by_one_on_random_runs(
    seed, page_size, tokens, max_batch, num_decode, threshold, cap, rate):
  """As above, on random shared-prefix workloads, pool sizes, page sizes, decode
  batches, instance counts, conditional prefill and decode caps: the fast path and
  the general one give the same steps, token times and counters."""
  if threshold and cap:
    cap = None  # local prefill and a decode cap do not combine
  reqs = W.shared_prefix(60, rate, W.Uniform(4, 200), W.Uniform(1, 120),
                         system_prompt_len=100, system_prompt_share=0.7, turns=2,
                         think_time=0.5, max_total_tokens=tokens // 2, seed=seed)
  setup = dataclasses.replace(SETUP, kv_tokens=tokens, page_size=page_size)
  decode = sim.InstanceSpec(max_batch=max_batch, max_decode_tokens=cap,
                            max_step_tokens=max(512, max_batch + 1))
  dep = sim.Disaggregated(decode=decode, num_decode=num_decode,
                          conditional_threshold=threshold)
  fast = _outcome(reqs, setup, dep)
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(C.DisaggregatedCoordinator, "repeats", lambda self, inst: False)
    slow = _outcome(reqs, setup, dep)
  assert fast == slow
