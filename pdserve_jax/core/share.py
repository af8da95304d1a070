"""semi-PD's controllers: how one device's time is split between the two phases.

`ShareController` time-shares a device between prefill and decode steps as
x : 1 - x (what the JAX engine can do: MPS-style SM caps do not exist in JAX).
`SloPartitioner` moves x online from finished requests' TTFT and TPOT (semi-PD,
arXiv 2504.19867, Algorithm 1), with the knobs of one `PartitionerConfig`.
`ShareScaling` models how a phase slows when it gets a share of a GPU's SMs
(the simulator's what-if of true SM partitioning).
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Optional

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
  """semi-PD's SLO-aware share adjustment (arXiv 2504.19867, Algorithm 1).

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


@dataclasses.dataclass(frozen=True)
class ShareScaling:
  """semi-PD's slowdown under compute sharing: a phase given a share s of the
  device runs a step in t_100 * (alpha / s + beta), t_100 being its time alone.
  alpha + beta = 1 keeps t(1) = t_100. The defaults (alpha=1: time inversely
  proportional to the share) suit a compute-bound phase; memory-bound decode
  slows less, which `fit` measures."""
  alpha: float = 1.0
  beta: float = 0.0

  def factor(self, share: float) -> float:
    if not 0 < share <= 1:
      raise ValueError(f"share must lie in (0, 1], got {share}")
    return self.alpha / share + self.beta

  @classmethod
  def fit(cls, samples: Iterable[tuple[float, float]]) -> ShareScaling:
    """Least squares on (share, time at that share / time alone) samples."""
    pts = [(float(s), float(r)) for s, r in samples]
    if len(pts) < 2:
      raise ValueError("need at least two (share, slowdown) samples")
    x = np.array([[1.0 / s, 1.0] for s, _ in pts])
    (alpha, beta), *_ = np.linalg.lstsq(x, np.array([r for _, r in pts]), rcond=None)
    return cls(float(alpha), float(beta))
