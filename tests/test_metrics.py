"""Tests of latency metrics, SLO attainment and the goodput bisection."""

import math

import pytest

from pdserve_jax.core import metrics as M
from pdserve_jax.core.request import Request


def _done(arrival, times):
  r = Request(0, 8, len(times), arrival_time=arrival)
  r.num_prefilled, r.num_output, r.token_times = 8, len(times), list(times)
  r.finish_time = times[-1]
  return r


def test_percentiles_match_numpy_definition():
  vals = list(range(1, 101))
  assert M.percentile(vals, 50) == pytest.approx(50.5)
  assert M.percentile(vals, 90) == pytest.approx(90.1)
  assert M.percentile([3.0], 99) == 3.0
  with pytest.raises(ValueError, match="empty"):
    M.percentile([], 50)


def test_attainment_counts_both_slos():
  reqs = [
      _done(0.0, [0.2, 0.3, 0.4]),   # ttft .2, tpot .1: meets
      _done(0.0, [0.6, 0.7]),        # ttft too high
      _done(0.0, [0.1, 0.5]),        # tpot too high
      _done(0.0, [0.3]),             # one token: TPOT trivially met
  ]
  unfinished = Request(1, 4, 4)
  assert M.attainment(reqs, 0.5, 0.1) == pytest.approx(0.5)
  assert M.attainment(reqs + [unfinished], 0.5, 0.1) == pytest.approx(0.4)
  for bad in [(0.0, 0.1), (0.5, -1.0), (math.nan, 0.1)]:
    with pytest.raises(ValueError, match="positive"):
      M.attainment(reqs, *bad)


def test_summary():
  reqs = [_done(float(i), [i + 0.1, i + 0.2, i + 0.3]) for i in range(10)]
  s = M.summarize(reqs, 0.15, 0.2)
  assert s["num_finished"] == 10 and s["attainment"] == 1.0
  assert s["ttft_s"]["p50"] == pytest.approx(0.1)
  assert s["tpot_s"]["p99"] == pytest.approx(0.1)
  assert s["latency_s"]["mean"] == pytest.approx(0.3)
  assert s["duration_s"] == pytest.approx(9.3)
  assert s["output_tokens_per_s"] == pytest.approx(30 / 9.3)
  assert "attainment" not in M.summarize(reqs)
  with pytest.raises(ValueError):
    M.summarize([])


def test_goodput_search_bisection():
  calls = []

  def att(rate):  # falls below 0.9 at rate 3.7
    calls.append(rate)
    return 1.0 if rate <= 3.7 else 0.5

  g = M.goodput_search(att, lo=0.5, hi=2.0, tol=0.01)
  assert 3.7 * 0.99 <= g <= 3.7
  assert len(calls) < 20
  assert M.goodput_search(lambda r: 0.0) == 0.0
  g = M.goodput_search(lambda r: 1.0 if r <= 0.3 else 0.0, lo=4.0, hi=8.0)
  assert 0.3 * 0.98 <= g <= 0.3
  assert M.goodput_search(lambda r: 1.0, hi=1.0, max_doublings=3) == 4.0  # last rate tried
  with pytest.raises(ValueError, match="target"):
    M.goodput_search(att, target=0.0)
  with pytest.raises(ValueError, match="lo < hi"):
    M.goodput_search(att, lo=2.0, hi=1.0)
