"""semi-PD as its paper runs it: the SM-share model (caps that may add up to more
than the device, contention, work conservation, the paper's fitted curves), the
paper's partitioner (Algorithm 1 with its latency model), the simulator re-timing
a step when the other phase starts or stops, and DistServe's decode cap and
output-length convention."""

import dataclasses

import pytest

from pdserve_jax.core import deploy
from pdserve_jax.core import policies as S
from pdserve_jax.core.pages import PageAllocator
from pdserve_jax.core.request import Request
from pdserve_jax.core.share import (PAPER_DECODE_STEP, PAPER_TPOT_CURVE, ModelPartitioner,
                                    ModelPartitionerConfig, ShareScaling, SmShares)
from pdserve_jax.core.step import PREFILL
from pdserve_jax.model.config import get_preset
from pdserve_jax.sim import hardware as H
from pdserve_jax.sim import latency as L
from pdserve_jax.sim import simulator as sim

OPT13 = get_preset("opt-13b")
A100 = H.get_hardware("a100-80gb")


# --- the SM-share model ----------------------------------------------------------------


def test_paper_curves_and_fit_with_a_pole():
  # Figure 10(b): 0.6284 / y + 0.3818, 1.0102 at the whole device.
  assert PAPER_DECODE_STEP.factor(1.0) == pytest.approx(1.0102)
  assert PAPER_DECODE_STEP.factor(0.5) == pytest.approx(0.6284 * 2 + 0.3818)
  assert (PAPER_DECODE_STEP.alpha, PAPER_DECODE_STEP.beta) == PAPER_TPOT_CURVE
  curve = ShareScaling(0.7, 0.02, lam=0.3)
  fit = ShareScaling.fit([(s, curve.factor(s)) for s in (0.4, 0.5, 0.7, 1.0)], lam=0.3)
  assert (fit.alpha, fit.beta) == pytest.approx((0.7, 0.02))
  with pytest.raises(ValueError, match="share must lie in"):
    curve.factor(0.3)  # at the pole: the queue never drains
  with pytest.raises(ValueError, match="must exceed lam"):
    ShareScaling.fit([(0.2, 1.0), (0.5, 2.0)], lam=0.3)
  with pytest.raises(ValueError, match="lam must lie"):
    ShareScaling(lam=1.0)


def test_sm_shares_contend_beyond_the_device_and_idle_sms_are_taken_up():
  hard = SmShares(0.6, 0.4)
  assert hard.shares(True, True) == (0.6, 0.4) and hard.shares(True, False) == (0.6, 0.4)
  # (100, 100): each phase alone has the whole device, together half of it each.
  full = SmShares(1.0, 1.0)
  assert full.shares(True, False) == (1.0, 1.0) and full.shares(True, True) == (0.5, 0.5)
  # (80, 60): 40% of the SMs both may use, shared evenly; alone, each keeps its cap
  # unless work-conserving.
  over = SmShares(0.8, 0.6)
  assert over.shares(True, True) == pytest.approx((0.6, 0.4))
  assert over.shares(True, False) == (0.8, 0.6)
  assert SmShares(0.8, 0.6, work_conserving=True).shares(True, False) == (1.0, 0.6)
  assert SmShares(0.8, 0.6, work_conserving=True).shares(False, True) == (0.8, 1.0)
  assert over.time_share == pytest.approx(0.8 / 1.4)
  with pytest.raises(ValueError, match="SM cap y"):
    SmShares(0.5, 1.5)
  with pytest.raises(ValueError, match="work_conserving applies to SM partitioning"):
    deploy.SemiPD(work_conserving=True).check()
  deploy.SemiPD(prefill_share=1.0, decode_share=1.0, concurrent=True).check()
  with pytest.raises(ValueError, match="strictly between 0 and 1"):
    deploy.SemiPD(prefill_share=1.0).check()  # without y, x + (1 - x) = 1


class _Constant(L.LatencyModel):
  """Every prefill step 1 s, every decode step 0.1 s, at the whole device."""

  def prefill_totals(self, num_seqs, tokens, sq_tokens):
    return 1.0

  def decode_totals(self, batch, context):
    return 0.1

  def mixed_totals(self, *a):
    raise AssertionError("semi-PD runs no mixed steps")


def test_simulator_retimes_a_step_when_the_other_phase_starts_and_stops():
  """A's prefill runs alone (0-1 s). B arrives as A starts decoding: both run at half
  the device ((1, 1) caps), so A's decodes take 0.2 s and B's prefill does 0.4 s of
  its work by 1.8 s, then finishes the 0.6 s left alone. A simulator that fixed a
  step's time at launch would give B's first token at 3.0 s."""
  setup = sim.Setup(OPT13, A100, lambda tp, pp: _Constant())
  dep = deploy.SemiPD(prefill_share=1.0, decode_share=1.0, concurrent=True)
  reqs = [Request(0, 16, 5, 0.0), Request(1, 16, 2, 1.0)]
  a, b = sim.simulate(reqs, setup, dep).requests
  assert a.token_times == pytest.approx([1.0, 1.2, 1.4, 1.6, 1.8])
  assert b.token_times == pytest.approx([2.4, 2.5])
  # With hard caps (0.5, 0.5) each phase runs at half the device even alone.
  a, b = sim.simulate(reqs, setup, dep.__class__(prefill_share=0.5, concurrent=True)).requests
  assert a.token_times[0] == pytest.approx(2.0) and b.token_times[0] == pytest.approx(4.0)


# --- the paper's partitioner -------------------------------------------------------------


def _done(ttft, tpot, n=8):
  r = Request(0, 4, n, 0.0)
  r.token_times = [ttft + i * tpot for i in range(n)]
  r.num_output, r.finish_time = n, r.token_times[-1]
  return r


def _window(part, ttft, tpot, t0=0.0, window=4, prefill_s=0.1):
  """One window of iterations: prefill steps of `prefill_s` s, one a second, each
  finishing a request of this TTFT and TPOT. Returns what the last step moved."""
  out = None
  for i in range(window):
    out = part.after_step(PREFILL, prefill_s, [_done(ttft, tpot)], t0 + i + 1)
  return out


def _part(x=0.5, y=0.5, **kw):
  return ModelPartitioner(1.0, 0.1, ModelPartitionerConfig(window=4, **kw), x, y)


def test_model_partitioner_steps_until_the_model_meets_the_slo():
  """Prefill is busy 0.4 s of a 4 s window: lambda = 0.1. TTFT 1.05 s against 1.0:
  the model through it (the paper's curve shape) meets the SLO after one step of x.
  A fixed-step partitioner, or one that ignored its model, would step to the cap."""
  part = _part()
  assert part.after_step(PREFILL, 0.1, [], 1.0) is None  # mid-window
  assert _window(part, 1.05, 0.05, t0=1.0, window=3) == (0.55, 0.5)
  assert part.lam == pytest.approx(0.1) and part.share == pytest.approx(0.55 / 1.05)
  far = _part()
  assert _window(far, 3.0, 0.05) == (0.7, 0.5)  # 3x over: every one of max_step steps
  tpot = _part()
  assert _window(tpot, 0.5, 0.2) == (0.5, 0.7)  # TPOT fails: y grows
  assert _window(_part(max_step=2), 3.0, 0.05) == (0.6, 0.5)


def test_model_partitioner_overflow_both_failing_and_saturation():
  full = _part(1.0, 1.0)
  assert _window(full, 3.0, 0.05) == (1.0, 0.8)  # x is at 100%: y gives way
  assert full.caps_history[-1][1:] == (1.0, 0.8)
  assert _window(_part(), 3.0, 0.5) is None  # both fail: no room (the paper's text)
  assert _window(_part(), 0.5, 0.05) is None  # both met
  # Prefill busy the whole window: lambda = x', the model's TTFT is unbounded, so x
  # takes every step even though TTFT is only just over its SLO.
  assert _window(_part(), 1.01, 0.05, prefill_s=1.0) == (0.7, 0.5)
  with pytest.raises(ValueError, match="initial SM ratio y"):
    _part(0.5, 0.05)
  with pytest.raises(ValueError, match="max_step must be an int"):
    _part(max_step=0)


def test_model_partitioner_drives_the_simulator():
  """Runs the paper's partitioner inside the simulator (the coordinator's hook):
  a prefill-heavy burst on a decode-heavy split moves x up."""
  setup = sim.Setup(get_preset("llama3-8b"), A100, L.latency_source(
      "roofline", get_preset("llama3-8b"), A100))
  reqs = [Request(i, 1500, 4, 0.01 * i) for i in range(300)]
  for concurrent in (False, True):
    dep = deploy.SemiPD(prefill_share=0.3, decode_share=0.9, concurrent=concurrent,
                        partitioner=ModelPartitionerConfig(window=16))
    res = sim.simulate(reqs, setup, dep, ttft_slo=0.5, tpot_slo=0.2)
    shares = [s for _, s in next(iter(res.share_history.values()))]
    assert shares[0] == pytest.approx(0.25) and shares[-1] > 0.5, shares


# --- DistServe's conventions --------------------------------------------------------------


def _decoding(i, prompt):
  r = Request(i, prompt, 50)
  r.num_prefilled, r.num_output, r.token_times = prompt, 1, [0.0]
  return r


def test_decode_cap_takes_a_rotating_prefix():
  """A cap of 25 attended tokens fits two requests of context 10: the third waits
  one step, then the rotation takes it first (DistServe's queue)."""
  dec = S.DecodeScheduler(PageAllocator(100, 4), 8, max_decode_tokens=25)
  reqs = [_decoding(i, 9) for i in range(3)]
  for r in reqs:
    dec.reserve(r)
    dec.admit(r)
  step = dec.schedule()
  assert step.decodes == reqs[:2] and step.decode_context == 20
  dec.complete(step, 1.0)
  step = dec.schedule()
  assert step.decodes == [reqs[2], reqs[0]]
  dec.complete(step, 2.0)
  assert dec.schedule().decodes == [reqs[1], reqs[2]]
  alloc = PageAllocator(100, 4)
  colo = S.PrefillFirstScheduler(alloc, 8, 4096, max_decode_tokens=25)
  for i in range(3):
    colo.add(Request(i, 9, 50))
  colo.complete(colo.schedule(), 1.0)  # prefill all three
  assert [r.request_id for r in colo.schedule().decodes] == [0, 1]
  with pytest.raises(ValueError, match="max_decode_tokens must be >= 1"):
    S.DecodeScheduler(PageAllocator(4, 4), 2, max_decode_tokens=0)


def test_distserve_compat_runs_output_len_decode_steps_and_caps_decodes():
  model = L.distserve_a100("opt-13b")
  plain = sim.Setup(OPT13, A100, lambda tp, pp: model)
  compat = sim.Setup(OPT13, A100, lambda tp, pp: model, distserve_compat=True)
  one = [Request(0, 512, 4, 0.0)]
  r = sim.simulate(one, compat, deploy.Colocated()).requests[0]
  assert r.num_output == 5 and len(r.token_times) == 5  # the prefill's + 4 decodes
  assert sim.simulate(one, plain, deploy.Colocated()).requests[0].num_output == 4
  # 200 requests of 1,000 tokens decoding at once: the cap runs 50 a step.
  burst = [Request(i, 1000, 30, 0.0) for i in range(200)]
  res = sim.simulate(burst, compat, deploy.Colocated(deploy.InstanceSpec(max_batch=512)),
                     record_steps=True)
  decodes = [len(d) for p, d in next(iter(res.steps.values())) if d]
  assert max(decodes) == 49  # (1,000 + the token fed) x 49 <= 50,000
  res = sim.simulate(burst, plain, deploy.Colocated(deploy.InstanceSpec(max_batch=512)),
                     record_steps=True)
  assert max(len(d) for p, d in next(iter(res.steps.values())) if d) > 49


def test_preemptions_and_recomputed_tokens_are_counted():
  """A pool too small for the burst preempts and recomputes; the count is the
  prompt and output tokens prefilled again."""
  setup = sim.Setup(OPT13, A100, lambda tp, pp: L.distserve_a100("opt-13b"),
                    kv_tokens=4000)
  burst = [Request(i, 300, 200, 0.0) for i in range(20)]
  res = sim.simulate(burst, setup, deploy.Colocated())
  assert res.num_preemptions > 0 and res.recomputed_tokens >= 300 * res.num_preemptions
  assert res.summary()["recomputed_tokens"] == res.recomputed_tokens
  calm = sim.simulate(burst, dataclasses.replace(setup, kv_tokens=10 ** 6), deploy.Colocated())
  assert calm.num_preemptions == 0 and calm.recomputed_tokens == 0

