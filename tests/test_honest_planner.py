"""The planner says what it did: rows a trace lost to the context (and refuses when
most are lost), placements whose intervals tie with the best's (after more seeds),
and why a placement was pruned."""

import os
import subprocess
import sys

import pytest

from pdserve_jax import workloads as W
from pdserve_jax.core import deploy
from pdserve_jax.sim import goodput as search
from pdserve_jax.sim import planner as P

ROOT = os.path.join(os.path.dirname(__file__), "..")


def _trace(tmp_path, rows, name="t.csv"):
  path = tmp_path / name
  path.write_text("num_prefill_tokens,num_decode_tokens\n"
                  + "".join(f"{p},{o}\n" for p, o in rows))
  return str(path)


def test_trace_rows_beyond_the_context_are_counted_and_most_refused(tmp_path):
  """Catches a workload that silently keeps only the short rows: 3 of 10 rows do
  not fit OPT's 2,048 tokens, so the kept mean prompt falls from 1,550 to 500."""
  rows = [(500, 100)] * 7 + [(4000, 100)] * 3
  w = W.config(source="trace", trace=_trace(tmp_path, rows), num_requests=20)
  fit = W.from_config(w, 2048).fit
  assert (fit.rows, fit.kept, fit.clipped, fit.dropped) == (10, 7, 0, 3)
  assert fit.mean_prompt_before == pytest.approx(1550) and fit.mean_prompt == 500
  assert "10 rows; 7 kept, 0 clipped, 3 dropped by the 2,048-token context" in fit.describe()
  assert "mean prompt 500 tokens (before 1,550)" in fit.describe()
  clip = W.from_config(W.config(source="trace", trace=w.trace, too_long="clip"), 2048)
  assert (clip.fit.kept, clip.fit.clipped, clip.fit.dropped) == (7, 3, 0)
  assert max(r.prompt_len + r.max_tokens for r in clip(1.0)) <= 2048
  most = W.config(source="trace", trace=_trace(tmp_path, rows[:3] + rows[-3:] * 2, "m.csv"))
  with pytest.raises(ValueError, match=r"6 of 9 rows .* \(67%\) do not fit the 2,048-token "
                     r"context.*workload.too_long=clip.*allow_dropping_most=True"):
    W.from_config(most, 2048)
  most.allow_dropping_most = True
  assert W.from_config(most, 2048).fit.kept == 3


def test_plan_app_prints_what_the_context_dropped_and_refuses_most(tmp_path):
  trace = _trace(tmp_path, [(500, 100)] * 7 + [(4000, 100)] * 3)
  args = ["--config=configs/plan_opt13b.py", f"--config.workload.trace={trace}",
          "--config.workload.num_requests=60", "--config.tp_options=1",
          "--config.pp_options=1", "--config.max_spread=0",
          "--config.modes=colocated_prefill_first"]
  run = lambda *extra: subprocess.run([sys.executable, "-m", "pdserve_jax.cli.plan", *args,
                                       *extra], cwd=ROOT, capture_output=True, text=True,
                                      timeout=300)
  r = run()
  assert r.returncode == 0, r.stderr
  first = r.stdout.splitlines()[0]
  assert first.startswith("workload: ") and "7 kept, 0 clipped, 3 dropped" in first
  r = run("--config.workload.max_total_tokens=400")  # now no row fits
  assert r.returncode == 1 and "workload.trace: no row" in r.stderr
  assert "Traceback" not in r.stderr


class _Fake:
  """A stand-in for the simulated goodput of each placement, the same every seed."""

  def __init__(self, values):
    self.values, self.calls = values, []

  def __call__(self, make, setup, dep, *a, **kw):
    self.calls.append(dep)
    return self.values[dep]


def _cand(dep, values):
  est = search.Estimate(tuple(values), tuple(range(len(values))))
  return P.Candidate(dep.mode, "fixed", dep, dep.num_devices, est.mean, 100.0, measured=True,
                     estimate=est)


def test_overlapping_placements_get_more_seeds_then_are_reported_tied(monkeypatch):
  """Catches a planner that prints one winner out of a statistical tie: after 3
  seeds B and C overlap the best, A. Two more seeds separate B (it stops at 5);
  C stays level with A, so both go to max_tie_seeds and are reported tied."""
  a, b, c = (deploy.Colocated(deploy.InstanceSpec(max_batch=m)) for m in (64, 128, 256))
  fake = _Fake({a: 10.5, b: 9.5, c: 10.49})
  monkeypatch.setattr(P.search, "goodput", fake)
  spec = P.PlanSpec(setup=None, workload=lambda rate, seed=0: [], ttft_slo=1.0, tpot_slo=1.0,
                    max_spread=0.05, max_seeds=4, max_tie_seeds=6)
  pruned = P.Candidate("colocated_chunked", "chunked", a, 1, None, 3.0,
                       "misses the SLOs at the best rate", measured=True)
  cands = [_cand(b, (9.0, 9.5, 10.0)), _cand(a, (10.0, 10.5, 11.0)),
           _cand(c, (10.4, 10.6, 10.5)), pruned]
  tied = P._rank(spec, cands)
  assert [x.deployment for x in tied] == [a, c]
  assert [len(x.estimate.seeds) for x in cands[:3]] == [6, 6, 5]
  assert cands[2].deployment == b and not cands[2].overlaps_best
  plan = P.Plan(cands, {}, {}, {}, tied)
  text = plan.table()
  assert "tied: 2 placements' 95% intervals overlap the best's after up to 6 seeds" in text
  assert a.describe() in plan.tie_message() and c.describe() in plan.tie_message()
  # The pruned placement says why, and its number is labelled a capacity.
  assert "(misses the SLOs at the best rate; measured capacity 3.00/device)" in text
  assert "<3.00" not in text
  assert plan.to_dict()["tied"] == [x.describe() for x in tied]


def test_no_tie_no_extra_seeds(monkeypatch):
  fake = _Fake({})
  monkeypatch.setattr(P.search, "goodput", fake)
  a, b = (deploy.Colocated(deploy.InstanceSpec(max_batch=m)) for m in (64, 128))
  spec = P.PlanSpec(setup=None, workload=lambda rate, seed=0: [], ttft_slo=1.0, tpot_slo=1.0,
                    max_spread=0.05)
  cands = [_cand(b, (5.0, 5.1, 4.9)), _cand(a, (10.0, 10.1, 9.9))]
  assert P._rank(spec, cands) == [] and fake.calls == []
  assert cands[0].deployment == a and not cands[1].overlaps_best
