"""Serving metrics: per-request latencies, percentiles, SLO attainment, goodput.

Definitions (shared by the engine and the simulator): TTFT = first token time -
arrival; TPOT = (last token - first token) / (output tokens - 1), undefined for a
single output token; end-to-end latency = finish - arrival. A request attains the
SLOs when its TTFT and TPOT are within them; a single-token request meets TPOT
trivially, and an unfinished request attains nothing. Goodput is the highest arrival
rate whose attainment stays at or above a target, found by bisection. Prefix
reuse: the prefill tokens a prefix cache held at admission (`Request.num_cached`)
against those computed (`Request.num_computed`), over requests and their
recomputations.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import numpy as np

from pdserve_jax.core.request import Request


def percentile(values: Sequence[float], q: float) -> float:
  """The q-th percentile (0..100) by linear interpolation, numpy's default."""
  if not len(values):
    raise ValueError("percentile of an empty sequence")
  return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def check_slos(ttft_slo: float, tpot_slo: float) -> None:
  if not (ttft_slo > 0 and tpot_slo > 0):  # also rejects NaN
    raise ValueError(f"SLOs must be positive, got ttft_slo={ttft_slo} s, "
                     f"tpot_slo={tpot_slo} s")


def meets_slos(req: Request, ttft_slo: float, tpot_slo: float) -> bool:
  if req.finish_time is None or req.ttft is None:
    return False
  tpot = req.tpot
  return req.ttft <= ttft_slo and (tpot is None or tpot <= tpot_slo)


def attainment(reqs: Sequence[Request], ttft_slo: float, tpot_slo: float) -> float:
  """Share of `reqs` meeting both SLOs."""
  check_slos(ttft_slo, tpot_slo)
  if not reqs:
    raise ValueError("attainment of no requests")
  return sum(meets_slos(r, ttft_slo, tpot_slo) for r in reqs) / len(reqs)


def _stats(values: list[float]) -> dict:
  if not values:
    return {"mean": None, "p50": None, "p90": None, "p99": None}
  a = np.asarray(values, dtype=np.float64)
  p50, p90, p99 = np.percentile(a, [50, 90, 99])
  return {"mean": float(a.mean()), "p50": float(p50), "p90": float(p90), "p99": float(p99)}


def _finish(r: Request) -> float:
  assert r.finish_time is not None
  return r.finish_time


def summarize(reqs: Sequence[Request], ttft_slo: Optional[float] = None,
              tpot_slo: Optional[float] = None) -> dict:
  """A JSON-ready summary: counts, throughput, TTFT/TPOT/latency statistics, prefix
  reuse, and SLO attainment when both SLOs are given."""
  if not reqs:
    raise ValueError("summary of no requests")
  finished = [r for r in reqs if r.finish_time is not None]
  out: dict = {"num_requests": len(reqs), "num_finished": len(finished)}
  if finished:
    start = min(r.arrival_time for r in reqs)
    span = max(_finish(r) for r in finished) - start
    tokens = sum(r.num_output for r in finished)
    out["duration_s"] = span
    out["throughput_rps"] = len(finished) / span if span > 0 else math.inf
    out["output_tokens_per_s"] = tokens / span if span > 0 else math.inf
  out["ttft_s"] = _stats([t for t in (r.ttft for r in finished) if t is not None])
  out["tpot_s"] = _stats([t for t in (r.tpot for r in finished) if t is not None])
  out["latency_s"] = _stats([t for t in (r.latency for r in finished) if t is not None])
  cached, computed = sum(r.num_cached for r in reqs), sum(r.num_computed for r in reqs)
  out["prefix_hit_tokens"], out["prefill_tokens_computed"] = cached, computed
  out["prefix_hit_rate"] = cached / (cached + computed) if cached + computed else 0.0
  out["prefix_hit_requests"] = sum(r.num_cached > 0 for r in reqs) / len(reqs)
  if ttft_slo is not None and tpot_slo is not None:
    out["ttft_slo_s"], out["tpot_slo_s"] = ttft_slo, tpot_slo
    out["attainment"] = attainment(reqs, ttft_slo, tpot_slo)
  return out


def goodput_search(attainment_at_rate: Callable[[float], float], target: float = 0.9,
                   lo: float = 0.05, hi: float = 16.0, tol: float = 0.02,
                   max_doublings: int = 12, grow: bool = True) -> float:
  """Highest arrival rate whose attainment is >= `target`, by bisection.

  Attainment is assumed to fall as the rate grows. If `hi` still attains, the
  bracket doubles upward; if `lo` does not, it halves downward (each at most
  `max_doublings` times, after which the search gives the last rate that attained,
  or 0.0). Bisection stops when the bracket is within `tol` of its lower end.

  Args:
    attainment_at_rate: rate (requests/s) -> share of requests meeting the SLOs.
    target: attainment to keep, in (0, 1].
    lo, hi: initial bracket, 0 < lo < hi.
    tol: relative width of the final bracket.
    max_doublings: how far beyond the bracket to look, in factors of two.
    grow: whether to look above `hi` at all; without it, a `hi` that attains is
      the answer.

  Returns:
    The lower end of the final bracket (a rate known to attain), or 0.0.
  """
  if not 0 < target <= 1:
    raise ValueError(f"target attainment must lie in (0, 1], got {target}")
  if not 0 < lo < hi:
    raise ValueError(f"need 0 < lo < hi, got lo={lo}, hi={hi}")
  if tol <= 0:
    raise ValueError(f"tol must be positive, got {tol}")
  for _ in range(max_doublings):
    if attainment_at_rate(lo) >= target:
      break
    lo, hi = lo / 2, lo
  else:
    return 0.0
  for _ in range(max_doublings if grow else 1):
    if attainment_at_rate(hi) < target:
      break
    if not grow:
      return hi
    lo, hi = hi, 2 * hi
  else:
    return lo
  while hi - lo > tol * lo:
    mid = 0.5 * (lo + hi)
    if attainment_at_rate(mid) >= target:
      lo = mid
    else:
      hi = mid
  return lo
