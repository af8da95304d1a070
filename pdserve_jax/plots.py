"""Figures for experiment outputs: one PNG per call, the file's path returned.

Each function checks its input (lengths, NaN, ranges) and raises ValueError naming
the bad series before drawing anything. It draws on a bare `Figure` with an Agg
canvas, never through pyplot, so it neither reads nor changes the process-wide
backend (a notebook's inline backend stays as it was), and it imports matplotlib
on the first call, so `import pdserve_jax.plots` stays cheap. No data is computed
here: the callers pass rates, attainments, latencies and goodputs they measured or
simulated.
"""

from __future__ import annotations

import math
import os
from typing import Optional, Sequence

DPI = 120
# Figure sizes in inches; the PNG is size * DPI pixels (no tight bounding box, so
# callers and tests can rely on the pixel size).
ATTAINMENT_SIZE = (7.0, 4.5)
CDF_SIZE = (11.0, 4.5)
SHARE_SIZE = (8.0, 3.5)
GOODPUT_WIDTH = 8.0
# planner_goodput's height: a fixed margin plus one band per placement.
GOODPUT_BASE_HEIGHT, GOODPUT_ROW_HEIGHT = 1.5, 0.4

# A variant whose parenthetical names the simulator is drawn dashed; anything else
# (the engine, or no parenthetical) solid, so a mode's two curves read as a pair.
_SIM_WORDS = ("sim",)


def _numbers(what: str, values: Sequence[float], lo: float = -math.inf,
             hi: float = math.inf) -> list[float]:
  """`values` as floats, every one finite and in [lo, hi]; ValueError otherwise."""
  try:
    out = [float(v) for v in values]
  except (TypeError, ValueError) as e:
    raise ValueError(f"{what}: expected a sequence of numbers ({e})") from None
  for i, v in enumerate(out):
    if math.isnan(v):
      raise ValueError(f"{what}[{i}] is NaN")
    if not math.isfinite(v):
      raise ValueError(f"{what}[{i}] is not finite ({v})")
    if not lo <= v <= hi:
      raise ValueError(f"{what}[{i}] = {v} is outside [{lo}, {hi}]")
  return out


def _fraction(what: str, value: Optional[float]) -> Optional[float]:
  return None if value is None else _numbers(what, [value], 0.0, 1.0)[0]


def _positive(what: str, value: Optional[float]) -> Optional[float]:
  if value is None:
    return None
  v = _numbers(what, [value])[0]
  if v <= 0:
    raise ValueError(f"{what} must be positive, got {v}")
  return v


def _figure(size: tuple[float, float]):
  # Imported here, not at module level: matplotlib costs ~0.5 s to import.
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  fig = Figure(figsize=size, dpi=DPI, layout="constrained")
  FigureCanvasAgg(fig)  # attaches itself as fig.canvas; no global backend involved
  return fig


def _save(fig, path) -> str:
  path = os.fspath(path)
  parent = os.path.dirname(path)
  if parent:
    os.makedirs(parent, exist_ok=True)
  fig.savefig(path, dpi=DPI, format="png")
  return path


def _percent_axis(axis) -> None:
  from matplotlib.ticker import PercentFormatter
  axis.set_major_formatter(PercentFormatter(xmax=1.0, decimals=0))


def _split_label(label: str) -> tuple[str, bool]:
  """'disaggregated (sim)' -> ('disaggregated', True); the mode is the text before
  ' (', and the curve is a simulation when its parenthetical says so."""
  mode, sep, rest = label.partition(" (")
  return mode, bool(sep) and rest.rstrip(")").strip().lower() in _SIM_WORDS


def attainment_vs_rate(series: dict[str, tuple[list[float], list[float]]], path,
                       title: str = "", target: Optional[float] = None,
                       xlabel: str = "arrival rate (req/s)") -> str:
  """SLO attainment against arrival rate, one curve per label (DistServe Fig. 8).

  `series` maps a label to (rates in req/s, attainments in [0, 1]). Labels sharing
  the text before ' (' are one mode and share a colour: 'X (engine)' solid with
  markers, 'X (sim)' dashed. `target` (a fraction) draws the goal as a line.
  """
  if not series:
    raise ValueError("attainment_vs_rate: no series")
  curves = []
  for label, pair in series.items():
    try:
      rates, atts = pair
    except (TypeError, ValueError):
      raise ValueError(f"series {label!r}: expected (rates, attainments)") from None
    rates = _numbers(f"series {label!r} rates", rates, lo=0.0)
    atts = _numbers(f"series {label!r} attainments", atts, 0.0, 1.0)
    if len(rates) != len(atts):
      raise ValueError(f"series {label!r}: {len(rates)} rates but {len(atts)} attainments")
    if not rates:
      raise ValueError(f"series {label!r} has no points")
    order = sorted(range(len(rates)), key=rates.__getitem__)
    curves.append((str(label), [rates[i] for i in order], [atts[i] for i in order]))
  target = _fraction("target", target)

  fig = _figure(ATTAINMENT_SIZE)
  ax = fig.add_subplot()
  colours: dict[str, str] = {}
  for label, rates, atts in curves:
    mode, sim = _split_label(label)
    colour = colours.setdefault(mode, f"C{len(colours) % 10}")
    ax.plot(rates, atts, color=colour, linestyle="--" if sim else "-",
            marker="x" if sim else "o", markersize=4, linewidth=1.6, label=label)
  if target is not None:
    ax.axhline(target, color="0.3", linestyle=":", linewidth=1.2,
               label=f"target {target:.0%}")
  ax.set_xlabel(xlabel)
  ax.set_ylabel("SLO attainment")
  ax.set_ylim(0.0, 1.04)
  ax.set_xlim(left=0.0)
  _percent_axis(ax.yaxis)
  ax.grid(True, alpha=0.35)
  ax.legend(loc="lower left", fontsize="small")
  if title:
    ax.set_title(title)
  return _save(fig, path)


def _cdf(values: list[float]) -> tuple[list[float], list[float]]:
  """Points of the empirical CDF as a step: x sorted, y = rank / n."""
  xs = sorted(values)
  n = len(xs)
  return xs, [(i + 1) / n for i in range(n)]


def latency_cdfs(samples: dict[str, dict[str, list[float]]], path,
                 ttft_slo: Optional[float] = None, tpot_slo: Optional[float] = None) -> str:
  """Empirical CDFs of TTFT (left) and TPOT (right), in ms, one curve per label.

  `samples` maps a label to {"ttft_s": [...], "tpot_s": [...]} in seconds; a
  missing or empty list leaves that label out of its panel (a panel with no data
  says so). SLOs, in seconds, draw vertical lines.
  """
  if not samples:
    raise ValueError("latency_cdfs: no samples")
  keys = ("ttft_s", "tpot_s")
  data = {}
  for label, per_metric in samples.items():
    if not isinstance(per_metric, dict):
      raise ValueError(f"samples {label!r}: expected a dict with keys {keys}")
    unknown = set(per_metric) - set(keys)
    if unknown:
      raise ValueError(f"samples {label!r}: unknown keys {sorted(unknown)}; expected {keys}")
    data[str(label)] = {k: _numbers(f"samples {label!r} {k}", per_metric.get(k, ()), lo=0.0)
                        for k in keys}
  slos = {"ttft_s": _positive("ttft_slo", ttft_slo), "tpot_s": _positive("tpot_slo", tpot_slo)}

  fig = _figure(CDF_SIZE)
  axes = fig.subplots(1, 2)
  names = {"ttft_s": "TTFT", "tpot_s": "TPOT"}
  for ax, key in zip(axes, keys):
    drawn = False
    for i, (label, per_metric) in enumerate(data.items()):
      values = per_metric[key]
      if not values:
        continue
      xs, ys = _cdf([v * 1e3 for v in values])
      ax.step(xs, ys, where="post", color=f"C{i % 10}", linewidth=1.6,
              label=f"{label} (n={len(values)})")
      drawn = True
    if slos[key] is not None:
      ax.axvline(slos[key] * 1e3, color="0.2", linestyle="--", linewidth=1.2,
                 label=f"SLO {slos[key] * 1e3:g} ms")
      drawn = True
    if not any(per_metric[key] for per_metric in data.values()):
      ax.text(0.5, 0.5, "no samples", transform=ax.transAxes, ha="center", va="center",
              color="0.4")
    ax.set_xlabel(f"{names[key]} (ms)")
    ax.set_ylabel("fraction of requests")
    ax.set_ylim(0.0, 1.02)
    ax.set_xlim(left=0.0)
    _percent_axis(ax.yaxis)
    ax.set_title(f"{names[key]} CDF")
    ax.grid(True, alpha=0.35)
    if drawn:
      ax.legend(loc="lower right", fontsize="small")
  return _save(fig, path)


def share_over_time(history: list[tuple[float, float]], path, title: str = "") -> str:
  """semi-PD's prefill share (x of x:y) against time, as a step plot.

  `history` is [(time_s, prefill_share)] with times non-decreasing and shares in
  [0, 1]; each share holds until the next entry.
  """
  if not history:
    raise ValueError("share_over_time: empty history")
  try:
    times, shares = zip(*history)
  except (TypeError, ValueError):
    raise ValueError("share_over_time: history must be (time_s, share) pairs") from None
  times = _numbers("history times", times)
  shares = _numbers("history shares", shares, 0.0, 1.0)
  for i in range(1, len(times)):
    if times[i] < times[i - 1]:
      raise ValueError(f"history times go backwards at [{i}]: {times[i - 1]} -> {times[i]}")

  fig = _figure(SHARE_SIZE)
  ax = fig.add_subplot()
  ax.step(times, shares, where="post", color="C0", linewidth=1.8, label="prefill share")
  ax.plot(times, shares, "o", color="C0", markersize=3)
  ax.set_xlabel("time (s)")
  ax.set_ylabel("prefill share of compute")
  ax.set_ylim(0.0, 1.02)
  _percent_axis(ax.yaxis)
  ax.grid(True, alpha=0.35)
  ax.legend(loc="best", fontsize="small")
  if title:
    ax.set_title(title)
  return _save(fig, path)


def planner_goodput(rows: list[tuple], path, title: str = "",
                    highlight_best: bool = True) -> str:
  """Goodput per device (req/s/device) of each placement as horizontal bars, the
  best at the top. A row is (label, goodput) or (label, goodput, half-width of its
  interval), drawn as an error bar. The figure grows by one band per row
  (GOODPUT_ROW_HEIGHT)."""
  if not rows:
    raise ValueError("planner_goodput: no rows")
  parsed = []
  for i, row in enumerate(rows):
    if not isinstance(row, (tuple, list)) or len(row) not in (2, 3):
      raise ValueError(f"rows[{i}]: expected (label, goodput) or (label, goodput, "
                       "half_width)")
    label, value = row[0], row[1]
    value = _numbers(f"rows[{i}] ({label!r}) goodput", [value], lo=0.0)[0]
    err = _numbers(f"rows[{i}] ({label!r}) half_width", [row[2]], lo=0.0)[0] if len(
        row) == 3 else 0.0
    parsed.append((str(label), value, err))
  parsed.sort(key=lambda r: -r[1])  # stable: ties keep the caller's order

  height = GOODPUT_BASE_HEIGHT + GOODPUT_ROW_HEIGHT * len(parsed)
  fig = _figure((GOODPUT_WIDTH, height))
  ax = fig.add_subplot()
  labels = [r[0] for r in parsed]
  values = [r[1] for r in parsed]
  errors = [r[2] for r in parsed]
  ys = list(range(len(parsed)))
  # The planner's pick stands out.
  colours = (["C2"] + ["C0"] * (len(parsed) - 1)) if highlight_best else ["C0"] * len(parsed)
  bars = ax.barh(ys, values, color=colours, label="goodput",
                 xerr=errors if any(errors) else None, capsize=4)
  ax.bar_label(bars, labels=[f"{v:.3g}" + (f" ± {e:.2g}" if e else "")
                             for v, e in zip(values, errors)], padding=3, fontsize="small")
  ax.set_yticks(ys, labels=labels)
  ax.invert_yaxis()  # best first, read top-down
  ax.set_xlabel("goodput per device (req/s/device)" + (", ± 95%" if any(errors) else ""))
  # Room for the value labels beyond the longest bar (and its error bar).
  ax.set_xlim(0.0, max(v + e for v, e in zip(values, errors)) * (1.45 if any(errors) else 1.15)
              or 1e-9)
  ax.grid(True, axis="x", alpha=0.35)
  if highlight_best:
    ax.legend(handles=[bars[0]], labels=["best placement"], loc="lower right",
              fontsize="small")
  if title:  # over the whole figure: the long labels push the axes right
    fig.suptitle(title)
  return _save(fig, path)
