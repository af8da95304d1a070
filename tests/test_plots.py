"""pdserve_jax.plots: each function writes a PNG of the promised pixel size, draws
something, leaves pyplot's backend alone, and rejects bad input before drawing."""

import math
import os
import subprocess
import sys

import numpy as np
import pytest

from pdserve_jax import plots

image = pytest.importorskip("matplotlib.image")
colors = pytest.importorskip("matplotlib.colors")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_png(path):
  assert os.path.getsize(path) > 0
  return image.imread(path)


def pixel_size(size):
  w, h = size
  return round(h * plots.DPI), round(w * plots.DPI)


def colour_pixels(img, colour) -> int:
  """Pixels of `colour` (a matplotlib colour spec) in an RGB(A) image, within the
  anti-aliasing tolerance."""
  rgb = np.asarray(colors.to_rgb(colour))
  return int((np.abs(img[..., :3] - rgb).max(axis=-1) < 0.1).sum())


# A curve across the axes colours hundreds of pixels (measured: 700 to 2,200 here);
# its legend entry alone a few dozen (29 to 103), and a blank plot none.
MIN_SERIES_PIXELS = 300


def assert_each_series_drawn(draw, series: dict, colour_of, tmp_path):
  """Each entry of `series` is drawn: the image with it (drawn last, so the others
  keep their colours) holds MIN_SERIES_PIXELS more pixels of its colour,
  `colour_of(entries, key)`, than the image without it. Fails for a blank plot, and
  for one that drops a series or draws only its legend entry."""
  for key in series:
    others = {k: v for k, v in series.items() if k != key}
    entries = {**others, key: series[key]}
    colour = colour_of(entries, key)
    gained = (colour_pixels(read_png(draw(entries, tmp_path / "with.png")), colour)
              - colour_pixels(read_png(draw(others, tmp_path / "without.png")), colour))
    assert gained >= MIN_SERIES_PIXELS, f"{key!r}: {gained} more pixels of {colour}"


def test_attainment_vs_rate(tmp_path):
  series = {"disaggregated (engine)": ([1, 2, 4], [1.0, 0.95, 0.6]),
            "disaggregated (sim)": ([1, 2, 4], [1.0, 0.97, 0.55]),
            "colocated (engine)": ([4, 1, 2], [0.2, 0.9, 0.7])}  # unsorted rates are fine
  out = tmp_path / "sub" / "att.png"  # the parent is created
  path = plots.attainment_vs_rate(series, out, title="OPT-13B", target=0.9)
  assert path == str(out)
  img = read_png(path)
  assert img.shape[:2] == pixel_size(plots.ATTAINMENT_SIZE)

  def mode_colour(entries, key):  # a mode's curves share the colour of its first
    modes = list(dict.fromkeys(plots._split_label(label)[0] for label in entries))
    return f"C{modes.index(plots._split_label(key)[0])}"

  assert_each_series_drawn(lambda entries, out: plots.attainment_vs_rate(entries, out),
                           series, mode_colour, tmp_path)


def test_attainment_modes_share_a_colour():
  assert plots._split_label("disaggregated (engine)") == ("disaggregated", False)
  assert plots._split_label("disaggregated (sim)") == ("disaggregated", True)
  assert plots._split_label("semi-PD") == ("semi-PD", False)


def test_attainment_target_line_changes_the_image(tmp_path):
  series = {"colocated (engine)": ([1, 2], [0.5, 0.4])}
  a = read_png(plots.attainment_vs_rate(series, tmp_path / "a.png"))
  b = read_png(plots.attainment_vs_rate(series, tmp_path / "b.png", target=0.9))
  assert not np.array_equal(a, b)


@pytest.mark.parametrize("series, match", [
    ({}, "no series"),
    ({"x": ([1, 2], [0.5])}, "2 rates but 1 attainments"),
    ({"x": ([1, math.nan], [0.5, 0.4])}, "NaN"),
    ({"x": ([1, 2], [0.5, 1.5])}, "outside"),
    ({"x": ([], [])}, "no points"),
    ({"x": [1, 2, 3]}, "expected \\(rates, attainments\\)"),
])
def test_attainment_rejects(tmp_path, series, match):
  with pytest.raises(ValueError, match=match):
    plots.attainment_vs_rate(series, tmp_path / "x.png")
  assert not (tmp_path / "x.png").exists()


def test_attainment_rejects_bad_target(tmp_path):
  with pytest.raises(ValueError, match="target"):
    plots.attainment_vs_rate({"x": ([1], [1.0])}, tmp_path / "x.png", target=90)


def test_latency_cdfs(tmp_path):
  rng = np.random.default_rng(0)
  samples = {"colocated": {"ttft_s": list(rng.exponential(0.2, 50)),
                           "tpot_s": list(rng.exponential(0.02, 50))},
             "semi-PD": {"ttft_s": list(rng.exponential(0.1, 50)), "tpot_s": []},
             "empty": {"ttft_s": [], "tpot_s": []}}
  path = plots.latency_cdfs(samples, tmp_path / "cdf.png", ttft_slo=0.4, tpot_slo=0.05)
  img = read_png(path)
  assert img.shape[:2] == pixel_size(plots.CDF_SIZE)
  drawn = {k: v for k, v in samples.items() if k != "empty"}  # "empty" draws nothing
  assert_each_series_drawn(
      lambda entries, out: plots.latency_cdfs(entries, out, ttft_slo=0.4, tpot_slo=0.05),
      drawn, lambda entries, key: f"C{list(entries).index(key)}", tmp_path)


def test_latency_cdfs_all_empty(tmp_path):
  path = plots.latency_cdfs({"a": {"ttft_s": [], "tpot_s": []}}, tmp_path / "e.png")
  assert read_png(path).shape[:2] == pixel_size(plots.CDF_SIZE)


@pytest.mark.parametrize("samples, kw, match", [
    ({}, {}, "no samples"),
    ({"a": {"ttft_s": [0.1, math.nan]}}, {}, "NaN"),
    ({"a": {"ttft_s": [0.1, -1.0]}}, {}, "outside"),
    ({"a": {"ttft": [0.1]}}, {}, "unknown keys"),
    ({"a": [0.1]}, {}, "expected a dict"),
    ({"a": {"ttft_s": [0.1]}}, {"ttft_slo": 0.0}, "ttft_slo must be positive"),
    ({"a": {"ttft_s": [0.1]}}, {"tpot_slo": math.nan}, "NaN"),
])
def test_latency_cdfs_rejects(tmp_path, samples, kw, match):
  with pytest.raises(ValueError, match=match):
    plots.latency_cdfs(samples, tmp_path / "x.png", **kw)


def test_cdf_points():
  assert plots._cdf([3.0, 1.0, 2.0]) == ([1.0, 2.0, 3.0], [1 / 3, 2 / 3, 1.0])


def test_share_over_time(tmp_path):
  history = [(0.0, 0.5), (1.0, 0.6), (2.5, 0.55), (4.0, 0.7)]
  img = read_png(plots.share_over_time(history, tmp_path / "s.png", title="semi-PD"))
  assert img.shape[:2] == pixel_size(plots.SHARE_SIZE)
  # Its one series against a history of one point (a marker, no course).
  point = read_png(plots.share_over_time(history[:1], tmp_path / "p.png", title="semi-PD"))
  assert colour_pixels(img, "C0") - colour_pixels(point, "C0") >= MIN_SERIES_PIXELS


@pytest.mark.parametrize("history, match", [
    ([], "empty"),
    ([(0.0, 0.5), (1.0, math.nan)], "NaN"),
    ([(0.0, 0.5), (1.0, 1.5)], "outside"),
    ([(1.0, 0.5), (0.5, 0.6)], "backwards"),
    ([(0.0, 0.5, 1.0)], "pairs"),
])
def test_share_over_time_rejects(tmp_path, history, match):
  with pytest.raises(ValueError, match=match):
    plots.share_over_time(history, tmp_path / "x.png")


def test_planner_goodput_grows_with_rows(tmp_path):
  rows = [("colocated tp=2", 0.8), ("disagg 1P(tp=1)+1D(tp=1)", 1.3), ("semi-PD x=0.6", 1.1)]
  img3 = read_png(plots.planner_goodput(rows, tmp_path / "g3.png", title="plan"))
  img6 = read_png(plots.planner_goodput(rows * 2, tmp_path / "g6.png"))
  for img, n in ((img3, 3), (img6, 6)):
    height = plots.GOODPUT_BASE_HEIGHT + plots.GOODPUT_ROW_HEIGHT * n
    assert img.shape[:2] == pixel_size((plots.GOODPUT_WIDTH, height))
  assert img6.shape[0] > img3.shape[0]
  # The best bar stands out in its own colour.
  assert colour_pixels(img3, "C2") >= MIN_SERIES_PIXELS
  # With half-widths the bars carry error bars; the size rule is the same.
  img = read_png(plots.planner_goodput([(r[0], r[1], 0.1) for r in rows], tmp_path / "e.png",
                                       highlight_best=False))
  assert img.shape[:2] == img3.shape[:2]


@pytest.mark.parametrize("highlight_best", [True, False])
def test_planner_goodput_draws_each_bar(tmp_path, highlight_best):
  # Each row's bar against the same row at goodput 0 (same rows, so the same size;
  # the largest row stays, so the same scale).
  rows = [("colocated tp=2", 0.8), ("disagg 1P(tp=1)+1D(tp=1)", 1.3), ("semi-PD x=0.6", 1.1),
          ("colocated tp=4", 0.4)]
  full = read_png(plots.planner_goodput(rows, tmp_path / "full.png",
                                        highlight_best=highlight_best))
  for i, (label, _) in enumerate(rows):
    if label.startswith("disagg"):
      continue  # the largest: the scale
    zeroed = rows[:i] + [(label, 0.0)] + rows[i + 1:]
    without = read_png(plots.planner_goodput(zeroed, tmp_path / "zero.png",
                                             highlight_best=highlight_best))
    gained = colour_pixels(full, "C0") - colour_pixels(without, "C0")
    assert gained >= MIN_SERIES_PIXELS, f"{label!r}: {gained} more bar pixels"


@pytest.mark.parametrize("rows, match", [
    ([], "no rows"),
    ([("a", math.nan)], "NaN"),
    ([("a", -1.0)], "outside"),
    ([("a", 1.0, 2.0, 3.0)], "expected \\(label, goodput\\)"),
    ([("a", 1.0, -0.1)], "half_width.*outside"),
    ([("a", "fast")], "sequence of numbers"),
])
def test_planner_goodput_rejects(tmp_path, rows, match):
  with pytest.raises(ValueError, match=match):
    plots.planner_goodput(rows, tmp_path / "x.png")


def test_import_is_cheap_and_leaves_pyplot_alone(tmp_path):
  # A fresh interpreter: importing the module loads no matplotlib, and drawing
  # neither imports pyplot nor changes the configured backend.
  code = f"""
import sys
import pdserve_jax.plots as p
assert "matplotlib" not in sys.modules, "import pdserve_jax.plots loaded matplotlib"
import matplotlib
matplotlib.use("svg")
p.share_over_time([(0.0, 0.5)], {str(tmp_path / "s.png")!r})
assert "matplotlib.pyplot" not in sys.modules
assert matplotlib.get_backend() == "svg", matplotlib.get_backend()
"""
  env = dict(os.environ, PYTHONPATH=ROOT)
  proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
