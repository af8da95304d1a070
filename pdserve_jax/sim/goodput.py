"""Goodput search: the highest arrival rate a deployment serves within its SLOs.

Capacity comes from a saturated run (the whole sample queued at once); goodput
is bisected below it on simulated attainment (`metrics.goodput_search`).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

from pdserve_jax.serving import metrics
from pdserve_jax.serving.request import Request
from pdserve_jax.sim.simulator import Setup, simulate

# Arrivals this fast put a whole sample in the queue at once.
BURST_RATE = 1e6


def saturation_throughput(requests: Sequence[Request], setup: Setup, deployment) -> float:
  """Requests/s `deployment` completes with all of `requests` queued at once (give
  them arrivals at `BURST_RATE`): its capacity. No higher rate is sustained, though
  a finite sample may still meet SLOs above it (TPOT in particular spreads a wait
  for a decode slot over every output token)."""
  res = simulate(requests, setup, deployment)
  # The completion rate between the first and last tenth of finishes: the ramp at
  # the start and the drain at the end run below full batches.
  done = sorted(r.finish_time for r in res.requests)
  i, j = len(done) // 10, len(done) - 1 - len(done) // 10
  if j <= i or done[j] <= done[i]:
    return len(done) / max(res.makespan, 1e-9)
  return (j - i) / (done[j] - done[i])


def goodput(make_requests: Callable[[float], Sequence[Request]], setup: Setup, deployment,
            ttft_slo: float, tpot_slo: float, target: float = 0.9,
            lo: Optional[float] = None, hi: Optional[float] = None,
            tol: float = 0.02) -> float:
  """Highest rate (requests/s, whole deployment) whose attainment is >= `target`,
  by bisection; `make_requests(rate)` builds the workload at a rate.

  The search stays at or below `hi`, by default the deployment's saturation
  throughput on the workload (see `saturation_throughput`); `lo` defaults to a
  quarter of `hi`, and the bracket moves down from it when it misses the SLOs.
  """
  metrics.check_slos(ttft_slo, tpot_slo)
  if hi is None:
    hi = saturation_throughput(make_requests(BURST_RATE), setup, deployment)
  if lo is None or not 0 < lo < hi:
    lo = hi / 4

  def att(rate):
    return simulate(make_requests(rate), setup, deployment, ttft_slo, tpot_slo).attainment(
        ttft_slo, tpot_slo)

  return metrics.goodput_search(att, target, lo, hi, tol, grow=False)


