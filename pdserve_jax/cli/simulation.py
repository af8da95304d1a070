"""The simulator side of the apps (`simulate`, `plan`, `sweep`): a `Setup` from the
config's `model`, `hardware`, `latency`, `page_size` and `memory_utilization`, and
one simulated run as a result record. No JAX here.
"""

from __future__ import annotations

import os

from pdserve_jax import results
from pdserve_jax.cli import common, modes
from pdserve_jax.sim import simulator as sim

LATENCY_NAMES = ("distserve", "roofline")


def setup(cfg) -> sim.Setup:
  """The simulator's fixed part; `latency` is "distserve", "roofline" or a
  profiled JSON (`cli.profile`) relative to the current directory."""
  from pdserve_jax.model.config import get_preset
  from pdserve_jax.sim.hardware import get_hardware
  from pdserve_jax.sim.latency import latency_source

  common.check(cfg, common.RULES)
  try:
    model = get_preset(cfg.model)
  except ValueError as e:
    raise common.ConfigError(f"model: {e}") from None
  try:
    hw = get_hardware(cfg.hardware)
  except ValueError as e:
    raise common.ConfigError(f"hardware: {e}") from None
  kind = cfg.latency
  if kind not in LATENCY_NAMES:
    kind = os.path.abspath(kind)
    if not os.path.isfile(kind):
      raise common.ConfigError(f"latency: no such file {cfg.latency!r} (relative to "
                               f"{os.getcwd()}); or one of {', '.join(LATENCY_NAMES)}")
  try:
    latency = latency_source(kind, model, hw)
  except (ValueError, KeyError) as e:
    raise common.ConfigError(f"latency: {e}") from None
  return sim.Setup(model, hw, latency, page_size=cfg.page_size,
                   memory_utilization=cfg.memory_utilization)


def run(setup: sim.Setup, dep, requests, rate, ttft_slo: float, tpot_slo: float,
        latency_model: str, **extra) -> dict:
  """Simulates `requests` on `dep`; the run's result record."""
  res = sim.simulate(requests, setup, dep, ttft_slo, tpot_slo)
  history = next(iter(res.share_history.values()), [])
  return results.run_record(modes.mode_of(dep), "simulator", dep, rate, res.requests,
                            ttft_slo, tpot_slo, history, latency_model=latency_model,
                            utilization=res.utilization, **extra)
