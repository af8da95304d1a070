"""When an elastic disaggregated deployment moves an instance between roles.

`RoleController` reads the SLO attainment of each phase and says when one more
instance should serve prefill or decode; `core.roles.ElasticCoordinator` carries the
move out (drain, then serve the other phase). One rule for the engine and the
simulator, with the knobs of one `ElasticConfig`:

  TTFT samples come from requests as they get their first token (a burst of long
  prompts shows at once), TPOT samples from requests as they finish with two tokens
  or more. Once either kind has `window` samples, the attainment of each phase is
  the share of its samples within its SLO (a phase with no sample counts as meeting
  it). If both reach `target`, nothing moves. Otherwise, if one phase's attainment is below the
  other's by more than `hysteresis`, the worse phase gets one more instance (never
  leaving the other with fewer than its minimum). Samples then start afresh; while a
  move is under way (an instance draining), the controller holds: samples taken
  then describe the old split and are dropped, so one move completes before the
  next is judged (no flapping on the lag of a drain).

Like semi-PD's `SloPartitioner` (arXiv 2504.19867, Algorithm 1) this is a windowed
SLO comparison with hysteresis; Dynamo's planner and llm-d's role balancing act on
the same two signals (TTFT and ITL targets) at the scale of replicas. No JAX here.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from pdserve_jax.core.request import Request
from pdserve_jax.core.step import DECODE, PREFILL


@dataclasses.dataclass(frozen=True)
class ElasticConfig:
  """`RoleController` knobs (see the module docstring), one set of defaults for the
  engine, the simulator and the planner."""
  window: int = 32
  target: float = 0.9
  hysteresis: float = 0.1
  min_prefill: int = 1
  min_decode: int = 1

  def check(self) -> None:
    for name in ("window", "min_prefill", "min_decode"):
      v = getattr(self, name)
      if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"elastic {name} must be an int >= 1, got {v!r}")
    if not 0 < self.target <= 1:
      raise ValueError(f"elastic target must lie in (0, 1], got {self.target}")
    if not 0 <= self.hysteresis < 1:
      raise ValueError(f"elastic hysteresis must lie in [0, 1), got {self.hysteresis}")


class RoleController:
  """Says which phase should gain an instance, from the SLO attainment of each (see
  the module docstring). `history` records (time, prefill instances, decode
  instances) at the start and at every completed move."""

  def __init__(self, ttft_slo: float, tpot_slo: float, config: ElasticConfig,
               num_prefill: int, num_decode: int, start_time: float = 0.0):
    if not ttft_slo > 0 or not tpot_slo > 0:
      raise ValueError(f"SLOs must be positive, got ttft={ttft_slo} tpot={tpot_slo}")
    config.check()
    self.ttft_slo, self.tpot_slo, self.config = ttft_slo, tpot_slo, config
    self._ttft_met: list[bool] = []
    self._tpot_met: list[bool] = []
    self.holding = False
    self.history = [(start_time, num_prefill, num_decode)]

  def first_token(self, req: Request) -> None:
    """`req` has just produced its first token."""
    if not self.holding:
      self._ttft_met.append(req.token_times[0] - req.arrival_time <= self.ttft_slo)

  def finished(self, req: Request) -> None:
    """`req` has just ended."""
    tpot = req.tpot
    if tpot is not None and not self.holding:
      self._tpot_met.append(tpot <= self.tpot_slo)

  def decide(self, num_prefill: int, num_decode: int) -> Optional[str]:
    """The phase that should gain an instance now (PREFILL or DECODE), or None;
    `num_prefill`, `num_decode`: the instances serving each phase now."""
    cfg = self.config
    if self.holding or max(len(self._ttft_met), len(self._tpot_met)) < cfg.window:
      return None
    ttft = sum(self._ttft_met) / len(self._ttft_met) if self._ttft_met else 1.0
    tpot = sum(self._tpot_met) / len(self._tpot_met) if self._tpot_met else 1.0
    self._ttft_met, self._tpot_met = [], []
    if min(ttft, tpot) >= cfg.target or abs(ttft - tpot) <= cfg.hysteresis:
      return None
    if ttft < tpot and num_decode > cfg.min_decode:
      return PREFILL
    if tpot < ttft and num_prefill > cfg.min_prefill:
      return DECODE
    return None

  def hold(self) -> None:
    """A move has started: no samples and no decisions until `moved`."""
    self.holding = True
    self._ttft_met, self._tpot_met = [], []

  def moved(self, now: float, num_prefill: int, num_decode: int) -> None:
    """The move completed at `now`; the instances now serving each phase."""
    self.holding = False
    self.history.append((now, num_prefill, num_decode))
