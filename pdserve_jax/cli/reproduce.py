"""absl app: reproduce the papers' headline figures on the simulator, ours beside theirs.

  python -m pdserve_jax.cli.reproduce                      # every experiment
  python -m pdserve_jax.cli.reproduce --config.experiments=distserve_fig1 \
      --plots_dir=repro_plots --output_json=repro.json

Each experiment is a config file of its own in `configs/reproduce/` (named for
what it runs; see `configs/reproduce.py` for the knobs shared by all). It names a
model, hardware, SLOs, a workload and the systems to compare; each system is a
serving mode on a latency source ("distserve", "vllm" or "roofline", with
DistServe's per-step overheads or none) at a fixed placement, or at the placement
our planner picks for it. For every system the app measures goodput over workload
seeds until the 95% interval of the mean is within `max_spread` of it
(`sim.goodput.over_seeds`), and per device; each ratio between two systems is the
ratio of their means, its interval propagated from theirs. It prints our
number beside the paper's with the ratio and the seeds, and writes attainment vs
rate per system and goodput bars per experiment. Deterministic: the same config
gives the same numbers. No JAX here.

Limits: goodputs are simulated from latency models, not measured on the papers'
hardware; where a model has no published coefficients the roofline model stands
in, and the output says so.
"""

from __future__ import annotations

import importlib.util
import math
import os
import time
from typing import Optional

import ml_collections

from pdserve_jax import workloads
from pdserve_jax.core import deploy
from pdserve_jax.cli import common, deployments, sim_runs
from pdserve_jax.core.share import ShareScaling
from pdserve_jax.sim import goodput as gp
from pdserve_jax.sim import planner
from pdserve_jax.sim import simulator as sim

# Fractions of each system's goodput per device where every system's attainment is
# plotted, so each curve is sampled around its own knee and its rivals'.
CURVE_POINTS = (0.5, 0.8, 1.0, 1.25, 1.6)


def system(label: str, latency: str, mode: str, plan: bool = False, **placement) -> dict:
  """One system of an experiment config: `mode` on `latency` ("distserve", "vllm",
  "roofline"), at the placement our planner picks (`plan=True`) or at a fixed one:
  `tp`, `pp`, `replicas` (colocated, semi-PD), `num_prefill`, `prefill_tp`,
  `prefill_pp`, `num_decode`, `decode_tp`, `decode_pp` (disaggregated),
  `prefill_share`, `decode_share` (0: 1 - prefill_share), `dynamic`, `algorithm`
  ("ours" or "paper"), `concurrent`, `work_conserving`, `prefill_scaling`,
  `decode_scaling` (semi-PD; the scalings are (alpha, beta) of `ShareScaling` or
  "paper"), `page_policy`; and what differs from the experiment's: `overheads`
  (its engine's per-step costs: "none", "distserve", "vllm"), `max_batch`,
  `max_step_tokens`, `chunk` (chunked prefill's token budget)."""
  out = dict(label=label, latency=latency, mode=mode, plan=plan, tp=1, pp=1, replicas=1,
             num_prefill=1, prefill_tp=1, prefill_pp=1, num_decode=1, decode_tp=1,
             decode_pp=1, prefill_share=0.5, decode_share=0.0, dynamic=False,
             algorithm="ours", concurrent=False, work_conserving=False,
             prefill_scaling=(1.0, 0.0), decode_scaling=(1.0, 0.0), page_policy="on_demand",
             overheads="", max_batch=0, max_step_tokens=0, chunk=0)
  unknown = sorted(set(placement) - set(out))
  if unknown:
    raise ValueError(f"unknown system key(s) {unknown}; known: {sorted(out)}")
  out.update(placement)
  return out


def experiment(**kw) -> ml_collections.ConfigDict:
  """An experiment config with the shared defaults (see `configs/reproduce/`)."""
  c = ml_collections.ConfigDict(dict(
      kind="compare", group="", title="", source="", hardware="a100-80gb",
      overheads="distserve", page_size=16,
      memory_utilization=0.9, target=0.9, tol=0.02, num_nodes=1, tp_options=(1, 2, 4, 8),
      pp_options=(1,), max_batch=256, max_step_tokens=4096, chunked_max_step_tokens=512,
      semi_pd_shares=(0.4, 0.5, 0.6, 0.7), paper_per_device={}, ratios={}, notes=""))
  c.update(kw)
  return c


def distserve_panel(model: str, vllm_tp: int, paper: tuple[float, float],
                    roofline: bool = False, **kw) -> ml_collections.ConfigDict:
  """One of DistServe's Figure 8/9 panels: vLLM colocated at `vllm_tp` against
  DistServe at our planner's placement, their ratio per GPU beside the paper's
  `paper` (low, high). `roofline` runs both on the roofline model (a model without
  published coefficients); `kw` goes to `experiment`."""
  tag = " (roofline)" if roofline else ""
  return experiment(
      model=model, source=f"DistServe (arXiv 2401.09670), {kw.pop('figure')}, section 6.2",
      systems=dict(
          vllm=system(f"vLLM, colocated tp{vllm_tp}{tag}", "roofline" if roofline else "vllm",
                      "colocated_prefill_first", tp=vllm_tp),
          distserve=system(f"DistServe, planned{tag}",
                           "roofline" if roofline else "distserve", "disaggregated",
                           plan=True)),
      ratios=dict(distserve_over_vllm=("distserve", "vllm", *paper)), **kw)


def trace_workload(name: str, num_requests: int = 1000):
  """A workload block sampling `../shared/data/traces/<name>.csv`."""
  return workloads.config(source="trace", trace=f"../shared/data/traces/{name}.csv",
                          num_requests=num_requests)


# --- one experiment ----------------------------------------------------------------------


def _experiment_names(folder: str) -> tuple[str, ...]:
  """The experiments in `folder`: its .py files, without the suffix."""
  if not os.path.isdir(folder):
    return ()
  return tuple(sorted(f[:-3] for f in os.listdir(folder)
                      if f.endswith(".py") and not f.startswith("_")))


def _load(name: str, folder: str) -> ml_collections.ConfigDict:
  path = os.path.abspath(os.path.join(folder, f"{name}.py"))
  if not os.path.isfile(path):
    raise common.ConfigError(f"experiments: no experiment {name!r} in {folder} "
                             f"(known: {', '.join(_experiment_names(folder)) or 'none'})")
  spec = importlib.util.spec_from_file_location(f"reproduce_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _setup(exp, s: dict) -> sim.Setup:
  """The simulator's Setup of system `s` (its latency source and engine costs), as
  every app builds it (`cli.sim_runs.setup`, checks and messages included)."""
  cfg = ml_collections.ConfigDict({k: exp[k] for k in (
      "model", "hardware", "page_size", "memory_utilization", "overheads")})
  cfg.latency = s["latency"]
  cfg.overheads = s.get("overheads") or exp.overheads
  return sim_runs.setup(cfg)


def _limits(exp, s: dict) -> dict:
  """The batch limits of system `s`: its own where it sets them, else the experiment's."""
  return dict(max_batch=s.get("max_batch") or exp.max_batch,
              max_step_tokens=s.get("max_step_tokens") or exp.max_step_tokens,
              chunked_max_step_tokens=s.get("chunk") or exp.chunked_max_step_tokens)


def _fixed(exp, s: dict):
  """A system's fixed placement, through the same blocks as every app."""
  cfg = ml_collections.ConfigDict(deployments.blocks(
      instance=dict(tp=s["tp"], pp=s["pp"], replicas=s["replicas"], **_limits(exp, s),
                    page_policy=s["page_policy"]),
      disaggregated={k: s[k] for k in ("num_prefill", "prefill_tp", "prefill_pp",
                                       "num_decode", "decode_tp", "decode_pp")},
      semi_pd={k: s[k] for k in ("prefill_share", "decode_share", "dynamic", "algorithm",
                                 "concurrent", "work_conserving", "prefill_scaling",
                                 "decode_scaling")}))
  cfg.ttft_slo, cfg.tpot_slo = exp.ttft_slo, exp.tpot_slo
  return deployments.deployment(cfg, s["mode"])


def _planned(exp, s: dict, setup: sim.Setup, make):
  """The placement our planner picks for the system's mode (one seed's search)."""
  spec = planner.PlanSpec(
      setup, lambda rate: make(rate, 0), exp.ttft_slo, exp.tpot_slo, num_nodes=exp.num_nodes,
      tp_options=tuple(exp.tp_options), pp_options=tuple(exp.pp_options),
      **_limits(exp, s), target=exp.target, tol=exp.tol,
      semi_pd_shares=tuple(exp.semi_pd_shares), semi_pd_concurrent=s["concurrent"],
      semi_pd_scaling=(ShareScaling(*s["prefill_scaling"]), ShareScaling(*s["decode_scaling"])),
      page_policy=s["page_policy"])
  best = planner.plan(spec, (s["mode"],)).best()
  if best is None:
    raise ValueError(f"{s['label']}: no {s['mode']} placement meets the SLOs")
  return best.deployment


def _kv_tokens_per_device(setup: sim.Setup, dep) -> float:
  """KV-cache tokens the placement holds per device (semi-PD's unified storage keeps
  one weight copy per instance; disaggregated instances each hold their own)."""
  if isinstance(dep, deploy.Disaggregated):
    groups = [(dep.prefill, dep.num_prefill), (dep.decode, dep.num_decode)]
  else:
    groups = [(dep.instance, dep.replicas)]
  tokens = sum(n * sim.kv_capacity_tokens(setup, i.tp, i.pp) for i, n in groups)
  return tokens / dep.num_devices


def _ratio(a: gp.Estimate, b: gp.Estimate) -> dict:
  """mean(a) / mean(b), with the 95% half-width of the ratio from the two intervals
  (first-order error propagation); None where b's mean is 0."""
  if not b.mean > 0:
    return dict(mean=None, half_width_95=None, spread=None)
  r = a.mean / b.mean
  rel = math.hypot(a.half_width / a.mean if a.mean > 0 else 0.0, b.half_width / b.mean)
  return dict(mean=r, half_width_95=r * rel, spread=rel)


def run_experiment(exp, seeds: dict, num_requests: int = 0, curve_seeds: int = 3,
                   progress=lambda msg: None, cache: Optional[dict] = None) -> dict:
  """Runs one experiment config; a JSON-ready record (see `result_schema.json`).

  `seeds` holds `min_seeds`, `max_seeds` and `max_spread` (`goodput.over_seeds`);
  `num_requests` (if > 0) overrides the workload's sample size; `curve_seeds`
  seeds are averaged per point of the attainment curves (0: none). `cache` keeps
  goodputs by everything that sets them, for experiments that share systems."""
  w = ml_collections.ConfigDict(exp.workload.to_dict())
  if num_requests:
    w.num_requests = num_requests
  from pdserve_jax.model.config import get_preset

  make = workloads.from_config(w, get_preset(exp.model).max_position_embeddings)
  systems, per_device, placed = {}, {}, {}
  for key, s in exp.systems.items():
    s = s.to_dict()
    progress(f"{exp.name}: {s['label']}")
    setup = _setup(exp, s)
    dep = _planned(exp, s, setup, make) if s["plan"] else _fixed(exp, s)
    what = repr((exp.model, exp.hardware, exp.page_size, exp.memory_utilization,
                 s["latency"], s.get("overheads") or exp.overheads, dep, w.to_dict(),
                 exp.ttft_slo, exp.tpot_slo, exp.target, exp.tol, sorted(seeds.items())))
    if cache is not None and what in cache:
      est = cache[what]
    else:
      est = gp.goodput_over_seeds(make, setup, dep, exp.ttft_slo, exp.tpot_slo, exp.target,
                                  exp.tol, **seeds)
      if cache is not None:
        cache[what] = est
    per_device[key] = est.scaled(1 / dep.num_devices)
    paper = exp.paper_per_device.get(key)
    systems[key] = dict(
        label=s["label"], mode=dep.mode, latency=s["latency"],
        overheads=s.get("overheads") or exp.overheads,
        placement=dep.describe(), planned=s["plan"], num_devices=dep.num_devices,
        kv_tokens_per_device=_kv_tokens_per_device(setup, dep), goodput_rps=est.to_dict(),
        per_device=per_device[key].to_dict(), paper_per_device=paper,
        ours_over_paper=None if paper is None else per_device[key].mean / paper)
    placed[key] = (setup, dep)
  ratios = {}
  for name, (num, den, lo, hi) in exp.ratios.items():
    r = _ratio(per_device[num], per_device[den])
    ratios[name] = dict(numerator=num, denominator=den, ours=r, paper=[lo, hi],
                        within_paper=r["mean"] is not None and lo <= r["mean"] <= hi)
  curves = _curves(exp, placed, per_device, make, curve_seeds)
  return dict(name=exp.name, group=exp.get("group", ""), title=exp.title, source=exp.source,
              model=exp.model, hardware=exp.hardware, overheads=exp.overheads,
              ttft_slo=exp.ttft_slo, tpot_slo=exp.tpot_slo, target=exp.target,
              num_requests=w.num_requests, max_spread=seeds["max_spread"], systems=systems,
              ratios=ratios, curves=curves, notes=exp.notes)


def _curves(exp, placed, per_device, make, curve_seeds) -> dict:
  """Attainment (mean over `curve_seeds` seeds) at rates per device around each
  system's goodput, DistServe's Figure 8 axes."""
  if not curve_seeds:
    return {}
  rates = sorted({round(e.mean * f, 6) for e in per_device.values() for f in CURVE_POINTS
                  if e.mean > 0})
  out = {}
  for key, (setup, dep) in placed.items():
    atts = []
    for r in rates:
      vals = []
      for seed in range(curve_seeds):
        res = sim.simulate(make(r * dep.num_devices, seed), setup, dep, exp.ttft_slo,
                           exp.tpot_slo)
        vals.append(res.attainment(exp.ttft_slo, exp.tpot_slo))
      atts.append(sum(vals) / len(vals))
    out[key] = dict(rates_per_device=rates, attainment=atts)
  return out


# --- the app -----------------------------------------------------------------------------


def _fmt(v, digits=2) -> str:
  return "-" if v is None else f"{v:.{digits}f}"


def report(rec: dict) -> str:
  """One experiment's table: per system, ours beside the paper's; then the ratios."""
  lines = [f"== {rec['name']}: {rec['title']}", f"   {rec['source']}",
           f"   {rec['model']} on {rec['hardware']}, SLOs TTFT {rec['ttft_slo']} s / TPOT "
           f"{rec['tpot_slo']} s at {rec['target']:.0%}, {rec['num_requests']} requests per "
           f"seed, overheads: {rec['overheads']}",
           f"   {'system':<34}{'latency':<10}{'placement':<64}{'GPUs':>5}{'req/s/GPU':>11}"
           f"{'± 95%':>8}{'seeds':>6}{'paper':>7}{'ours/paper':>11}{'KV tok/GPU':>11}"]
  for s in rec["systems"].values():
    d = s["per_device"]
    lines.append(f"   {s['label']:<34}{s['latency']:<10}{s['placement']:<64}"
                 f"{s['num_devices']:>5}{d['mean']:>11.2f}{d['half_width_95']:>8.2f}"
                 f"{d['num_seeds']:>6}{_fmt(s['paper_per_device']):>7}"
                 f"{_fmt(s['ours_over_paper']):>11}{s['kv_tokens_per_device']:>11.0f}")
  for r in rec["ratios"].values():
    o, (lo, hi) = r["ours"], r["paper"]
    paper = f"{lo:.2f}" if lo == hi else f"{lo:.2f}-{hi:.2f}"
    head = f"   ratio {r['numerator']} / {r['denominator']} (per GPU): ours "
    if o["mean"] is None:
      lines.append(head + f"undefined ({r['denominator']} has no goodput), paper {paper}")
      continue
    lines.append(head + f"{o['mean']:.2f} ± {o['half_width_95']:.2f}, paper {paper}"
                 + (f", ours/paper {o['mean'] / lo:.2f}" if lo == hi else
                    (", within the paper's range" if r["within_paper"]
                     else ", outside the paper's range")))
  wide = [s["label"] for s in rec["systems"].values()
          if s["per_device"]["spread"] is None or s["per_device"]["spread"] > rec["max_spread"]]
  if wide:
    lines.append(f"   spread above {rec['max_spread']:.0%} after the most seeds allowed: "
                 + ", ".join(wide))
  if rec["notes"]:
    lines.append(f"   note: {rec['notes']}")
  return "\n".join(lines)


def plots(rec: dict, folder: str) -> list[str]:
  """Attainment vs rate per system and goodput bars with 95% intervals."""
  from pdserve_jax import plots as P

  name = rec["name"]
  series = {s["label"]: (rec["curves"][k]["rates_per_device"], rec["curves"][k]["attainment"])
            for k, s in rec["systems"].items() if rec["curves"][k]["rates_per_device"]}
  out = []
  if series:
    out.append(P.attainment_vs_rate(series, os.path.join(folder, f"{name}_attainment.png"),
                                    title=rec["title"], target=rec["target"],
                                    xlabel="arrival rate per GPU (req/s/GPU)"))
  rows = [(f"{s['label']}: {s['placement']}", s["per_device"]["mean"],
           s["per_device"]["half_width_95"]) for s in rec["systems"].values()]
  out.append(P.planner_goodput(rows, os.path.join(folder, f"{name}_goodput.png"),
                               title=rec["title"], highlight_best=False))
  return out


def main(cfg, out: common.Outputs):
  start = time.perf_counter()
  common.check(cfg, {"min_seeds": common.at_least(1), "max_seeds": common.at_least(1),
                     "max_spread": common.positive, "num_requests": common.at_least(0),
                     "curve_seeds": common.at_least(1)})
  names = common.names("experiments", cfg.experiments)
  folder = cfg.experiments_dir
  if names == ("all",):
    if not os.path.isdir(folder):
      raise common.ConfigError(f"experiments_dir: no such folder {folder!r}")
    names = _experiment_names(folder)
  exps = [_load(n, folder) for n in names]
  for n, e in zip(names, exps):
    e.name = n
  all_seeds = dict(min_seeds=cfg.min_seeds, max_seeds=max(cfg.min_seeds, cfg.max_seeds),
                   max_spread=cfg.max_spread)
  from pdserve_jax.cli import repro_semipd as semipd

  records, ablations, memory, written, cache = [], [], [], [], {}
  with common.progress(len(exps), "experiments", "exp") as bar:
    for e in exps:
      note = lambda m: bar.set_postfix_str(m, refresh=True)
      kind = e.get("kind", "compare")
      if e.get("max_seeds"):  # an experiment may cap the seeds (its systems are many)
        seeds = dict(all_seeds, max_seeds=max(cfg.min_seeds, min(all_seeds["max_seeds"],
                                                                 e.max_seeds)))
      else:
        seeds = all_seeds
      try:
        if kind == "ablation":
          rec = semipd.run_ablation(e, seeds, cfg.num_requests, note, cache)
          ablations.append(rec)
          text = semipd.report_ablation(rec)
        elif kind == "memory":
          rec = semipd.run_memory(e, cfg.num_requests, cfg.curve_seeds, note)
          memory.append(rec)
          text = semipd.report_memory(rec)
        else:
          rec = run_experiment(e, seeds, cfg.num_requests, cfg.curve_seeds, note, cache)
          records.append(rec)
          text = report(rec)
          if out.plots_dir:
            written += plots(rec, out.plots_dir)
      except FileNotFoundError as err:
        raise common.ConfigError(f"{e.name}: {err}") from None
      print(text, flush=True)
      print()
      bar.update(1)
  summary = semipd.summary(records)
  if summary:
    print(summary + "\n")
  print(f"reproduce took {time.perf_counter() - start:.1f} s")
  common.save("reproduce", cfg, out, [], written, start, reproduce=dict(
      experiments=records, ablations=ablations, memory_pressure=memory))

if __name__ == "__main__":
  common.run(main, "reproduce")
