"""The apps' PNGs, drawn by `pdserve_jax.plots` from result runs (`results.run_record`).

Curves are labelled "<mode> (engine)" or "<mode> (sim)", so a mode's two curves
share a colour. No plotting code here: only picking what each figure shows.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence


def label(run: dict) -> str:
  return f"{run['mode']} ({'sim' if run['executor'] == 'simulator' else 'engine'})"


def write(plots_dir: str, runs: Sequence[dict], ttft_slo: float, tpot_slo: float,
          title: str = "", target: Optional[float] = None,
          planner_rows: Sequence[tuple] = (), cdf_per_rate: bool = False) -> list[str]:
  """Every figure `runs` (and the planner's `planner_rows`) make; returns the paths.

  Attainment vs rate when a mode ran at more than one rate (the mean over seeds
  where several ran at a rate); TTFT/TPOT CDFs (one
  figure per rate with `cdf_per_rate`); the semi-PD share over time of each executor's
  highest-rate run with a partitioner; the planner's goodput per placement.
  """
  from pdserve_jax import plots

  path = lambda name: os.path.join(plots_dir, name)
  out = []
  by_point = {}  # runs of several seeds at one rate draw their mean
  for r in runs:
    if r["rate_rps"] is not None:
      by_point.setdefault((label(r), r["rate_rps"]), []).append(r["summary"]["attainment"])
  series = {}
  for (name, rate), atts in by_point.items():
    rates, means = series.setdefault(name, ([], []))
    rates.append(rate)
    means.append(sum(atts) / len(atts))
  if any(len(rates) > 1 for rates, _ in series.values()):
    out.append(plots.attainment_vs_rate(series, path("attainment_vs_rate.png"), title,
                                        target))
  by_rate = {}
  for r in runs:
    by_rate.setdefault(r["rate_rps"] if cdf_per_rate else None, []).append(r)
  for rate, group in by_rate.items():
    samples = {label(r): {k: [q[k] for q in r["requests"] if q[k] is not None]
                          for k in ("ttft_s", "tpot_s")} for r in group}
    name = "latency_cdf.png" if rate is None else f"latency_cdf_rate{rate:g}.png"
    out.append(plots.latency_cdfs(samples, path(name), ttft_slo, tpot_slo))
  for executor in ("engine", "simulator"):
    dynamic = [r for r in runs if r["executor"] == executor and r["share_history"]]
    if dynamic:
      r = max(dynamic, key=lambda r: r["rate_rps"] or 0.0)
      rate = "" if r["rate_rps"] is None else f" at {r['rate_rps']:g} req/s"
      out.append(plots.share_over_time([tuple(p) for p in r["share_history"]],
                                       path(f"share_over_time_{executor}.png"),
                                       f"semi-PD prefill share, {executor}{rate}"))
  if planner_rows:
    out.append(plots.planner_goodput(list(planner_rows), path("planner_goodput.png"), title))
  return out
