"""The simulator side of the apps (`simulate`, `plan`, `sweep`): a `Setup` from the
config's `model`, `hardware`, `latency`, `page_size` and `memory_utilization`, and
one simulated run as a result record. No JAX here.
"""

from __future__ import annotations

import os

from pdserve_jax import results
from pdserve_jax.cli import common
from pdserve_jax.sim import simulator as sim

LATENCY_NAMES = ("distserve", "vllm", "roofline")


def setup(cfg) -> sim.Setup:
  """The simulator's fixed part; `latency` is "distserve", "vllm", "roofline" or a
  profiled JSON (`cli.profile`) relative to the current directory, plus the
  optional `overheads` ("none", the default, or "distserve": DistServe's per-step
  costs, `sim.latency.overheads`; or "vllm"), the optional `latency_params`: the
  roofline's or a TPU cost table's efficiency factors by name, the optional
  `distserve_compat` (False: DistServe's simulator's conventions, for
  cross-checks with it; `sim.simulator.Setup`), and the optional `prefix_cache`
  (default True)."""
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
    latency = latency_source(kind, model, hw, overheads=cfg.get("overheads", "none"),
                             **dict(cfg.get("latency_params", None) or {}))
  except (ValueError, KeyError, TypeError) as e:
    raise common.ConfigError(f"latency: {e}") from None
  return sim.Setup(model, hw, latency, page_size=cfg.page_size,
                   memory_utilization=cfg.memory_utilization,
                   distserve_compat=bool(cfg.get("distserve_compat", False)),
                   prefix_cache=cfg.get("prefix_cache", True))


def run(setup: sim.Setup, dep, requests, rate, ttft_slo: float, tpot_slo: float,
        latency_model: str, **extra) -> dict:
  """Simulates `requests` on `dep`; the run's result record."""
  res = sim.simulate(requests, setup, dep, ttft_slo, tpot_slo)
  history = next(iter(res.share_history.values()), [])
  return results.run_record(dep.mode, "simulator", dep, rate, res.requests,
                            ttft_slo, tpot_slo, history, latency_model=latency_model,
                            utilization=res.utilization, prefix_cache=res.prefix, **extra)


def run_seeds(setup: sim.Setup, dep, make, rate, cfg) -> list[dict]:
  """`run` on the workload drawn from `num_seeds` seeds (config, default 1) from the
  workload block's seed on; each record names its seed."""
  n = cfg.get("num_seeds", 1)
  if not isinstance(n, int) or n < 1:
    raise common.ConfigError(f"num_seeds: must be an int >= 1, got {n!r}")
  first = cfg.workload.seed
  return [run(setup, dep, make(rate, seed), rate, cfg.ttft_slo, cfg.tpot_slo, cfg.latency,
              seed=seed) for seed in range(first, first + n)]


def seed_summary(runs: list[dict]) -> str:
  """Attainment per mode and rate as mean ± 95% half-width over seeds, for the
  groups that ran more than one seed ("" when none did)."""
  from pdserve_jax.sim.goodput import Estimate

  groups = {}
  for r in runs:
    if r.get("seed") is not None:
      groups.setdefault((r["mode"], r["executor"], r["rate_rps"]), []).append(r)
  rows = []
  for (mode, executor, rate), group in groups.items():
    if len(group) > 1:
      e = Estimate(tuple(g["summary"]["attainment"] for g in group),
                   tuple(g["seed"] for g in group))
      at = "" if rate is None else f" at {rate:g} req/s"
      rows.append(f"{mode} ({executor}){at}: attainment {e.mean:.1%} ± {e.half_width:.1%} "
                  f"over seeds {list(e.seeds)}")
  return "\n".join(rows)
