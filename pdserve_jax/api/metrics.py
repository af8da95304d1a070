"""Prometheus text for `/metrics`: every HTTP response by status, every completion by
how it ended, client disconnects, the engine's own counters and gauges, TTFT and TPOT
histograms.

The HTTP layer counts each completion's outcome once the engine ended it (finished by
stop or length, aborted, failed), whatever happened to its client, so the sums equal
the engine's `stats()` (`finished` = stop + length); the engine's counters are also
exported as they are (`pdserve_engine_requests_total`). Statuses are counted as
responses start (`api.app`'s middleware), 404s, 413s and 500s included.
"""

from __future__ import annotations

import threading
from typing import Dict, List

# Seconds; the upper bounds of the TTFT and TPOT histograms' buckets.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Histogram:
  """Cumulative buckets, Prometheus style."""

  def __init__(self, buckets=BUCKETS):
    self.buckets = tuple(buckets)
    self.counts = [0] * (len(self.buckets) + 1)
    self.sum = 0.0

  def observe(self, v: float) -> None:
    self.sum += v
    for i, b in enumerate(self.buckets):
      if v <= b:
        self.counts[i] += 1
        return
    self.counts[-1] += 1

  def lines(self, name: str) -> List[str]:
    out, acc = [], 0
    for b, c in zip(self.buckets, self.counts):
      acc += c
      out.append(f'{name}_bucket{{le="{b}"}} {acc}')
    acc += self.counts[-1]
    out += [f'{name}_bucket{{le="+Inf"}} {acc}', f"{name}_sum {self.sum}",
            f"{name}_count {acc}"]
    return out


def _counter(name: str, help_: str, label: str, counts: Dict[str, int]) -> List[str]:
  return ([f"# HELP {name} {help_}", f"# TYPE {name} counter"]
          + [f'{name}{{{label}="{k}"}} {v}' for k, v in sorted(counts.items())])


class Metrics:
  """Counters the routes update (from the event loop and from threads: locked)."""

  def __init__(self):
    self._lock = threading.Lock()
    self.statuses: Dict[str, int] = {}  # HTTP status -> responses
    self.outcomes: Dict[str, int] = {}  # stop / length / aborted / failed -> completions
    self.disconnects = 0
    self.ttft, self.tpot = Histogram(), Histogram()

  def status(self, code: int) -> None:
    with self._lock:
      self.statuses[str(code)] = self.statuses.get(str(code), 0) + 1

  def disconnect(self) -> None:
    with self._lock:
      self.disconnects += 1

  def ended(self, handle) -> None:
    """`handle`'s request ended: count each completion's outcome and its latencies."""
    outcomes = handle.outcomes()
    times = handle.token_times()
    with self._lock:
      for o in outcomes:
        self.outcomes[o] = self.outcomes.get(o, 0) + 1
      firsts = [t[0] for t in times if t]
      if firsts:
        self.ttft.observe(min(firsts) - handle.arrival_time)
      if len(times) == 1 and len(times[0]) > 1:
        t = times[0]
        self.tpot.observe((t[-1] - t[0]) / (len(t) - 1))

  def text(self, engine) -> str:
    stats = engine.stats()
    with self._lock:
      lines = _counter("pdserve_http_responses_total", "HTTP responses by status.",
                       "status", self.statuses)
      lines += _counter("pdserve_responses_total", "Completions by how they ended "
                        "(stop, length, aborted, failed).", "outcome", self.outcomes)
      lines += ["# HELP pdserve_client_disconnects_total Requests whose client went away "
                "before the answer (each aborted).",
                "# TYPE pdserve_client_disconnects_total counter",
                f"pdserve_client_disconnects_total {self.disconnects}"]
      hists = [("pdserve_ttft_seconds", self.ttft, "Time to first token."),
               ("pdserve_tpot_seconds", self.tpot, "Time per output token.")]
      for name, hist, what in hists:
        lines += [f"# HELP {name} {what}", f"# TYPE {name} histogram"] + hist.lines(name)
    engine_counts = {k: stats[k] for k in ("finished", "aborted", "failed", "rejected")}
    lines += _counter("pdserve_engine_requests_total", "Requests the engine ended, by "
                      "kind (its own count).", "outcome", engine_counts)
    gauges = {"pdserve_unfinished_requests": ("Requests queued or running.",
                                              stats["unfinished"]),
              "pdserve_kv_pages_in_use": ("KV pages held, all pools.", stats["pages_in_use"]),
              "pdserve_kv_pages_total": ("KV pages, all pools.",
                                         sum(a.capacity for a in engine.allocators()))}
    for name, (help_, v) in gauges.items():
      lines += [f"# HELP {name} {help_}", f"# TYPE {name} gauge", f"{name} {v}"]
    lines += ["# HELP pdserve_preemptions_total Requests preempted for KV pages.",
              "# TYPE pdserve_preemptions_total counter",
              f"pdserve_preemptions_total {stats['preemptions']}"]
    return "\n".join(lines) + "\n"
