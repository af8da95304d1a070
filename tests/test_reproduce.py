"""Paper reproductions: DistServe's overheads and vLLM coefficients, goodput over
seeds, the planner's ranking by the mean, and the `reproduce` app.

The app's numbers are not asserted (they are what the simulator gives); what is
checked is their structure, that every experiment config builds, and that a rerun
with the same seeds gives the same numbers.
"""

import glob
import json
import math
import os
import subprocess
import sys

import pytest

from pdserve_jax import results, workloads
from pdserve_jax.core import deploy, share
from pdserve_jax.model.config import get_preset
from pdserve_jax.core.request import Request
from pdserve_jax.core.step import PrefillChunk, Step
from pdserve_jax.sim import goodput as gp
from pdserve_jax.sim import hardware, latency as L, planner
from pdserve_jax.sim import simulator as sim

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "..", "shared", "data", "distserve")
OPT13, A100 = get_preset("opt-13b"), hardware.get_hardware("a100-80gb")
EXPERIMENTS = sorted(glob.glob(os.path.join(ROOT, "configs", "reproduce", "*.py")))


def _request(prompt, out=8, rid=0):
  return Request(rid, prompt_len=prompt, max_tokens=out, arrival_time=0.0)


def test_distserve_overheads_add_their_cited_costs():
  base = L.distserve_a100("opt-13b", 1, 2)
  with_ = L.latency_source("distserve", OPT13, A100, overheads="distserve")(1, 2)
  assert isinstance(with_, L.WithOverheads) and with_.pp == 2
  # Decode: 2 ms + 1e-4 ms per context token; no per-stage cost.
  assert with_.decode_totals(10, 5000) == pytest.approx(
      base.decode_totals(10, 5000) + 2e-3 + 5000 * 1e-7)
  # A prefill step: also 1 ms per pipeline stage; the context of a chunk is its end.
  a, b = _request(300, rid=1), _request(500, rid=2)
  step = Step(prefills=[PrefillChunk(a, 0, 300), PrefillChunk(b, 200, 500)])
  assert with_.step_time(step) == pytest.approx(
      base.step_time(step) + 2e-3 + (300 + 500) * 1e-7 + 2 * 1e-3)
  assert L.latency_source("distserve", OPT13, A100)(1, 1) == L.distserve_a100("opt-13b")
  with pytest.raises(ValueError, match="unknown overheads 'ray'"):
    L.latency_source("distserve", OPT13, A100, overheads="ray")
  with pytest.raises(ValueError, match="per_step_s must be a number >= 0"):
    L.StepOverheads(per_step_s=-1.0)


@pytest.mark.skipif(not os.path.isdir(DATA), reason="../shared/data is absent")
@pytest.mark.parametrize("system", L.A100_SYSTEMS)
def test_coefficient_presets_equal_distserve_files(system):
  path = os.path.join(DATA, f"profiler-a100-80g.{system}.json")
  with open(path) as f:
    data = json.load(f)
  for model, by_tp in data.items():
    for tp in by_tp:
      want = L.load_distserve_json(path, model, int(tp), pp=2)
      assert L.distserve_a100(model, int(tp), 2, system=system) == want
  assert L.distserve_a100("opt-13b", system="vllm") != L.distserve_a100("opt-13b")
  with pytest.raises(ValueError, match="system must be one of"):
    L.distserve_a100("opt-13b", system="sglang")


def test_estimate_statistics():
  e = gp.Estimate((1.0, 2.0, 3.0), (0, 1, 2))
  assert e.mean == 2.0 and e.std == 1.0
  assert e.half_width == pytest.approx(4.303 / math.sqrt(3))  # t(0.975, 2 dof)
  assert e.spread == pytest.approx(e.half_width / 2.0)
  assert e.overlaps(gp.Estimate((4.0, 4.5, 5.0), (0, 1, 2)))
  assert not e.overlaps(gp.Estimate((9.0, 9.1, 9.2), (0, 1, 2)))
  assert gp.Estimate((5.0,), (0,)).spread == math.inf
  assert e.scaled(0.5).values == (0.5, 1.0, 1.5)


def test_over_seeds_stops_at_the_spread_or_the_cap():
  flat = gp.over_seeds(lambda seed: 4.0, min_seeds=3, max_seeds=10)
  assert flat.seeds == (0, 1, 2) and flat.spread == 0.0
  noisy = lambda seed: 10.0 + (3.0 if seed % 2 else -3.0)
  capped = gp.over_seeds(noisy, min_seeds=2, max_seeds=7, max_spread=0.01)
  assert capped.seeds == tuple(range(7)) and capped.spread > 0.01
  loose = gp.over_seeds(noisy, min_seeds=2, max_seeds=40, max_spread=0.2)
  assert loose.spread <= 0.2 and len(loose.seeds) < 40
  assert gp.over_seeds(noisy, first_seed=5, min_seeds=4, max_spread=None).seeds == (5, 6, 7, 8)
  with pytest.raises(ValueError, match="min_seeds"):
    gp.over_seeds(noisy, min_seeds=0)


def _make(rate, seed=0):
  return workloads.synthetic(120, rate, workloads.Uniform(64, 512), workloads.Uniform(8, 64),
                             seed=seed)


def test_goodput_over_seeds_repeats_and_moves_with_the_seed():
  setup = sim.Setup(OPT13, A100, L.latency_source("vllm", OPT13, A100, overheads="distserve"))
  dep = deploy.Colocated()
  kw = dict(min_seeds=3, max_seeds=3)
  a = gp.goodput_over_seeds(_make, setup, dep, 0.25, 0.1, **kw)
  b = gp.goodput_over_seeds(_make, setup, dep, 0.25, 0.1, **kw)
  assert a == b and a.seeds == (0, 1, 2) and a.mean > 0
  assert len(set(a.values)) > 1  # different requests, different goodputs
  assert a.values[0] == gp.goodput(lambda r: _make(r, 0), setup, dep, 0.25, 0.1)


def test_planner_ranks_by_the_mean_and_marks_overlaps():
  setup = sim.Setup(OPT13, A100, L.latency_source("distserve", OPT13, A100))
  spec = planner.PlanSpec(setup, _make, 0.25, 0.1, tp_options=(1, 2), pp_options=(1,),
                          semi_pd_shares=(0.5,), max_spread=0.05, min_seeds=3, max_seeds=4)
  plan = planner.plan(spec, ("colocated_prefill_first", "colocated_chunked", "semi_pd"))
  kept = [c for c in plan.candidates if c.goodput is not None]
  assert kept and all(c.estimate is not None for c in kept)
  for c in kept:
    # Up to max_seeds, or twice that for one tied with the best (seeds added to rank).
    assert c.goodput == c.estimate.mean and 3 <= len(c.estimate.seeds) <= 8
  per = [c.per_device for c in kept]
  assert per == sorted(per, reverse=True)
  top = kept[0].estimate.scaled(1 / kept[0].num_devices)
  for c in kept[1:]:
    assert c.overlaps_best == c.estimate.scaled(1 / c.num_devices).overlaps(top)
  assert not kept[0].overlaps_best
  assert "± (95%)" in plan.table()


@pytest.mark.parametrize("path", EXPERIMENTS, ids=os.path.basename)
def test_every_experiment_config_builds(path):
  import ml_collections

  from pdserve_jax.cli import reproduce

  exp = reproduce._load(os.path.basename(path)[:-3], os.path.dirname(path))
  assert exp.title and exp.source and exp.notes
  if exp.kind == "ablation":  # each step is an experiment of its own
    assert len(exp.steps) >= 2
    for step in exp.steps:
      step = dict(step)
      assert step.pop("label")
      _check_experiment(reproduce, ml_collections.ConfigDict(step), paper_ratios=False)
    return
  _check_experiment(reproduce, exp)


def _check_experiment(reproduce, exp, paper_ratios=True):
  assert exp.systems
  for name, (num, den, lo, hi) in exp.ratios.items():
    assert num in exp.systems and den in exp.systems and lo <= hi, name
    assert lo > 0 or not paper_ratios, name
  for key in exp.paper_per_device:
    assert key in exp.systems
  for s in exp.systems.values():
    s = s.to_dict()
    setup = reproduce._setup(exp, s)
    if s["plan"]:  # some parallelism the planner may try has a latency model
      tried = [(tp, pp) for tp in exp.tp_options for pp in exp.pp_options]
      assert any(_has_latency(setup, tp, pp) for tp, pp in tried), s["label"]
    else:
      dep = reproduce._fixed(exp, s)
      insts = [dep.prefill, dep.decode] if hasattr(dep, "prefill") else [dep.instance]
      assert all(_has_latency(setup, i.tp, i.pp) for i in insts), s["label"]


def _has_latency(setup, tp, pp) -> bool:
  try:
    setup.latency(tp, pp)
    return True
  except ValueError:
    return False


def _reproduce(tmp_path, name, *extra):
  out = tmp_path / f"{name}.json"
  proc = subprocess.run(
      [sys.executable, "-m", "pdserve_jax.cli.reproduce", f"--output_json={out}",
       f"--plots_dir={tmp_path / 'plots'}", "--config.num_requests=150", "--config.min_seeds=2",
       "--config.max_seeds=3", "--config.curve_seeds=1", *extra],
      cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr
  return proc.stdout, json.loads(out.read_text())


def test_reproduce_app_reports_and_repeats(tmp_path):
  names = "distserve_fig1,distserve_summarization_opt66b"
  args = (f"--config.experiments={names}", "--config.max_spread=0.03")
  text, doc = _reproduce(tmp_path, "a", *args)
  import jsonschema

  jsonschema.validate(doc, results.schema())
  assert doc["app"] == "reproduce" and doc["runs"] == []
  exps = doc["reproduce"]["experiments"]
  assert [e["name"] for e in exps] == names.split(",")
  fig1 = exps[0]
  assert fig1["systems"]["vllm"]["paper_per_device"] == 1.6
  assert fig1["systems"]["distserve"]["placement"] == "2x prefill tp1pp1 + 1x decode tp1pp1"
  assert fig1["systems"]["vllm"]["latency"] == "vllm" and fig1["overheads"] == "distserve"
  for e in exps:
    assert e["num_requests"] == 150
    for s in e["systems"].values():
      est = s["per_device"]
      assert 2 <= est["num_seeds"] <= 3 and est["seeds"] == list(range(est["num_seeds"]))
      assert est["mean"] == pytest.approx(s["goodput_rps"]["mean"] / s["num_devices"])
      curve = e["curves"]
      assert all(len(c["rates_per_device"]) == len(c["attainment"]) > 0 for c in curve.values())
    for r in e["ratios"].values():
      means = [e["systems"][r[k]]["per_device"]["mean"] for k in ("numerator", "denominator")]
      assert r["ours"]["mean"] == pytest.approx(means[0] / means[1])
  assert exps[1]["systems"]["distserve"]["planned"]
  assert "paper 2.06" in text and "ours/paper" in text
  assert sorted(os.path.basename(p) for p in doc["plots"]) == sorted(
      f"{n}_{k}.png" for n in names.split(",") for k in ("attainment", "goodput"))
  # Same seeds, same numbers.
  _, again = _reproduce(tmp_path, "b", *args)
  assert again["reproduce"] == doc["reproduce"]


def test_reproduce_app_names_a_bad_experiment(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "pdserve_jax.cli.reproduce",
                         "--config.experiments=distserve_fig2"], cwd=ROOT, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 1
  assert "no experiment 'distserve_fig2'" in proc.stderr and "distserve_fig1" in proc.stderr
  assert "Traceback" not in proc.stderr


# --- semi-PD as its paper ran it ----------------------------------------------------------


def test_vllm_overheads_cost_per_step_and_per_request():
  """vLLM's preset adds 6.1 ms a step and 0.035 ms a request (the cited
  measurement); a model that ignored the batch's requests would miss the second."""
  llama = get_preset("llama3-8b")
  base = L.latency_source("roofline", llama, A100)(1, 1)
  with_ = L.latency_source("roofline", llama, A100, overheads="vllm")(1, 1)
  assert with_.decode_totals(100, 50_000) == pytest.approx(
      base.decode_totals(100, 50_000) + 6.1e-3 + 100 * 3.5e-5)
  reqs = [_request(100, rid=i) for i in range(3)]
  step = Step(prefills=[PrefillChunk(r, 0, 100) for r in reqs])
  assert with_.step_time(step) == pytest.approx(base.step_time(step) + 6.1e-3 + 3 * 3.5e-5)


def test_semipd_panels_run_each_baseline_as_the_paper_did():
  """Catches a panel that drifts from the paper's setup: Table 2's SLOs, one GPU per
  8B instance and TP=4 for 70B, DistServe 1P1D, max batch 512, chunk 1,024, each
  engine's costs, semi-PD at caps (100, 100) on the paper's curves."""
  from pdserve_jax.cli import repro_semipd as R, reproduce

  exp = R.panel("llama3-70b", "longbench", "tight")
  exp.name = "p"
  assert (exp.ttft_slo, exp.tpot_slo) == (6.0, 0.3) and exp.group == "semipd"
  deps = {k: reproduce._fixed(exp, s.to_dict()) for k, s in exp.systems.items()}
  assert deps["distserve"].describe() == "1x prefill tp4pp1 + 1x decode tp4pp1"
  assert deps["vllm_s"].instance.max_step_tokens == 1024
  assert all(d.instance.max_batch == 512 for k, d in deps.items() if k != "distserve")
  assert deps["semipd_100"].caps == (1.0, 1.0) and deps["semipd_100"].concurrent
  assert deps["semipd_100"].decode_scaling == share.PAPER_DECODE_STEP
  assert isinstance(deps["semipd_dyn"].partitioner, share.ModelPartitionerConfig)
  overheads = {k: s.overheads for k, s in exp.systems.items()}
  assert overheads == dict(vllm_d="vllm", vllm_s="vllm", distserve="distserve",
                           semipd_100="distserve", semipd_dyn="distserve")
  assert {r[1]: r[2] for r in exp.ratios.values()} == R.PAPER_AVERAGE
  w = workloads.from_config(exp.workload, 8192)
  assert max(r.prompt_len for r in w(1.0)) <= 7500  # LongBench's cut for 8k models


def test_semipd_summary_averages_panels_beside_the_paper():
  from pdserve_jax.cli import repro_semipd as R

  def rec(ratio):
    ours = dict(mean=ratio, half_width_95=0.1, spread=0.1 / ratio)
    return dict(group="semipd", ratios={f"dynamic_over_{k}": dict(ours=ours)
                                        for k in R.PAPER_AVERAGE})
  text = R.summary([rec(1.0), rec(2.0), dict(group="", ratios={})])
  line = next(l for l in text.splitlines() if l.strip().startswith("vLLM-D"))
  assert line.split() == ["vLLM-D", "1.50", "0.07", "1.00-2.00", "1.72", "0.87"]
  assert "mean over 2 panel(s)" in text and R.summary([]) == ""


def test_semipd_ablation_and_memory_scenario_report(tmp_path):
  """A short run of the ablation (two steps) and of the memory scenario: the table
  attributes the change between steps and the remaining gap; on a 40 GB card the
  disaggregated decode pool fills, preempting and recomputing, where unbounded
  memory does not."""
  import ml_collections

  from pdserve_jax.cli import repro_semipd as R

  abl = R.ablation(num_requests=60)
  abl.steps = abl.steps[2:4]
  abl.name = "a"
  seeds = dict(min_seeds=1, max_seeds=1, max_spread=0.05)
  rec = R.run_ablation(abl, seeds, 0, lambda m: None, {})
  row0, row1 = rec["steps"]
  for k in R.ABLATION_RATIOS:
    den = k.split("over_")[1]
    assert row0["ratios"][k]["mean"] == pytest.approx(
        row0["per_device"]["semi"] / row0["per_device"][den])
  assert row1["per_device"]["vllm_d"] == row0["per_device"]["vllm_d"]  # same system, cached
  text = R.report_ablation(rec)
  assert "change" in text and "remaining gap (paper - last step)" in text
  assert text.count("\n   paper (average over its panels)") == 1

  mem = R.memory(num_requests=800)
  mem.name = "m"
  mem.rates_per_device = (4.0, 16.0)
  mem.systems = ml_collections.ConfigDict({"distserve": mem.systems.distserve.to_dict()})
  out = R.run_memory(mem, 0, 1, lambda m: None)
  low, high = out["systems"]["distserve"]["rows"]
  assert low["preemptions"] == 0 and low["tpot_p90_s"] == pytest.approx(low["tpot_p90_ideal_s"])
  assert high["peak_kv"] > 0.99 and high["preemptions"] > 0 and high["recomputed_tokens"] > 0
  assert high["tpot_p90_s"] > high["tpot_p90_ideal_s"]
  assert "ideal" in R.report_memory(out)
