"""Goodput search: the highest arrival rate a deployment serves within its SLOs.

Capacity comes from a saturated run (the whole sample queued at once); goodput
is bisected below it on simulated attainment (`metrics.goodput_search`).

One sample of requests is one draw: between seeds of 1,000 requests a goodput
moved by 13-22% (issue 12). `over_seeds` repeats a measurement over seeds until
the 95% confidence interval of its mean is within `max_spread` of the mean, and
`goodput_over_seeds` does that for goodput.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional, Sequence

from pdserve_jax.core import metrics
from pdserve_jax.core.request import Request
from pdserve_jax.sim.simulator import Setup, simulate

# Arrivals this fast put a whole sample in the queue at once.
BURST_RATE = 1e6


def saturation_throughput(requests: Sequence[Request], setup: Setup, deployment,
                          ttft_slo: Optional[float] = None,
                          tpot_slo: Optional[float] = None) -> float:
  """Requests/s `deployment` completes with all of `requests` queued at once (give
  them arrivals at `BURST_RATE`): its capacity. No higher rate is sustained, though
  a finite sample may still meet SLOs above it (TPOT in particular spreads a wait
  for a decode slot over every output token). The SLOs matter only to a semi-PD
  partitioner, which steers by them: under a burst every request misses its TTFT,
  which can steer it to a split no steady rate would, so a deployment with one
  gets the larger of its capacity and its starting split's."""
  rate = _completion_rate(simulate(requests, setup, deployment, ttft_slo, tpot_slo))
  if getattr(deployment, "partitioner", None) is not None:
    fixed = dataclasses.replace(deployment, partitioner=None)
    rate = max(rate, _completion_rate(simulate(requests, setup, fixed)))
  return rate


def _completion_rate(res) -> float:
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
            tol: float = 0.02,
            attainment: Optional[Callable[[float], float]] = None) -> float:
  """Highest rate (requests/s, whole deployment) whose attainment is >= `target`,
  by bisection; `make_requests(rate)` builds the workload at a rate.

  The search stays at or below `hi`, by default the deployment's saturation
  throughput on the workload (see `saturation_throughput`); `lo` defaults to a
  quarter of `hi`, and the bracket moves down from it when it misses the SLOs.
  `attainment(rate)`, when given, stands for simulating the workload at a rate (a
  caller that keeps the results it simulated already).
  """
  metrics.check_slos(ttft_slo, tpot_slo)
  if hi is None:
    hi = saturation_throughput(make_requests(BURST_RATE), setup, deployment, ttft_slo,
                               tpot_slo)
  if lo is None or not 0 < lo < hi:
    lo = hi / 4

  def att(rate):
    return simulate(make_requests(rate), setup, deployment, ttft_slo, tpot_slo).attainment(
        ttft_slo, tpot_slo)

  return metrics.goodput_search(attainment or att, target, lo, hi, tol, grow=False)




# Two-sided 95% quantiles of Student's t for 1..30 degrees of freedom; beyond, 1.96.
_T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
        2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
        2.060, 2.056, 2.052, 2.048, 2.045, 2.042)

# Seeds of the apps' goodputs: at least MIN_SEEDS, more until the spread is at most
# MAX_SPREAD, at most MAX_SEEDS.
MIN_SEEDS, MAX_SEEDS, MAX_SPREAD = 3, 24, 0.05


@dataclasses.dataclass(frozen=True)
class Estimate:
  """A mean over seeds and its uncertainty.

  Attributes:
    values: one measurement per seed, in the order of `seeds`.
    seeds: the workload seeds measured.
    mean: their mean.
    half_width: half-width of the 95% t-interval of the mean (0 with one seed).
  """
  values: tuple[float, ...]
  seeds: tuple[int, ...]

  @property
  def mean(self) -> float:
    return sum(self.values) / len(self.values)

  @property
  def std(self) -> float:
    n = len(self.values)
    if n < 2:
      return 0.0
    m = self.mean
    return math.sqrt(sum((v - m) ** 2 for v in self.values) / (n - 1))

  @property
  def half_width(self) -> float:
    n = len(self.values)
    if n < 2:
      return 0.0
    q = _T95[n - 2] if n - 1 <= len(_T95) else 1.96
    return q * self.std / math.sqrt(n)

  @property
  def spread(self) -> float:
    """`half_width` relative to the mean (inf for a zero mean over several seeds)."""
    if len(self.values) < 2:
      return float("inf")
    return self.half_width / self.mean if self.mean > 0 else (
        0.0 if self.half_width == 0 else float("inf"))

  @property
  def low(self) -> float:
    return self.mean - self.half_width

  @property
  def high(self) -> float:
    return self.mean + self.half_width

  def overlaps(self, other: Estimate) -> bool:
    """Whether the two 95% intervals overlap: the ranking between them is not
    settled by these seeds."""
    return self.low <= other.high and other.low <= self.high

  def scaled(self, factor: float) -> Estimate:
    return Estimate(tuple(v * factor for v in self.values), self.seeds)

  def to_dict(self) -> dict:
    return {"mean": self.mean, "std": self.std, "half_width_95": self.half_width,
            "spread": self.spread if math.isfinite(self.spread) else None,
            "num_seeds": len(self.seeds), "seeds": list(self.seeds),
            "values": list(self.values)}

  def describe(self, digits: int = 2) -> str:
    return (f"{self.mean:.{digits}f} ± {self.half_width:.{digits}f} "
            f"({len(self.seeds)} seeds)")


def over_seeds(measure: Callable[[int], float], first_seed: int = 0,
               min_seeds: int = MIN_SEEDS, max_seeds: int = MAX_SEEDS,
               max_spread: Optional[float] = MAX_SPREAD) -> Estimate:
  """`measure(seed)` for seeds first_seed, first_seed + 1, ...: `min_seeds` of them,
  then more until `Estimate.spread` <= `max_spread` or `max_seeds` are done (None:
  exactly `min_seeds`). Deterministic when `measure` is."""
  if not 1 <= min_seeds <= max_seeds:
    raise ValueError(f"need 1 <= min_seeds <= max_seeds, got {min_seeds}, {max_seeds}")
  if max_spread is not None and not max_spread > 0:
    raise ValueError(f"max_spread must be > 0, got {max_spread}")
  seeds, values = [], []
  while True:
    seed = first_seed + len(seeds)
    seeds.append(seed)
    values.append(float(measure(seed)))
    est = Estimate(tuple(values), tuple(seeds))
    n = len(seeds)
    if n >= max_seeds or (n >= min_seeds and (max_spread is None
                                              or est.spread <= max_spread)):
      return est


def goodput_over_seeds(make_requests: Callable[[float, int], Sequence[Request]], setup: Setup,
                       deployment, ttft_slo: float, tpot_slo: float, target: float = 0.9,
                       tol: float = 0.02, **seeds_kw) -> Estimate:
  """`goodput` with the workload drawn from seed after seed (`over_seeds`);
  `make_requests(rate, seed)` builds the workload at a rate from a seed."""
  return over_seeds(lambda seed: goodput(lambda rate: make_requests(rate, seed), setup,
                                         deployment, ttft_slo, tpot_slo, target, tol=tol),
                    **seeds_kw)
