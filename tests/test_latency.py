"""Tests of hardware specs and the latency models."""

import os

import numpy as np
import pytest

from pdserve_jax.model.config import get_preset
from pdserve_jax.core.request import Request
from pdserve_jax.core.step import PrefillChunk, Step
from pdserve_jax.sim import hardware as H
from pdserve_jax.sim import latency as L

DISTSERVE_JSON = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data",
                              "distserve", "profiler-a100-80g.distserve.json")


def test_hardware_specs():
  assert sorted(H.SPECS) == sorted(["a100-40gb", "a100-80gb", "h100-sxm", "h200", "tpu-v4",
                                    "tpu-v5e", "tpu-v5p", "tpu-v6e"])
  a100 = H.get_hardware("A100-80GB")
  assert a100.peak_flops == 312e12 and a100.devices_per_node == 8
  assert H.get_hardware("v5e").hbm_bytes == 16e9
  assert a100.link_bandwidth(True) > a100.link_bandwidth(False)
  with pytest.raises(ValueError, match=r"unknown hardware 'b200'.*a100-40gb"):
    H.get_hardware("b200")


def test_distserve_preset_and_json_agree():
  m = L.distserve_a100("opt-13b", tp=1)
  ms = 18.10254647486372 + 0.1019122572698738 * 512 + 7.122264314252114e-06 * 512**2
  assert m.prefill_time([512]) == pytest.approx(ms / 1e3)
  if not os.path.exists(DISTSERVE_JSON):
    pytest.skip(f"DistServe profile not found at {DISTSERVE_JSON}")
  for model, tps in (("opt-13b", (1, 2, 4)), ("facebook/opt-66b", (2, 3, 4, 8))):
    for tp in tps:
      assert L.load_distserve_json(DISTSERVE_JSON, model, tp, pp=2) == L.distserve_a100(
          model, tp, pp=2)
  with pytest.raises(ValueError, match="no tp=8"):
    L.load_distserve_json(DISTSERVE_JSON, "opt-13b", 8)
  with pytest.raises(ValueError, match="no model"):
    L.load_distserve_json(DISTSERVE_JSON, "llama2-7b", 1)


def test_polynomial_form():
  m = L.PolynomialLatencyModel((1.0, 0.1, 0.01), (2.0, 0.001, 0.5), (3.0, 0.002, 0.25),
                               large_batch_threshold=4)
  assert m.prefill_time([10, 20]) == pytest.approx(1 + 0.1 * 30 + 0.01 * 500)
  assert m.decode_time([100] * 3) == pytest.approx(2 + 0.3 + 1.5)    # small batch
  assert m.decode_time([100] * 4) == pytest.approx(3 + 0.8 + 1.0)    # large batch
  assert m.with_pp(2).decode_time([100] * 4) == pytest.approx(4.8 / 2)
  # Chunks of one prompt add up to the whole prompt, but for the fixed cost.
  whole = m.prefill_time([30])
  parts = m.prefill_time([10], [0]) + m.prefill_time([30], [10])
  assert parts - 1.0 == pytest.approx(whole)
  # A mixed step: the prefill plus the decodes' variable terms.
  r = Request(0, 30, 4)
  d = Request(1, 8, 4)
  d.num_prefilled, d.num_output = 8, 2
  step = Step([PrefillChunk(r, 10, 30)], [d])
  assert m.step_time(step) == pytest.approx(m.prefill_time([30], [10]) + 0.001 * 10 + 0.5)
  assert m.step_time(Step([], [d])) == pytest.approx(m.decode_time([10]))


def test_fit_polynomial_recovers_and_round_trips(tmp_path):
  true = L.PolynomialLatencyModel((0.02, 1e-4, 7e-9), (0.02, 6e-7, 4e-5), (0.007, 6e-7, 1.6e-4),
                                  large_batch_threshold=16)
  rng = np.random.default_rng(0)
  pre = [(list(rng.integers(16, 2048, size=rng.integers(1, 5))), 0.0) for _ in range(40)]
  pre = [(l, true.prefill_time(l)) for l, _ in pre]
  dec = [(list(rng.integers(16, 2048, size=b)), 0.0) for b in rng.integers(1, 64, size=60)]
  dec = [(l, true.decode_time(l)) for l, _ in dec]
  fit = L.fit_polynomial(pre, dec, large_batch_threshold=16)
  np.testing.assert_allclose(fit.prefill, true.prefill, rtol=1e-6)
  np.testing.assert_allclose(fit.decode_small, true.decode_small, rtol=1e-6)
  np.testing.assert_allclose(fit.decode_large, true.decode_large, rtol=1e-6)
  path = tmp_path / "m.json"
  fit.save(str(path))
  assert L.PolynomialLatencyModel.load(str(path)) == fit
  # Relative weighting: with noise proportional to the time, errors stay relative.
  noisy = [(l, t * (1 + 0.02 * rng.standard_normal())) for l, t in pre]
  one = L.fit_polynomial(noisy, dec)
  errs = [abs(one.prefill_time(l) / t - 1) for l, t in pre]
  assert max(errs) < 0.1
  with pytest.raises(ValueError, match="at least 3"):
    L.fit_polynomial(pre[:2], dec)
  with pytest.raises(ValueError, match="both"):
    L.fit_polynomial([], dec)
  with pytest.raises(ValueError, match="polynomial"):
    L.PolynomialLatencyModel.from_json('{"kind": "roofline"}')


def test_roofline_model():
  m, hw = get_preset("opt-13b"), H.get_hardware("a100-80gb")
  r1 = L.RooflineLatencyModel(m, hw, tp=1)
  r2 = L.RooflineLatencyModel(m, hw, tp=2)
  # Decode of one request is a weight read: memory-bound.
  weights_s = m.num_params() * 2 / (hw.hbm_bandwidth * r1.bandwidth_efficiency)
  assert r1.decode_time([512]) == pytest.approx(weights_s + r1.step_overhead_s, rel=0.05)
  # Prefill of a long prompt is compute-bound: time grows with tokens.
  assert r1.prefill_time([2048]) > 3 * r1.prefill_time([512])
  assert r2.prefill_time([2048]) < r1.prefill_time([2048])
  assert r1.decode_time([512] * 64) > r1.decode_time([512])
  # The analytic model lands near DistServe's measured A100 fits for OPT-13B.
  for tp in (1, 2, 4):
    ds, rf = L.distserve_a100("opt-13b", tp), L.RooflineLatencyModel(m, hw, tp=tp)
    for lens in ([512], [512] * 4, [2048]):
      assert 0.5 < rf.prefill_time(lens) / ds.prefill_time(lens) < 2
    for b in (1, 16, 64):
      assert 0.5 < rf.decode_time([600] * b) / ds.decode_time([600] * b) < 2
  with pytest.raises(ValueError, match="flops_efficiency"):
    L.RooflineLatencyModel(m, hw, flops_efficiency=1.5)


def test_share_scaling_and_transfer():
  s = L.ShareScaling(0.6, 0.4)
  assert s.factor(1.0) == pytest.approx(1.0)
  assert s.factor(0.5) == pytest.approx(1.6)
  fit = L.ShareScaling.fit([(x, s.factor(x)) for x in (0.2, 0.4, 0.7, 1.0)])
  assert fit.alpha == pytest.approx(0.6) and fit.beta == pytest.approx(0.4)
  with pytest.raises(ValueError):
    s.factor(0.0)
  assert L.transfer_time(1e9, 25e9) == pytest.approx(0.04)
  with pytest.raises(ValueError):
    L.transfer_time(1.0, 0.0)


def test_shape_table_rounds_steps_as_the_runner_does(tmp_path):
  from pdserve_jax.runtime.buckets import RunnerShape
  shape = RunnerShape(page_size=4, num_pages=64, max_rows=4, max_step_tokens=32, max_seq_len=32,
                      min_step_tokens=4)
  assert shape.token_buckets == (4, 8, 16, 32) and shape.decode_batches == (1, 2, 4)
  # Every measured time names its own shape, so a sum shows which shapes were used.
  packed = {(t,): t * 1e2 for (t,) in shape.compiled_packed_shapes()}
  dec = {(b,): b * 1e6 for (b,) in shape.compiled_decode_shapes()}
  m = L.ShapeTableLatencyModel(shape, packed, dec)
  reqs = [Request(i, 10 + i, 8) for i in range(3)]
  # 10 + 11 tokens go in one packed call of bucket 32; 12 more would pass 32: a second
  # call, bucket 16.
  step = Step([PrefillChunk(reqs[0], 0, 10), PrefillChunk(reqs[1], 0, 11),
               PrefillChunk(reqs[2], 0, 12)], [])
  assert m.step_time(step) == packed[32,] + packed[16,]
  # The pages requests hold do not matter: one table width.
  assert m.step_time(step, lambda r: [0] * 7) == m.step_time(step)
  # Decodes alone: 3 rows pad to batch 4.
  for r in reqs:
    r.num_prefilled, r.num_output = r.prompt_len, 1
  assert m.step_time(Step([], reqs)) == dec[4,]
  # A chunk with decodes: one packed call of 10 + 2 tokens, bucket 16.
  assert m.step_time(Step([PrefillChunk(reqs[0], 0, 10)], reqs[1:])) == packed[16,]
  assert m.decode_totals(3, 36) == dec[4,] and m.prefill_totals(2, 20, 200) == packed[32,]
  path = tmp_path / "table.json"
  m.save(path)
  assert L.latency_source(str(path), get_preset("tiny"), H.get_hardware("a100-80gb"))(1, 1) == m
  with pytest.raises(ValueError, match="pp=2"):
    L.latency_source(str(path), get_preset("tiny"), H.get_hardware("a100-80gb"))(1, 2)
  with pytest.raises(ValueError, match=r"no measured decode program of shape \(8,\)"):
    L.ShapeTableLatencyModel(shape, packed, {}).calls_time(decode_calls=[(8,)])
  # Five decodes over the row cap of 4 run as two calls, as the executor groups them;
  # five one-token rows with a chunk as two packed calls.
  five = [Request(i, 4, 4, num_prefilled=4, num_output=1) for i in range(5)]
  assert m.step_time(Step([], five)) == dec[4,] + dec[1,]
  assert m.step_time(Step([PrefillChunk(reqs[0], 0, 3)], five)) == packed[8,] + packed[4,]
  with pytest.raises(ValueError, match="a row of 40 tokens exceeds"):
    m.step_time(Step([PrefillChunk(Request(9, 40, 2), 0, 40)], []))


def test_step_overhead_reads_gaps_between_steps(tmp_path):
  from pdserve_jax.runtime.buckets import RunnerShape
  from pdserve_jax.core.seam import StepRecord
  from pdserve_jax.runtime.profiler import step_overhead
  rec = lambda name, a, b: StepRecord(name, a, b, (), ((1, 1),))
  log = [rec("prefill", 0.0, 1.0), rec("decode", 1.25, 2.0), rec("prefill", 1.5, 3.0),
         rec("decode", 2.5, 3.0), rec("decode", 3.5, 4.0)]
  # Per instance: prefill gap 0.5; decode gaps 0.5, 0.5.
  assert step_overhead(log) == 0.5
  # Semi-PD's phases share one device: gaps run across them.
  seq = [rec("prefill", 0.0, 1.0), rec("decode", 1.1, 2.0), rec("decode", 2.3, 3.0)]
  assert step_overhead(seq, lambda r: 0) == pytest.approx(0.2)
  with pytest.raises(ValueError, match="no consecutive steps"):
    step_overhead([rec("decode", 0.0, 1.0)])
  shape = RunnerShape(page_size=4, num_pages=16, max_rows=2, max_step_tokens=16, max_seq_len=16,
                      min_step_tokens=8)
  m = L.ShapeTableLatencyModel(shape, {k: 1.0 for k in shape.compiled_packed_shapes()},
                               {k: 2.0 for k in shape.compiled_decode_shapes()}, 0.25)
  d = Request(0, 4, 4, num_prefilled=4, num_output=1)
  assert m.step_time(Step([], [d])) == 2.25
  # A chunk and a decode: one packed call.
  assert m.step_time(Step([PrefillChunk(Request(1, 6, 2), 0, 6)], [d])) == 1.25
  assert m.mixed_totals(1, 6, 36, 1, 5) == 1.25
  m.save(tmp_path / "t.json")
  assert L.ShapeTableLatencyModel.from_json((tmp_path / "t.json").read_text()) == m
