"""Does prefix reuse change which mode wins? The planner on Mooncake's conversation
trace, each mode with the prefix cache on and off.

Llama 3.1 8B (128k context: every prompt of the trace fits) on one node of 8 H100s,
roofline latency, pages of the trace's 512-token blocks. The workload at a rate is
`--requests` consecutive rows of the trace (their sessions and shared blocks kept in
order) under Poisson arrivals at that rate; workload seed k takes the k-th window of
rows and its own arrivals, so the 95% intervals over seeds cover both which
conversations come and when. SLOs: TTFT <= `--ttft` s, TPOT <= `--tpot` s for 90% of
requests. The planner searches colocated (prefill-first, chunked), disaggregated
(DistServe's two algorithms), conditional disaggregation (its thresholds on the best
disaggregated placement) and semi-PD. The best placement of each mode (searched on
window 0, cache on and off) is then measured on the same `--seeds` windows with the
cache on and off: paired, the cache's gain and the modes' ranking come with 95%
intervals far narrower than each goodput's own (windows differ a lot).

Usage: python benchmarks/prefix_plan.py [--requests=600] [--ttft=5] [--tpot=0.1]
  [--seeds=6]
"""

import argparse
import dataclasses
import importlib.util
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if importlib.util.find_spec("pdserve_jax") is None:
  sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

from pdserve_jax import workloads as W  # noqa: E402
from pdserve_jax.model.config import get_preset  # noqa: E402
from pdserve_jax.sim import goodput  # noqa: E402
from pdserve_jax.sim import hardware as H  # noqa: E402
from pdserve_jax.sim import latency as L  # noqa: E402
from pdserve_jax.sim import planner  # noqa: E402
from pdserve_jax.sim import simulator as sim  # noqa: E402

TRACE = os.path.join(ROOT, "..", "shared", "data", "traces", "mooncake",
                     "conversation_trace.jsonl")


def _best(cands) -> dict:
  """The best candidate of each kind (a mode; conditional disaggregation apart)."""
  best = {}
  for c in cands:
    if c.goodput is None:
      continue
    kind = "disaggregated, conditional" if c.algorithm == "conditional" else c.mode
    if kind not in best or c.per_device > best[kind].per_device:
      best[kind] = c
  return best


def _interval(values) -> str:
  e = goodput.Estimate(tuple(values), tuple(range(len(values))))
  return f"{e.mean:.3f} +- {e.half_width:.3f}"


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--requests", type=int, default=600)
  ap.add_argument("--ttft", type=float, default=5.0)
  ap.add_argument("--tpot", type=float, default=0.1)
  ap.add_argument("--thresholds", default="512,2048,8192")
  ap.add_argument("--seeds", type=int, default=6)
  args = ap.parse_args()
  if not os.path.exists(TRACE):
    print(f"trace not found at {TRACE}")
    return
  trace = W.load_mooncake(TRACE)
  n = args.requests
  windows = len(trace) // n

  def workload(rate, seed=0):
    window = W.Trace(trace.name, *(None if a is None else a[(seed % windows) * n:][:n]
                                   for a in (trace.prompt_lens, trace.output_lens,
                                             trace.arrivals, trace.blocks)))
    return window.requests(rate=rate, seed=seed)

  model, hw = get_preset("llama3.1-8b"), H.get_hardware("h100-sxm")
  base = sim.Setup(model, hw, L.latency_source("roofline", model, hw), page_size=512)
  setups = {"on": base, "off": dataclasses.replace(base, prefix_cache=False)}
  bounds = [trace.hit_bound(n) if k == 0 else
            W.Trace(trace.name, trace.prompt_lens[k * n:], trace.output_lens[k * n:],
                    None, trace.blocks[k * n:]).hit_bound(n) for k in range(args.seeds)]
  print(f"Mooncake conversation trace, {args.seeds} windows of {n} requests (reuse bound "
        f"{min(bounds):.1%}-{max(bounds):.1%} of prompt tokens); Llama 3.1 8B on 8 H100s, "
        f"roofline; TTFT <= {args.ttft} s, TPOT <= {args.tpot} s for 90%")
  picks = {}
  for label, setup in setups.items():
    spec = planner.PlanSpec(
        setup, workload, ttft_slo=args.ttft, tpot_slo=args.tpot, tp_options=(1, 2, 4, 8),
        pp_options=(1,), max_batch=128, max_step_tokens=16384, chunked_max_step_tokens=2048,
        semi_pd_shares=(0.5, 0.7, 0.9),
        conditional_thresholds=tuple(int(t) for t in args.thresholds.split(",")))
    start = time.process_time()
    plan = planner.plan(spec)
    print(f"\nplanner, prefix cache {label} (window 0; {time.process_time() - start:.0f} s CPU):")
    for kind, c in sorted(_best(plan.candidates).items(), key=lambda kv: -kv[1].per_device):
      print(f"  {kind:<28} {c.per_device:.3f} req/s per GPU  {c.describe()}")
      picks.setdefault(kind, {})[c.describe()] = c
  print(f"\neach pick on the same {args.seeds} windows (seeds), cache on and off; goodput "
        "per GPU, mean +- 95% half-width, and the paired gain on/off:")
  measured = {}
  for kind, cands in picks.items():
    for name, c in cands.items():
      per = {label: [goodput.goodput(lambda rate, s=seed: workload(rate, s), setup,
                                     c.deployment, args.ttft, args.tpot) / c.num_devices
                     for seed in range(args.seeds)] for label, setup in setups.items()}
      measured[(kind, name)] = per
      gain = [a / b for a, b in zip(per["on"], per["off"]) if b > 0]
      print(f"  {kind:<28} on {_interval(per['on'])}  off {_interval(per['off'])}  "
            f"on/off {_interval(gain)}  {name}")
  for label in setups:
    top = {}
    for (kind, name), per in measured.items():
      if kind not in top or np.mean(per[label]) > np.mean(top[kind][1][label]):
        top[kind] = (name, per)
    ranked = sorted(top.items(), key=lambda kv: -np.mean(kv[1][1][label]))
    first_kind, (_, first) = ranked[0]
    print(f"\nranking with the cache {label}: {first_kind} first; each other mode's paired "
          "shortfall against it (share of its goodput, same windows):")
    for kind, (_, per) in ranked[1:]:
      short = [1 - b / a for a, b in zip(first[label], per[label]) if a > 0]
      print(f"  {kind:<28} {_interval(short)}")


if __name__ == "__main__":
  main()
