"""The profiler on real programs: the profile CLI's two latency models and KV copy
timing, read back by the simulator."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

import pdserve_jax as pdj
from pdserve_jax.model import sharding
from pdserve_jax.runtime.programs import (CompileCounter, InstanceRunner, RunnerShape,
                                         SamplingRows)
from pdserve_jax.sim import hardware as H
from pdserve_jax.sim import latency as L
from pdserve_jax.runtime import profiler
from pdserve_jax.sim import simulator as sim
from pdserve_jax import workloads as W

ROOT = os.path.join(os.path.dirname(__file__), "..")
SMALL_GRID = ["--config.model=tiny", "--config.reps=2", "--config.num_pages=32",
              "--config.max_batch=4", "--config.max_seq_len=64",
              "--config.prefill_batches=(1, 2)", "--config.prefill_lens=(16, 24, 40, 48)",
              "--config.max_step_tokens=96", "--config.decode_batches=(1, 2, 3, 4)",
              "--config.decode_contexts=(8, 24, 40, 64)", "--config.min_token_bucket=32"]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["polynomial", "shapes"])
def test_profile_cli_writes_what_the_simulator_reads(tmp_path, kind):
  out = tmp_path / f"{kind}.json"
  proc = subprocess.run([sys.executable, "-m", "pdserve_jax.cli.profile",
                         "--config=configs/profile_cpu.py", f"--config.kind={kind}",
                         f"--output_json={out}", *SMALL_GRID],
                        cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  d = json.loads(out.read_text())
  assert d["kind"] == ("polynomial" if kind == "polynomial" else "shape_table")
  model = pdj.get_preset("tiny")
  latency = L.latency_source(str(out), model, H.get_hardware("a100-80gb"))
  if kind == "polynomial":
    assert len(d["prefill_samples"]) == 8 and len(d["decode_samples"]) == 16
    assert "median relative error" in proc.stdout
  else:
    table = latency(1, 1)
    assert set(table.decode) == set(table.shape.compiled_decode_shapes())
    assert all(t > 0 for t in list(table.packed.values()) + list(table.decode.values()))
  setup = sim.Setup(model, H.get_hardware("a100-80gb"), latency, kv_tokens=31 * 16)
  reqs = W.synthetic(20, 5.0, W.Uniform(8, 40), W.Uniform(2, 20), seed=0)
  res = sim.simulate(reqs, setup, sim.Colocated(sim.InstanceSpec(1, 1, 4, 96)))
  assert all(r.finish_time is not None for r in res.requests)


@pytest.mark.slow
def test_shape_table_prices_a_call_it_did_not_time_at_its_bucket():
  # How close the priced time is to a measured one depends on the machine's load:
  # benchmarks/shape_table.py prints that ratio. Here: the table covers every
  # compiled shape, a ragged call lands in one of them (the runner compiles nothing
  # for it), and the table prices it at that bucket's measured time.
  model = pdj.random_model(pdj.get_preset("tiny"), seed=0)
  shape = RunnerShape(page_size=8, num_pages=40, max_rows=4, max_step_tokens=64, max_seq_len=32,
                      min_step_tokens=16)
  runner = InstanceRunner(model, sharding.split_devices([1])[0], shape)
  table = profiler.profile_shapes(runner, reps=1)  # its untimed calls compile every shape
  assert set(table.packed) == set(shape.compiled_packed_shapes())
  assert set(table.decode) == set(shape.compiled_decode_shapes())
  assert all(t > 0 for t in list(table.packed.values()) + list(table.decode.values()))
  # Three decode rows run as the (4,) bucket; two prompts of 20 and 9 tokens as the
  # (32,) one.
  tables = [[1, 2], [3, 4, 5], [6, 7, 8, 9]]
  assert shape.decode_shape(3) == (4,)
  assert shape.step_calls([20, 9], 0) == (((32,),), ())
  with CompileCounter() as counter:
    np.asarray(runner.decode([1, 2, 3], [10, 20, 30], tables, SamplingRows.greedy(3)).tokens)
    np.asarray(runner.packed([[1] * 20, [2] * 9], [0, 0], [[10, 11, 12], [13, 14]],
                             SamplingRows.greedy(2)).tokens)
  assert counter.count == 0
  assert table.calls_time(decode_calls=[(4,)]) == table.decode[4,]
  assert table.calls_time(packed_calls=[(32,)], decode_calls=[(4,)]) == (
      table.packed[32,] + table.decode[4,])
  with pytest.raises(ValueError, match="no measured decode program"):
    table.calls_time(decode_calls=[(3,)])  # 3 is no decode bucket


@pytest.fixture(scope="module")
def pools():
  """Two real page pools on meshes of 1 and 2 devices (a disaggregated hand-off)."""
  from pdserve_jax.kv.pool import PagePool

  cfg = pdj.get_preset("tiny")
  a, b = sharding.split_devices([1, 2])
  return PagePool(cfg, a, 40, 8), PagePool(cfg, b, 40, 8)


def _fit_over_stubbed_timer(monkeypatch, pools, seconds, page_counts=(1, 2, 4, 8)):
  """`profile_transfers` with its timer stubbed: a copy of n pages "takes"
  `seconds(n * page_bytes)`; the copies themselves still run."""
  src, dst = pools
  page_bytes = src.bytes / src.num_pages
  timed = iter(seconds(n * page_bytes) for n in page_counts)

  def median_time(fn, reps):
    fn()
    return next(timed)

  monkeypatch.setattr(profiler, "median_time", median_time)
  return profiler.profile_transfers(src, dst, page_counts, reps=1), page_bytes


def test_profile_transfers_recovers_a_fixed_cost_and_a_bandwidth(monkeypatch, pools):
  # Catches a fit that swaps the intercept and the slope, or returns seconds per
  # byte (or bytes per second off by a factor) instead of bytes per second.
  (fixed, bandwidth), page_bytes = _fit_over_stubbed_timer(
      monkeypatch, pools, lambda nbytes: 2e-4 + nbytes / 5e9)
  assert fixed == pytest.approx(2e-4, rel=1e-6)
  assert bandwidth == pytest.approx(5e9, rel=1e-6)
  # What the simulator then charges a copy is the stubbed time.
  assert L.transfer_time(3 * page_bytes, bandwidth, fixed) == pytest.approx(
      2e-4 + 3 * page_bytes / 5e9, rel=1e-6)


def test_profile_transfers_clamps_a_negative_fixed_cost(monkeypatch, pools):
  # Catches a lost clamp (a negative fixed cost would make small copies free or
  # negative in the simulator), and a clamp that also zeroes the slope.
  (fixed, bandwidth), _ = _fit_over_stubbed_timer(
      monkeypatch, pools, lambda nbytes: -3e-5 + nbytes / 1e9)
  assert fixed == 0.0
  assert bandwidth == pytest.approx(1e9, rel=1e-6)


@pytest.mark.parametrize("seconds", [lambda nbytes: 1e-3, lambda nbytes: 1e-3 - nbytes * 1e-12],
                         ids=["flat", "falling"])
def test_profile_transfers_without_a_rising_cost_has_infinite_bandwidth(monkeypatch, pools,
                                                                        seconds):
  # Catches 1 / slope taken of a zero or negative slope (a ZeroDivisionError, or a
  # negative bandwidth that `transfer_time` refuses).
  (fixed, bandwidth), _ = _fit_over_stubbed_timer(monkeypatch, pools, seconds)
  assert bandwidth == float("inf")
  assert fixed == pytest.approx(1e-3, rel=1e-3)


def test_profile_transfers_of_one_size_is_its_time(monkeypatch, pools):
  (fixed, bandwidth), _ = _fit_over_stubbed_timer(monkeypatch, pools, lambda nbytes: 7e-4,
                                                  page_counts=(4, 4))
  assert (fixed, bandwidth) == (pytest.approx(7e-4), float("inf"))


def test_profile_transfers_and_overlap_between_meshes():
  """One real run of both profilers across two meshes: the copies and the fit run
  end to end. What they measure depends on this machine's load (the fits are
  checked above against a stubbed timer); benchmarks/sim_vs_engine.py prints it."""
  model = pdj.random_model(pdj.get_preset("tiny"), seed=0)
  a, b = sharding.split_devices([1, 2])
  shape = RunnerShape(page_size=8, num_pages=40, max_seq_len=64)
  src, dst = InstanceRunner(model, a, shape), InstanceRunner(model, b, shape)
  fixed, bandwidth = profiler.profile_transfers(src.pool, dst.pool, (1, 2, 4, 8), reps=3)
  assert math.isfinite(fixed) and fixed >= 0 and bandwidth > 0
  factor = profiler.profile_overlap(src, dst)
  assert isinstance(factor, float) and factor >= 1.0
