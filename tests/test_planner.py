"""Tests of the placement planner and the plan / simulate command lines."""

import json
import os
import subprocess
import sys

import pytest

from pdserve_jax import workloads as W
from pdserve_jax.core import deploy
from pdserve_jax.model.config import get_preset
from pdserve_jax.sim import hardware as H
from pdserve_jax.sim import latency as L
from pdserve_jax.sim import planner as P
from pdserve_jax.sim import simulator as sim

ROOT = os.path.join(os.path.dirname(__file__), "..")
CONV = os.path.join(ROOT, "..", "shared", "data", "traces", "splitwise_conv.csv")
SETUP = sim.Setup(get_preset("opt-13b"), H.get_hardware("a100-80gb"),
                  lambda tp, pp: L.distserve_a100("opt-13b", tp, pp))


def _fig1(rate):
  return W.synthetic(200, rate, W.Fixed(512), W.Fixed(64), seed=0)


def _spec(**kw):
  base = dict(setup=SETUP, workload=_fig1, ttft_slo=0.4, tpot_slo=0.04, tp_options=(1, 2),
              pp_options=(1, 2), semi_pd_shares=(0.5, 0.7), tol=0.05)
  base.update(kw)
  return P.PlanSpec(**base)


def test_plan_structure_and_ranking():
  plan = P.plan(_spec())
  evaluated = [c for c in plan.candidates if c.goodput is not None]
  assert evaluated and all(c.goodput > 0 for c in evaluated)
  per_dev = [c.per_device for c in evaluated]
  assert per_dev == sorted(per_dev, reverse=True)
  assert all(c.num_devices <= 8 for c in plan.candidates)
  for mode in deploy.MODES:
    assert plan.best(mode) is not None, mode
  algs = {c.algorithm for c in plan.candidates}
  assert {"alg1-high-affinity", "alg2-low-affinity", "fixed-share", "dynamic",
          "prefill_first", "chunked"} <= algs
  d = json.loads(json.dumps(plan.to_dict()))
  assert set(d) == {"candidates", "best", "phase_goodput_rps", "skipped_configs"}
  assert d["best"]["disaggregated"]["goodput_per_device"] > 0
  assert "per device" in plan.table().splitlines()[0]
  # Figure 1's workload: disaggregation wins per device, as in DistServe.
  assert plan.best("disaggregated").per_device > plan.best(deploy.COLOCATED).per_device


def test_plan_to_target_rate_replicates_each_phase():
  plan = P.plan(_spec(target_rate=12.0, tp_options=(1,), pp_options=(1,)),
                modes=("disaggregated",))
  alg1 = [c for c in plan.candidates if c.algorithm == "alg1-high-affinity"]
  assert alg1
  dep = alg1[0].deployment
  gp, gd = plan.phase_goodput["prefill"]["tp1pp1"], plan.phase_goodput["decode"]["tp1pp1"]
  assert dep.num_prefill * gp >= 12.0 and (dep.num_prefill - 1) * gp < 12.0
  assert dep.num_decode * gd >= 12.0 and (dep.num_decode - 1) * gd < 12.0


def test_plan_bad_inputs():
  with pytest.raises(ValueError, match="SLOs must be positive"):
    P.plan(_spec(ttft_slo=0.0))
  with pytest.raises(ValueError, match="SLOs must be positive"):
    P.plan(_spec(tpot_slo=-1.0))
  with pytest.raises(ValueError, match="unknown mode"):
    P.plan(_spec(), modes=("pipelined",))
  big = sim.Setup(get_preset("opt-175b"), H.get_hardware("a100-40gb"), lambda tp, pp: None)
  with pytest.raises(sim.DoesNotFit, match="no tp x pp config of opt-175b fits"):
    P.plan(_spec(setup=big, tp_options=(1, 2), pp_options=(1,)))
  with pytest.raises(ValueError, match="unknown hardware"):
    H.get_hardware("tpu-v9")
  with pytest.raises(ValueError, match="unknown model preset"):
    get_preset("opt-7b")
  with pytest.raises(ValueError, match="no requests"):
    P.plan(_spec(workload=lambda rate: []))


def test_plan_splitwise_disaggregated_vs_colocated():
  if not os.path.exists(CONV):
    pytest.skip(f"shared trace not found at {CONV}")
  trace = W.load_csv_trace(CONV).filter(2048)
  spec = P.PlanSpec(SETUP, lambda rate: trace.requests(n=300, rate=rate, sample=True, seed=0),
                    ttft_slo=0.25, tpot_slo=0.1, tp_options=(1, 2, 4), pp_options=(1, 2),
                    semi_pd_shares=(0.7, 0.9), tol=0.05)
  plan = P.plan(spec)
  best = {m: plan.best(m) for m in ("disaggregated", "semi_pd")}
  best["colocated"] = plan.best(deploy.COLOCATED)
  assert all(c is not None and c.per_device > 0 for c in best.values())
  assert all(c.num_devices <= 8 for c in plan.candidates)
  # The issue expected disaggregation to win here; with DistServe's A100 figures it
  # cannot. Decode alone at TPOT 0.1 s is bound by KV capacity and leaves compute
  # idle, which colocation fills with prefills while the loose TPOT absorbs the
  # interference. Even with ideal replica ratios, disaggregation's goodput per
  # device is the harmonic combination of the phases' own, and that bound is below
  # what a colocated instance serves.
  best_alone = {ph: max(plan.phase_per_device(ph).values()) for ph in ("prefill", "decode")}
  bound = 1 / (1 / best_alone["prefill"] + 1 / best_alone["decode"])
  assert best["disaggregated"].per_device <= bound * 1.05
  assert bound < best["colocated"].per_device
  ratio = best["disaggregated"].per_device / best["colocated"].per_device
  assert 0.5 < ratio < 1.0


def _run(module, *args):
  return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True,
                        text=True, timeout=120)


def test_command_lines(tmp_path):
  out = tmp_path / "plan.json"
  r = _run("pdserve_jax.cli.plan", "--config=configs/plan_opt13b.py",
           "--config.workload.source=synthetic", "--config.workload.num_requests=100",
           "--config.tp_options=1", "--config.pp_options=1", "--config.max_spread=0",
           "--config.modes=colocated_prefill_first,colocated_chunked", f"--output_json={out}")
  assert r.returncode == 0, r.stderr
  assert "per device" in r.stdout
  best = json.loads(out.read_text())["plan"]["best"]
  assert best["colocated_prefill_first"]["goodput_rps"] > 0
  assert best["colocated_chunked"]["goodput_rps"] > 0
  r = _run("pdserve_jax.cli.simulate", "--config=configs/simulate_distserve_fig1.py",
           "--config.workload.num_requests=100", f"--output_json={tmp_path / 's.json'}")
  assert r.returncode == 0, r.stderr
  assert json.loads((tmp_path / "s.json").read_text())["runs"][0]["summary"][
      "num_finished"] == 100
  r = _run("pdserve_jax.cli.simulate", "--config=configs/simulate_distserve_fig1.py",
           "--config.tpot_slo=0")
  assert r.returncode != 0 and "tpot_slo: must be > 0" in r.stderr
  r = _run("pdserve_jax.cli.simulate", "--config=configs/simulate_distserve_fig1.py",
           "--config.hardware=b200")
  assert r.returncode != 0 and "unknown hardware" in r.stderr
