"""absl app: plan placements, goodput per device of each mode's placements under
the SLOs, ranked, as a table, a result JSON and a bar chart; it ends with each mode's
best placement and the winner.

  python -m pdserve_jax.cli.plan        # plan_demo: OPT-13B on 8 A100s, runs anywhere
  python -m pdserve_jax.cli.plan --config=plan_opt13b \
      --config.ttft_slo=0.25 --config.modes=disaggregated,semi_pd --output_json=plan.json

The table of every candidate is printed unless the config's `print_candidates` is
False (plan_demo's).

The planner (`sim.planner`) searches tp, pp, instance counts and semi-PD shares;
the config gives the model, hardware and latency source (`cli.sim_runs`), the
SLOs, the workload block, the batch limits and page policy of `instance`, the
semi-PD partitioner and the search space. The result's `plan` holds every
candidate; its `runs` one simulation of each mode's best placement at its goodput.
"""

import time

from pdserve_jax import workloads
from pdserve_jax.cli import common, figures, deployments, sim_runs
from pdserve_jax.sim import planner
from pdserve_jax.sim.latency import tpu_cost

RULES = {
    "num_nodes": common.at_least(1), "target": common.fraction, "tol": common.positive,
    "target_rate": lambda v: None if v >= 0 else "must be >= 0 (0: no target)",
    "max_spread": lambda v: None if v >= 0 else "must be >= 0 (0: one seed)",
    "min_seeds": common.at_least(1), "max_seeds": common.at_least(1),
    "max_tie_seeds": common.at_least(0),
}


def tpu_config(model: str, latency: str, ttft_slo: float, tpot_slo: float, num_nodes: int,
               tp_options: tuple, pp_options: tuple):
  """A plan on TPU from a compiled-program cost table (`configs/plan_llama3*_tpu.py`):
  the conversation trace, instances at the table's buckets (128 rows, 2048-token packed
  calls), the cost model's factors written out to be seen and set."""
  import ml_collections

  c = ml_collections.ConfigDict()
  c.model, c.hardware, c.latency = model, "v5e", latency
  c.latency_params = ml_collections.ConfigDict(
      {k: getattr(tpu_cost.TpuCostLatencyModel, k) for k in tpu_cost.PARAMETERS})
  c.overheads = "none"
  c.page_size = 16
  c.memory_utilization = 0.9
  c.ttft_slo, c.tpot_slo = ttft_slo, tpot_slo
  c.modes = ("disaggregated", "colocated_prefill_first", "colocated_chunked")
  blocks = deployments.blocks()
  c.instance = blocks["instance"]
  c.instance.max_batch = 128
  c.instance.max_step_tokens = 2048
  c.instance.chunked_max_step_tokens = 512
  c.semi_pd = blocks["semi_pd"]
  c.workload = workloads.config(source="trace", trace="../shared/data/traces/splitwise_conv.csv",
                                num_requests=300)
  c.num_nodes, c.tp_options, c.pp_options = num_nodes, tp_options, pp_options
  c.semi_pd_shares = (0.5, 0.6, 0.7)
  c.target = 0.9
  c.tol = 0.05
  c.target_rate = 0.0
  c.max_spread = 0.0  # one seed: a quick ranking
  c.min_seeds = 3
  c.max_seeds = 8
  c.max_tie_seeds = 0  # 0: twice max_seeds
  return c


def build_spec(cfg) -> planner.PlanSpec:
  """A `PlanSpec` from a config (see `configs/plan_opt13b.py`)."""
  common.check(cfg, {**RULES, **deployments.RULES})
  setup = sim_runs.setup(cfg)
  i = cfg.instance
  return planner.PlanSpec(
      setup=setup, workload=workloads.from_config(cfg.workload,
                                                  setup.model.max_position_embeddings),
      ttft_slo=cfg.ttft_slo, tpot_slo=cfg.tpot_slo, num_nodes=cfg.num_nodes,
      tp_options=common.numbers("tp_options", cfg.tp_options, int),
      pp_options=common.numbers("pp_options", cfg.pp_options, int),
      max_batch=i.max_batch, max_step_tokens=i.max_step_tokens,
      chunked_max_step_tokens=i.chunked_max_step_tokens,
      target=cfg.target, tol=cfg.tol, target_rate=cfg.target_rate or None,
      semi_pd_shares=_shares(cfg.semi_pd_shares), semi_pd_concurrent=cfg.semi_pd.concurrent,
      partitioner=deployments.partitioner(cfg),
      page_policy=i.page_policy, max_spread=cfg.max_spread or None, min_seeds=cfg.min_seeds,
      max_seeds=max(cfg.min_seeds, cfg.max_seeds),
      max_tie_seeds=cfg.get("max_tie_seeds", 0) or None)


def _shares(value) -> tuple:
  shares = common.numbers("semi_pd_shares", value)
  bad = [x for x in shares if not x < 1]
  if bad:
    raise common.ConfigError(f"semi_pd_shares: each must lie in (0, 1), got {bad[0]!r}")
  return shares


def candidate(c) -> dict:
  return dict(c.to_dict(), mode=c.deployment.mode)


def table(cands) -> str:
  """The candidates, ranked; a pruned one says why, with the capacity bound the
  search used."""
  rows = [f"{'mode':<24}{'algorithm':<20}{'placement':<46}{'devices':>8}{'goodput':>9}"
          f"{'per device':>12}{'± (95%)':>9}{'seeds':>6}"]
  for c in cands:
    why = ""
    if c["goodput_rps"] is None:
      goodput, per = "pruned", "-"
      what = "measured" if c["capacity_measured"] else "estimated"
      why = (f"  ({c['note']}; {what} capacity "
             f"{c['capacity_rps'] / c['num_devices']:.2f}/device)")
    else:
      goodput, per = f"{c['goodput_rps']:.2f}", f"{c['goodput_per_device']:.2f}"
    e = c["estimate"]
    spread = "" if e is None else f"{e['half_width_95'] / c['num_devices']:.2f}"
    seeds = "" if e is None else f"{e['num_seeds']}" + ("*" if c["overlaps_best"] else "")
    rows.append(f"{c['mode']:<24}{c['algorithm']:<20}{c['placement']:<46}"
                f"{c['num_devices']:>8}{goodput:>9}{per:>12}{spread:>9}{seeds:>6}{why}")
  if any(c["overlaps_best"] for c in cands):
    rows.append("* its 95% interval overlaps the best's: these seeds do not separate them")
  return "\n".join(rows)


def answer(cfg, spec: planner.PlanSpec, best: dict) -> str:
  """Each mode's best placement with its goodput per device, and the winner, in a
  few lines (`best`: mode -> its top candidate, ranked)."""
  hw = spec.setup.hardware
  nodes = f"{cfg.num_nodes} node{'s' if cfg.num_nodes > 1 else ''}"
  lines = [f"{cfg.model} on {nodes} of {hw.devices_per_node} {hw.name}, SLOs TTFT "
           f"{cfg.ttft_slo * 1e3:g} ms and TPOT {cfg.tpot_slo * 1e3:g} ms: each mode's best "
           f"placement and its goodput per device (the highest rate at which "
           f"{cfg.target:.0%} of requests meet both SLOs, over the devices it uses):"]
  for mode, c in best.items():
    lines.append(f"  {mode:<24} {c.describe():<44} {c.per_device:6.2f} req/s")
  if not best:
    return "\n".join(lines + ["  no placement meets the SLOs"])
  first, *rest = best.values()
  margin = (f", {first.per_device / rest[0].per_device:.2f}x the next mode's "
            f"({rest[0].deployment.mode})" if rest else "")
  lines.append(f"The planner's pick: {first.deployment.mode}, {first.describe()}: "
               f"{first.per_device:.2f} req/s per device{margin}.")
  return "\n".join(lines)


def main(cfg, out: common.Outputs):
  start = time.perf_counter()
  names = deployments.modes(cfg)
  spec = build_spec(cfg)
  fit = spec.workload.fit
  print(fit.describe())  # what the context did to the lengths, before any ranking
  with common.progress(None, "placements", "cand") as bar:
    def step(c):
      bar.set_postfix_str(f"{c.mode} {c.describe()}", refresh=False)
      bar.update(1)
    result = planner.plan(spec, names, step)
  seconds = time.perf_counter() - start
  cands = [candidate(c) for c in result.candidates]
  # What turns the latency model's counts into seconds, beside the ranking.
  params = getattr(spec.setup.latency, "parameters", None)
  if params:
    print("latency model: " + ", ".join(f"{k}={v}" for k, v in params.items()))
  if cfg.get("print_candidates", True):
    print(table(cands))
    print(f"\nsearch took {seconds:.1f} s")
  if result.tied:
    print(result.tie_message())
  best = {}  # the candidates come ranked
  for c in result.candidates:
    if c.goodput is not None:
      best.setdefault(c.deployment.mode, c)
  print(answer(cfg, spec, best))
  # Each mode's best placement once more at its goodput: its per-request records.
  runs = [sim_runs.run(spec.setup, c.deployment, spec.workload(c.goodput), c.goodput,
                         cfg.ttft_slo, cfg.tpot_slo, cfg.latency,
                         label=f"best {m} placement at its goodput")
          for m, c in best.items()]
  plan = dict(candidates=cands, best={m: candidate(best[m]) if m in best else None
                                      for m in names}, phase_goodput_rps=result.phase_goodput,
              skipped_configs=result.skipped, search_seconds=seconds,
              latency_parameters=params or None, workload_fit=fit.to_dict(),
              tied=[c.describe() for c in result.tied])
  plots = []
  if out.plots_dir:
    rows = [(f"{c['mode']}: {c['placement']}", c["goodput_per_device"]) for c in cands
            if c["goodput_per_device"] is not None]
    plots = figures.write(out.plots_dir, runs, cfg.ttft_slo, cfg.tpot_slo,
                          title=f"{cfg.model} on {cfg.hardware}", planner_rows=rows)
  common.save("plan", cfg, out, runs, plots, start, plan=plan)


if __name__ == "__main__":
  common.run(main, "plan_demo")
