"""The planner on OPT-13B, one node of 8 A100-80GB, the conversation trace.

DistServe's latency figures; trace lengths filtered to OPT's 2048-token context
with Poisson arrivals; SLOs TTFT 0.25 s and TPOT 0.1 s at 90% attainment. Prints
the best placement of each mode side by side, then the full ranking. Needs
`../shared/data/traces/splitwise_conv.csv`; without it, says so and exits 0.

Usage: python benchmarks/plan_splitwise.py [--requests N] [--output_json PATH]
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

from pdserve_jax import workloads
from pdserve_jax.model.config import get_preset
from pdserve_jax.sim import hardware, latency, planner, simulator

TRACE = os.path.join(ROOT, "..", "shared", "data", "traces", "splitwise_conv.csv")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--requests", type=int, default=500)
  parser.add_argument("--output_json", default=None)
  args = parser.parse_args()
  if not os.path.exists(TRACE):
    print(f"trace not found at {TRACE}; nothing to plan")
    return
  model, hw = get_preset("opt-13b"), hardware.get_hardware("a100-80gb")
  trace = workloads.load_csv_trace(TRACE).filter(model.max_position_embeddings)
  spec = planner.PlanSpec(
      simulator.Setup(model, hw, latency.latency_source("distserve", model, hw)),
      lambda rate: trace.requests(n=args.requests, rate=rate, sample=True, seed=0),
      ttft_slo=0.25, tpot_slo=0.1, num_nodes=1, tp_options=(1, 2, 4),
      pp_options=(1, 2, 4, 8), semi_pd_shares=(0.5, 0.6, 0.7, 0.8, 0.9))
  start = time.perf_counter()
  plan = planner.plan(spec)
  seconds = time.perf_counter() - start
  print(f"OPT-13B, 8x A100-80GB, splitwise_conv ({len(trace)} requests fit 2048 tokens; "
        f"{args.requests} sampled), TTFT <= 0.25 s, TPOT <= 0.1 s, 90% attainment\n")
  print(f"{'mode':<15}{'placement':<46}{'GPUs':>5}{'req/s':>8}{'req/s/GPU':>11}")
  for mode in ("disaggregated", "semi_pd", "colocated"):
    c = plan.best(mode)
    if c is None:
      print(f"{mode:<15}no placement meets the SLOs")
      continue
    print(f"{mode:<15}{c.describe():<46}{c.num_devices:>5}{c.goodput:>8.2f}"
          f"{c.per_device:>11.2f}")
  # vLLM, DistServe's colocated baseline, had no pipeline parallelism.
  no_pp = planner.plan(dataclasses.replace(spec, pp_options=(1,)), modes=("colocated",))
  c = no_pp.best("colocated")
  print(f"{'colocated pp=1':<15}{c.describe():<46}{c.num_devices:>5}{c.goodput:>8.2f}"
        f"{c.per_device:>11.2f}")
  # Why the ranking comes out as it does: each phase alone, per device.
  print("\neach phase alone (req/s per device, at its SLO alone):")
  for phase in plan.phase_goodput:
    print(f"  {phase:<8}" + "  ".join(
        f"{k} {g:.2f}" for k, g in plan.phase_per_device(phase).items()))
  print(f"\nsearch: {seconds:.1f} s\n")
  print(plan.table())
  if args.output_json:
    with open(args.output_json, "w") as f:
      json.dump(plan.to_dict(), f, indent=1)


if __name__ == "__main__":
  main()
