"""The planner on OPT-13B, one node of 8 A100-80GB, the conversation trace, under
both page policies.

DistServe's latency figures; trace lengths filtered to OPT's 2048-token context
with Poisson arrivals; SLOs TTFT 0.25 s and TPOT 0.1 s at 90% attainment. Plans
once per page policy (`PlanSpec.page_policy`: "on_demand", vLLM's pages as tokens
are written with preemption when short; "reserve", pages for a request's whole
life at admission) and prints each mode's best goodput per GPU under the two side
by side, with each search's time, then each full ranking. Needs
`../shared/data/traces/splitwise_conv.csv`; without it, says so and exits 0.

Usage: python benchmarks/plan_splitwise.py [--requests N] [--output_json PATH]
                                           [--no-ranking]
"""

import argparse
import dataclasses
import importlib.util
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if importlib.util.find_spec("pdserve_jax") is None:
  sys.path.insert(0, ROOT)

from pdserve_jax import workloads  # noqa: E402
from pdserve_jax.core import deploy  # noqa: E402
from pdserve_jax.model.config import get_preset  # noqa: E402
from pdserve_jax.sim import hardware, latency, planner, simulator  # noqa: E402

TRACE = os.path.join(ROOT, "..", "shared", "data", "traces", "splitwise_conv.csv")


POLICIES = ("on_demand", "reserve")
MODES = ("disaggregated", "semi_pd", deploy.COLOCATED)


def _cell(c) -> str:
  if c is None:
    return f"{'none meets the SLOs':<40}{'':>5}{'-':>8}{'-':>10}"
  return f"{c.describe():<40}{c.num_devices:>5}{c.goodput:>8.2f}{c.per_device:>10.2f}"


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--requests", type=int, default=500)
  parser.add_argument("--output_json", default=None)
  parser.add_argument("--ranking", action=argparse.BooleanOptionalAction, default=True,
                      help="print every placement's ranking under each policy")
  args = parser.parse_args()
  if not os.path.exists(TRACE):
    print(f"trace not found at {TRACE}; nothing to plan")
    return
  model, hw = get_preset("opt-13b"), hardware.get_hardware("a100-80gb")
  trace = workloads.load_csv_trace(TRACE).filter(model.max_position_embeddings)
  base = planner.PlanSpec(
      simulator.Setup(model, hw, latency.latency_source("distserve", model, hw)),
      lambda rate: trace.requests(n=args.requests, rate=rate, sample=True, seed=0),
      ttft_slo=0.25, tpot_slo=0.1, num_nodes=1, tp_options=(1, 2, 4),
      pp_options=(1, 2, 4, 8), semi_pd_shares=(0.5, 0.6, 0.7, 0.8, 0.9))
  plans, seconds, no_pp = {}, {}, {}
  for policy in POLICIES:
    spec = dataclasses.replace(base, page_policy=policy)
    start = time.perf_counter()
    plans[policy] = planner.plan(spec)
    seconds[policy] = time.perf_counter() - start
    # vLLM, DistServe's colocated baseline, had no pipeline parallelism.
    no_pp[policy] = planner.plan(dataclasses.replace(spec, pp_options=(1,)),
                                 modes=deploy.COLOCATED).best()
  print(f"OPT-13B, 8x A100-80GB, splitwise_conv ({len(trace)} requests fit 2048 tokens; "
        f"{args.requests} sampled), TTFT <= 0.25 s, TPOT <= 0.1 s, 90% attainment\n")
  width = 66  # a cell and a gap
  print((f"{'':<15}" + "".join(f"{'page_policy=' + p:<{width}}" for p in POLICIES)).rstrip())
  head = f"{'placement':<40}{'GPUs':>5}{'req/s':>8}{'req/s/GPU':>10}"
  print(f"{'mode':<15}" + "".join(f"{head:<{width}}" for _ in POLICIES).rstrip())
  rows = [(m if isinstance(m, str) else "colocated", [plans[p].best(m) for p in POLICIES])
          for m in MODES]
  rows.append(("colocated pp=1", [no_pp[p] for p in POLICIES]))
  for name, cands in rows:
    print(f"{name:<15}" + "".join(f"{_cell(c):<{width}}" for c in cands).rstrip())
  print(f"{'search':<15}" + "".join(f"{f'{seconds[p]:.1f} s':<{width}}"
                                    for p in POLICIES).rstrip())
  # Why the ranking comes out as it does: each phase alone, per device.
  for policy in POLICIES:
    plan = plans[policy]
    print(f"\neach phase alone, {policy} (req/s per device, at its SLO alone):")
    for phase in plan.phase_goodput:
      print(f"  {phase:<8}" + "  ".join(
          f"{k} {g:.2f}" for k, g in plan.phase_per_device(phase).items()))
  if args.ranking:
    for policy in POLICIES:
      print(f"\nranking, page_policy={policy} (search {seconds[policy]:.1f} s):")
      print(plans[policy].table())
  if args.output_json:
    with open(args.output_json, "w") as f:
      json.dump({p: dict(plans[p].to_dict(), search_s=seconds[p]) for p in POLICIES}, f,
                indent=1)


if __name__ == "__main__":
  main()
