"""semi-PD's controllers: how one device's compute is split between the two phases.

`ShareController` time-shares a device between prefill and decode steps as
x : 1 - x (what the JAX engine can do: MPS-style SM caps do not exist in JAX).
Two partitioners move the split online, behind one `after_step` hook the mode
coordinator drives for the engine and the simulator alike:
  * `SloPartitioner` (ours): every window of finished requests, `step` more share
    to the phase whose P90 / SLO is worse (`PartitionerConfig`);
  * `ModelPartitioner`: semi-PD's Algorithm 1 as its paper writes it (arXiv
    2504.19867, section 5): a latency model TTFT = a1 / (x' - lambda) + b1,
    TPOT = a2 / y' + b2 refitted from the observed P90s every window of
    iterations, and the failing phase's SM ratio stepped (at most `max_step`
    steps of `step`) until the model meets its SLO (`ModelPartitionerConfig`).
`ShareScaling` models how a phase slows when it gets a share of a GPU's SMs, and
`SmShares` which shares two MPS-capped phases get when they run at once (caps x
and y may add up to more than 1; the simulator's SM-partitioning what-if).
"""

from __future__ import annotations

import collections
import dataclasses
import math
from typing import Iterable, Optional, Sequence

import numpy as np

from pdserve_jax.core.metrics import percentile
from pdserve_jax.core.request import Request
from pdserve_jax.core.step import DECODE, PREFILL


@dataclasses.dataclass(frozen=True)
class PartitionerConfig:
  """`SloPartitioner` knobs, one set of defaults for the engine, simulator and
  planner: every `window` finished requests, if the worse of P90 TTFT / SLO and
  P90 TPOT / SLO exceeds 1 and the two differ by more than `hysteresis`, the
  lagging phase gets `step` more share, prefill's kept in [min_share, max_share]."""
  window: int = 32
  step: float = 0.05
  min_share: float = 0.1
  max_share: float = 0.9
  hysteresis: float = 0.1

  def check(self) -> None:
    if not isinstance(self.window, int) or self.window < 1:
      raise ValueError(f"partitioner window must be an int >= 1, got {self.window!r}")
    if not 0 < self.step < 1:
      raise ValueError(f"partitioner step must lie in (0, 1), got {self.step}")
    if not 0 < self.min_share <= self.max_share < 1:
      raise ValueError("need 0 < min_share <= max_share < 1, got "
                       f"{self.min_share}, {self.max_share}")
    if not self.hysteresis >= 0:
      raise ValueError(f"hysteresis must be >= 0, got {self.hysteresis}")


def _check_share(x: float) -> float:
  if not 0.0 < x < 1.0:
    raise ValueError(f"prefill share must lie strictly between 0 and 1, got {x}")
  return float(x)


class ShareController:
  """Time-shares one device between the prefill and decode phases as x : 1 - x.

  When both phases have work, the one whose busy time divided by its share is lower
  runs next (a start-time fair queue), so contended busy time follows
  x : 1 - x. A phase with nothing to run forgoes its claim for that time rather
  than building credit, so after an idle spell neither phase can monopolise the
  device to catch up. Changing the share changes numbers only.
  """

  def __init__(self, prefill_share: float = 0.5):
    self._x = _check_share(prefill_share)
    self._vtime = {PREFILL: 0.0, DECODE: 0.0}
    self._idle: set[str] = set()
    self.busy = {PREFILL: 0.0, DECODE: 0.0}

  @property
  def prefill_share(self) -> float:
    return self._x

  def set_share(self, prefill_share: float) -> None:
    self._x = _check_share(prefill_share)
    # The new split governs time from now on; past imbalance is not repaid.
    v = max(self._vtime.values())
    self._vtime = {PREFILL: v, DECODE: v}

  def record(self, phase: str, seconds: float) -> None:
    """Charges `seconds` of device time to `phase`."""
    if phase not in self.busy:
      raise ValueError(f"phase must be {PREFILL!r} or {DECODE!r}, got {phase!r}")
    share = self._x if phase == PREFILL else 1.0 - self._x
    self.busy[phase] += seconds
    self._vtime[phase] += seconds / share

  def pick(self, prefill_ready: bool, decode_ready: bool) -> Optional[str]:
    """The phase to run next, or None when neither has work."""
    vt, idle = self._vtime, self._idle
    for phase, other, ready in ((PREFILL, DECODE, prefill_ready),
                                (DECODE, PREFILL, decode_ready)):
      if not ready:
        idle.add(phase)
      elif phase in idle:
        # Back from idle: start level with the other phase, owed nothing.
        idle.discard(phase)
        vt[phase] = max(vt[phase], vt[other])
    if prefill_ready and decode_ready:
      return PREFILL if vt[PREFILL] <= vt[DECODE] else DECODE
    if prefill_ready:
      return PREFILL
    if decode_ready:
      return DECODE
    return None


class SloPartitioner:
  """Our SLO-aware share adjustment, a simplification of semi-PD's Algorithm 1
  (arXiv 2504.19867) without its latency model (`ModelPartitioner` has it).

  Every `config.window` finished requests, it compares P90 TTFT and P90 TPOT with their SLOs.
  If the worse ratio (P90 / SLO) exceeds 1 and the two ratios differ by more than
  `hysteresis`, the phase with the worse ratio gets `step` more share, within
  [min_share, max_share] for prefill. Requests with one output token have no TPOT
  and only count towards TTFT.
  """

  def __init__(self, ttft_slo: float, tpot_slo: float,
               config: PartitionerConfig = PartitionerConfig(),
               initial_share: float = 0.5, start_time: float = 0.0):
    if not ttft_slo > 0 or not tpot_slo > 0:
      raise ValueError(f"SLOs must be positive, got ttft={ttft_slo} tpot={tpot_slo}")
    config.check()
    if not config.min_share <= initial_share <= config.max_share:
      raise ValueError(f"initial share {initial_share} lies outside [min_share, max_share] "
                       f"= [{config.min_share}, {config.max_share}]")
    self.ttft_slo, self.tpot_slo = ttft_slo, tpot_slo
    self.window, self.step, self.hysteresis = config.window, config.step, config.hysteresis
    self.min_share, self.max_share = config.min_share, config.max_share
    self._share = initial_share
    self._ttfts: list[float] = []
    self._tpots: list[float] = []
    self._history = [(start_time, initial_share)]

  @property
  def share(self) -> float:
    """The current prefill share."""
    return self._share

  @property
  def history(self) -> list[tuple[float, float]]:
    """(time, prefill share) at the start and at every change."""
    return list(self._history)

  def observe(self, req: Request) -> Optional[float]:
    """Takes a finished request; returns the new prefill share when it moved."""
    if req.ttft is None:
      raise ValueError(f"request {req.request_id} has produced no token")
    self._ttfts.append(req.ttft)
    tpot = req.tpot
    if tpot is not None:
      self._tpots.append(tpot)
    if len(self._ttfts) < self.window:
      return None
    r_ttft = percentile(self._ttfts, 90) / self.ttft_slo
    r_tpot = percentile(self._tpots, 90) / self.tpot_slo if self._tpots else 0.0
    self._ttfts, self._tpots = [], []
    if max(r_ttft, r_tpot) <= 1.0 or abs(r_ttft - r_tpot) <= self.hysteresis:
      return None
    if r_ttft > r_tpot:
      new = min(self.max_share, self._share + self.step)
    else:
      new = max(self.min_share, self._share - self.step)
    new = round(new, 9)  # keep repeated steps from drifting off the grid
    if new == self._share:
      return None
    self._share = new
    when = req.finish_time if req.finish_time is not None else req.token_times[-1]
    self._history.append((when, new))
    return new

  def after_step(self, phase: str, seconds: float, finished: Sequence[Request],
                 now: float) -> Optional[tuple[float, float]]:
    """The coordinators' hook, once per step: takes the step's finished requests;
    returns the new (prefill, decode) split x : 1 - x when it moved."""
    moved = None
    for r in finished:
      if r.token_times and self.observe(r) is not None:
        moved = (self._share, 1.0 - self._share)
    return moved


@dataclasses.dataclass(frozen=True)
class ShareScaling:
  """A phase's step time at a share s of the device's SMs, relative to its time
  alone: alpha / (s - lam) + beta (semi-PD's fitted form, its Eq. 4; lam = 0 for
  a step time, where no queue is folded in). The defaults (alpha=1: time
  inversely proportional to the share, the paper's Eq. 1) suit a compute-bound
  phase; memory-bound decode slows less, which `fit` measures from profiles."""
  alpha: float = 1.0
  beta: float = 0.0
  lam: float = 0.0

  def __post_init__(self):
    if not 0 <= self.lam < 1:
      raise ValueError(f"ShareScaling's lam must lie in [0, 1), got {self.lam}")

  def factor(self, share: float) -> float:
    if not self.lam < share <= 1:
      raise ValueError(f"share must lie in ({self.lam}, 1], got {share}")
    f = self.alpha / (share - self.lam) + self.beta
    if not f > 0:
      raise ValueError(f"ShareScaling({self.alpha}, {self.beta}, {self.lam}) gives a "
                       f"non-positive time factor {f} at share {share}")
    return f

  @classmethod
  def fit(cls, samples: Iterable[tuple[float, float]], lam: float = 0.0) -> ShareScaling:
    """Least squares on (share, time at that share / time alone) samples, with the
    pole at `lam` (a profile of step times: 0)."""
    pts = [(float(s), float(r)) for s, r in samples]
    if len(pts) < 2:
      raise ValueError("need at least two (share, slowdown) samples")
    if any(s <= lam for s, _ in pts):
      raise ValueError(f"every sampled share must exceed lam={lam}")
    x = np.array([[1.0 / (s - lam), 1.0] for s, _ in pts])
    (alpha, beta), *_ = np.linalg.lstsq(x, np.array([r for _, r in pts]), rcond=None)
    return cls(float(alpha), float(beta), lam)


# semi-PD's fitted curves (arXiv 2504.19867, Figure 10: Llama3-8B on ShareGPT, one
# A100-80GB, latencies normalised to the phase's latency at 100% of the SMs).
# Prefill's step time follows the paper's Eq. 1, l_x = (100 / x) * l_100; its TTFT
# curve 0.6809 / (x - lambda) + 0.022 adds the M/M/1 queue (lambda = r * l_100), which
# a simulator produces itself, so only the partitioner's model uses it. TPOT has no
# queue in the paper's model (decodes batch on arrival), so its curve is decode's
# step time: 0.6284 / y + 0.3818 (1.0102 at y = 1, as fitted).
PAPER_PREFILL_STEP = ShareScaling(1.0, 0.0)
PAPER_DECODE_STEP = ShareScaling(0.6284, 0.3818)
PAPER_TTFT_CURVE = (0.6809, 0.022)  # (a1, b1) of a1 / (x - lambda) + b1
PAPER_TPOT_CURVE = (0.6284, 0.3818)  # (a2, b2) of a2 / y + b2


@dataclasses.dataclass(frozen=True)
class SmShares:
  """The SM shares two phases run at under MPS caps x (prefill) and y (decode).

  MPS caps each process's SMs (`CUDA_MPS_ACTIVE_THREAD_PERCENTAGE`) and lets the
  caps add up to more than 100% (semi-PD, section 4.3: "each process will compete
  for the resources"). Both phases busy: with x + y <= 1 each gets its cap; beyond,
  the SMs both may use (x + y - 1 of the device) are shared evenly, so each gets
  its own part plus half the overlap ((1 + x - y) / 2 for prefill): (1, 1) runs
  each phase at half the device. A phase running alone gets its cap, or the whole
  device when `work_conserving` (the idle phase's SMs are taken up, as with caps
  (1, 1), or a controller that lifts a cap while the other phase idles).
  Limits: contention for HBM bandwidth beyond what the phases' curves measured
  is not modelled.
  """
  x: float
  y: float
  work_conserving: bool = False

  def __post_init__(self):
    for name, v in (("x", self.x), ("y", self.y)):
      if not 0 < v <= 1:
        raise ValueError(f"SM cap {name} must lie in (0, 1], got {v}")

  def shares(self, prefill_busy: bool, decode_busy: bool) -> tuple[float, float]:
    """(prefill share, decode share) of the device while each phase is or is not
    busy (an idle phase's share is what it would get if it started now)."""
    x, y = self.x, self.y
    if prefill_busy and decode_busy and x + y > 1:
      return (1 + x - y) / 2, (1 + y - x) / 2
    alone = 1.0 if self.work_conserving else None
    sp = alone if (alone and not decode_busy) else x
    sd = alone if (alone and not prefill_busy) else y
    return sp, sd

  @property
  def time_share(self) -> float:
    """The prefill share of device time that x : y gives a time-shared device
    (the paper's normalised ratio x' = x / (x + y))."""
    return self.x / (self.x + self.y)


@dataclasses.dataclass(frozen=True)
class ModelPartitionerConfig:
  """`ModelPartitioner` knobs: Algorithm 1's window_size (`window`, in iterations:
  prefill or decode steps of the replica), step_size (`step`, of the SM ratio),
  max_step and pSLO (`percentile`). The paper gives no values; these are ours.
  `min_share` bounds each cap from below; `history` is how many windows of
  observations the latency model is refitted on."""
  window: int = 128
  step: float = 0.05
  max_step: int = 4
  percentile: float = 90.0
  min_share: float = 0.1
  history: int = 8

  def check(self) -> None:
    for name in ("window", "max_step", "history"):
      v = getattr(self, name)
      if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"partitioner {name} must be an int >= 1, got {v!r}")
    if not 0 < self.step < 1:
      raise ValueError(f"partitioner step must lie in (0, 1), got {self.step}")
    if not 0 < self.percentile <= 100:
      raise ValueError(f"partitioner percentile must lie in (0, 100], got {self.percentile}")
    if not 0 < self.min_share < 1:
      raise ValueError(f"partitioner min_share must lie in (0, 1), got {self.min_share}")


class _InverseModel:
  """latency = a / u + b in u (an accessible share, less the queue's pole), fitted
  to the recent (u, latency) observations; with fewer than two distinct shares
  seen, the paper's curve shape (its b / a) scaled through the latest one."""

  def __init__(self, paper: tuple[float, float], history: int):
    self.ratio = paper[1] / paper[0]
    self.points: collections.deque[tuple[float, float]] = collections.deque(maxlen=history)
    self.a, self.b = paper

  def update(self, u: float, latency: float) -> None:
    self.points.append((1.0 / u, latency))
    inv = np.array([p[0] for p in self.points])
    if len(self.points) >= 2 and np.ptp(inv) > 0.05 * inv.mean():
      x = np.stack([inv, np.ones_like(inv)], axis=1)
      (a, b), *_ = np.linalg.lstsq(x, np.array([p[1] for p in self.points]), rcond=None)
      if a > 0 and b >= 0:  # a physical fit: more share, less latency
        self.a, self.b = float(a), float(b)
        return
    self.a = latency / (1.0 / u + self.ratio)
    self.b = self.ratio * self.a

  def __call__(self, u: float) -> float:
    return math.inf if u <= 0 else self.a / u + self.b


class ModelPartitioner:
  """semi-PD's SLO-aware adjusting algorithm (arXiv 2504.19867, section 5,
  Algorithm 1) with its latency model (Eqs. 1-4).

  Every `window` iterations of the replica, the P-th percentile TTFT and TPOT of
  the requests finished in the window update the model TTFT = a1 / (x' - lam) + b1
  and TPOT = a2 / y' + b2, x' = x / (x + y) and y' = y / (x + y) being the
  normalised SM ratios. lam is the M/M/1 load 100 * r * l_100 of Eq. 3: the
  prefill phase's busy share of the window, on the whole device (time-shared:
  as measured; SM-partitioned: times x', by Eq. 1). If TTFT alone fails its SLO,
  x grows by `step` (past 1 the rest comes off y) until the model meets the SLO
  or `max_step` steps are taken; TPOT alone likewise for y; when both fail (no
  room, the paper's text) or none does, nothing moves.
  """

  def __init__(self, ttft_slo: float, tpot_slo: float, config: ModelPartitionerConfig,
               x: float, y: float, sm_partitioned: bool = False, start_time: float = 0.0):
    if not ttft_slo > 0 or not tpot_slo > 0:
      raise ValueError(f"SLOs must be positive, got ttft={ttft_slo} tpot={tpot_slo}")
    config.check()
    for name, v in (("x", x), ("y", y)):
      if not config.min_share <= v <= 1:
        raise ValueError(f"initial SM ratio {name}={v} lies outside [min_share, 1] = "
                         f"[{config.min_share}, 1]")
    self.ttft_slo, self.tpot_slo, self.config = ttft_slo, tpot_slo, config
    self.sm_partitioned = sm_partitioned
    self._x, self._y = x, y
    self._iters = 0
    self._ttfts: list[float] = []
    self._tpots: list[float] = []
    self._prefill_busy = 0.0
    self._window_start = start_time
    self.ttft_model = _InverseModel(PAPER_TTFT_CURVE, config.history)
    self.tpot_model = _InverseModel(PAPER_TPOT_CURVE, config.history)
    self.lam = 0.0
    self._history = [(start_time, self.share)]
    self._caps = [(start_time, x, y)]

  @property
  def share(self) -> float:
    """The normalised prefill ratio x' = x / (x + y) (a time-shared device's share)."""
    return self._x / (self._x + self._y)

  @property
  def caps(self) -> tuple[float, float]:
    """The SM ratios (x, y)."""
    return self._x, self._y

  @property
  def history(self) -> list[tuple[float, float]]:
    """(time, x') at the start and at every change."""
    return list(self._history)

  @property
  def caps_history(self) -> list[tuple[float, float, float]]:
    """(time, x, y) at the start and at every change."""
    return list(self._caps)

  def after_step(self, phase: str, seconds: float, finished: Sequence[Request],
                 now: float) -> Optional[tuple[float, float]]:
    """The coordinators' hook, once per step of the replica; returns the new
    (x, y) when they moved."""
    self._iters += 1
    if phase == PREFILL:
      self._prefill_busy += seconds
    for r in finished:
      if r.ttft is not None:
        self._ttfts.append(r.ttft)
        if r.tpot is not None:
          self._tpots.append(r.tpot)
    if self._iters % self.config.window:
      return None
    span, busy = now - self._window_start, self._prefill_busy
    ttfts, tpots = self._ttfts, self._tpots
    self._window_start, self._prefill_busy, self._ttfts, self._tpots = now, 0.0, [], []
    if not ttfts or span <= 0:
      return None
    q = self.config.percentile
    ttft = percentile(ttfts, q)
    tpot = percentile(tpots, q) if tpots else None
    xn = self.share
    load = min(busy / span, 1.0)
    self.lam = min(load * xn if self.sm_partitioned else load, 0.99)
    if xn > self.lam:
      self.ttft_model.update(xn - self.lam, ttft)
    if tpot is not None:
      self.tpot_model.update(1.0 - xn, tpot)
    ttft_fails = ttft > self.ttft_slo
    tpot_fails = tpot is not None and tpot > self.tpot_slo
    if ttft_fails == tpot_fails:
      return None
    x, y = self._x, self._y
    for _ in range(self.config.max_step):
      xn = x / (x + y)
      if ttft_fails and self.ttft_model(xn - self.lam) <= self.ttft_slo:
        break
      if tpot_fails and self.tpot_model(1.0 - xn) <= self.tpot_slo:
        break
      x, y = self._grow(x, y) if ttft_fails else self._grow(y, x)[::-1]
    if (x, y) == (self._x, self._y):
      return None
    self._x, self._y = x, y
    self._history.append((now, self.share))
    self._caps.append((now, x, y))
    return x, y

  def _grow(self, mine: float, other: float) -> tuple[float, float]:
    """`mine` + step; what passes 1 comes off `other` (kept >= min_share);
    rounded so repeated steps stay on the grid."""
    mine += self.config.step
    if mine > 1:
      other = max(self.config.min_share, other - (mine - 1))
      mine = 1.0
    return round(mine, 9), round(other, 9)
