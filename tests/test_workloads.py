"""Tests of arrival processes, length distributions and trace loading."""

import json
import os

import numpy as np
import pytest

from pdserve_jax import workloads as W

DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")
CONV = os.path.join(DATA, "traces", "splitwise_conv.csv")


def test_arrivals_rate_and_burstiness():
  n = 20000
  p = W.arrival_times(n, 4.0, seed=1)
  assert n / p[-1] == pytest.approx(4.0, rel=0.03)
  gaps = np.diff(p)
  assert gaps.std() / gaps.mean() == pytest.approx(1.0, abs=0.05)
  g = W.arrival_times(n, 4.0, "gamma", cv=3.0, seed=1)
  gg = np.diff(g)
  assert gg.std() / gg.mean() == pytest.approx(3.0, rel=0.1)
  assert n / g[-1] == pytest.approx(4.0, rel=0.1)
  # One seed, any rate: the same sequence scaled in time.
  np.testing.assert_allclose(W.arrival_times(50, 2.0, seed=3) * 2,
                             W.arrival_times(50, 8.0, seed=3) * 8)
  with pytest.raises(ValueError, match="rate"):
    W.arrival_times(5, 0.0)
  with pytest.raises(ValueError, match="unknown arrival process"):
    W.arrival_times(5, 1.0, "weibull")


def test_length_distributions():
  rng = np.random.default_rng(0)
  assert (W.Fixed(7).sample(5, rng) == 7).all()
  u = W.Uniform(3, 5).sample(1000, rng)
  assert u.min() == 3 and u.max() == 5
  ln = W.Lognormal(200, 0.5).sample(50000, rng)
  assert ln.mean() == pytest.approx(200, rel=0.02)
  assert ln.std() / ln.mean() == pytest.approx(0.5, rel=0.05)
  assert W.Lognormal(5, 3.0, high=10).sample(1000, rng).max() <= 10
  with pytest.raises(ValueError):
    W.Fixed(0).sample(1, rng)
  with pytest.raises(ValueError):
    W.Uniform(5, 3).sample(1, rng)


def test_synthetic_is_seeded():
  a = W.synthetic(20, 2.0, W.Uniform(10, 100), W.Fixed(8), seed=5)
  b = W.synthetic(20, 2.0, W.Uniform(10, 100), W.Fixed(8), seed=5)
  assert [(r.prompt_len, r.arrival_time) for r in a] == [
      (r.prompt_len, r.arrival_time) for r in b]
  assert [r.request_id for r in a] == list(range(20))
  assert all(r.max_tokens == 8 for r in a)


def test_csv_trace(tmp_path):
  path = tmp_path / "t.csv"
  path.write_text("arrived_at,num_prefill_tokens,num_decode_tokens\n"
                  "5.0,10,3\n4.5,20,4\n7.0,30,5\n")
  t = W.load_csv_trace(str(path))
  assert len(t) == 3 and list(t.prompt_lens) == [20, 10, 30]  # sorted by arrival
  reqs = t.requests()
  assert [r.arrival_time for r in reqs] == [0.0, 0.5, 2.5]
  assert len(t.requests(n=10, rate=1.0, sample=True)) == 10
  assert len(t.filter(34)) == 2
  with pytest.raises(ValueError, match="has 3 requests"):
    t.requests(n=4)
  untimed = tmp_path / "u.csv"
  untimed.write_text("num_prefill_tokens,num_decode_tokens\n10,3\n")
  with pytest.raises(ValueError, match="no arrival times"):
    W.load_csv_trace(str(untimed)).requests()


@pytest.mark.parametrize("text,match", [
    ("num_prefill_tokens,num_decode_tokens\n", "no requests"),
    ("num_prefill_tokens,arrived_at\n5,0.0\n", r"lacks column\(s\) \['num_decode_tokens'\]"),
    ("num_prefill_tokens,num_decode_tokens\n5,3\n0,3\n", "row 3 has 0"),
    ("num_prefill_tokens,num_decode_tokens\n5,-1\n", "num_decode_tokens must be >= 1"),
    ("num_prefill_tokens,num_decode_tokens\n5,x\n", "line 2"),
])
def test_csv_trace_errors(tmp_path, text, match):
  path = tmp_path / "bad.csv"
  path.write_text(text)
  with pytest.raises(ValueError, match=match):
    W.load_csv_trace(str(path))


def test_sharegpt(tmp_path):
  convs = [
      {"id": "a", "conversations": [{"from": "human", "value": "one two three"},
                                    {"from": "gpt", "value": "four five"}]},
      {"id": "b", "conversations": [{"from": "human", "value": "alone"}]},
      {"id": "c", "conversations": [{"from": "gpt", "value": "x"},
                                    {"from": "human", "value": "a b"},
                                    {"from": "gpt", "value": "c d e f"}]},
  ]
  path = tmp_path / "s.json"
  path.write_text(json.dumps(convs))
  t = W.load_sharegpt(str(path), str.split)
  assert list(t.prompt_lens) == [3, 2] and list(t.output_lens) == [2, 4]
  assert t.arrivals is None
  assert len(t.requests(rate=1.0)) == 2
  empty = tmp_path / "e.json"
  empty.write_text("[]")
  with pytest.raises(ValueError, match="no requests"):
    W.load_sharegpt(str(empty), str.split)


def test_real_conversation_trace():
  if not os.path.exists(CONV):
    pytest.skip(f"shared trace not found at {CONV}")
  t = W.load_csv_trace(CONV)
  assert len(t) == 19366 and t.arrivals is not None
  assert 1000 < t.prompt_lens.mean() < 1300 and 150 < t.output_lens.mean() < 260
  reqs = t.requests(n=100)
  assert reqs[0].arrival_time == 0.0
  assert all(a.arrival_time <= b.arrival_time for a, b in zip(reqs, reqs[1:]))
