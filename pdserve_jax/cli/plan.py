"""Plans placements: goodput per device of disaggregated, semi-PD and colocated
serving, ranked, as a printed table and JSON. Relative paths in the config are
relative to the repository root.

  python -m pdserve_jax.cli.plan --config=configs/plan_opt13b.py \
      --config.ttft_slo=0.25 --output_json=/tmp/plan.json
"""

from __future__ import annotations

import json
import os
import time

from absl import app
from absl import flags
from ml_collections import config_flags

from pdserve_jax import workloads
from pdserve_jax.model.config import get_preset
from pdserve_jax.serving.share import PartitionerConfig
from pdserve_jax.sim import planner, simulator

_CONFIG = config_flags.DEFINE_config_file("config", None, "Planner config file.")
_OUTPUT = flags.DEFINE_string("output_json", None, "Where to write the plan as JSON.")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build_spec(cfg, base_dir: str = ROOT) -> planner.PlanSpec:
  """A `PlanSpec` from a config (see `configs/plan_opt13b.py`); relative paths in it
  are relative to `base_dir`."""
  context = get_preset(cfg.model).max_position_embeddings
  return planner.PlanSpec(
      setup=simulator.setup_from_config(cfg, base_dir),
      workload=workloads.workload_from_config(cfg, context, base_dir), ttft_slo=cfg.ttft_slo,
      tpot_slo=cfg.tpot_slo, num_nodes=cfg.num_nodes, tp_options=tuple(cfg.tp_options),
      pp_options=tuple(cfg.pp_options), max_batch=cfg.max_batch,
      max_prefill_tokens=cfg.max_prefill_tokens, chunk_tokens=cfg.chunk_tokens,
      target=cfg.target, tol=cfg.tol, target_rate=cfg.target_rate or None,
      semi_pd_shares=tuple(cfg.semi_pd_shares), semi_pd_concurrent=cfg.semi_pd_concurrent,
      partitioner=PartitionerConfig(**dict(cfg.partitioner)))


def main(argv):
  del argv
  cfg = _CONFIG.value
  if cfg is None:
    raise app.UsageError("--config is required")
  start = time.perf_counter()
  result = planner.plan(build_spec(cfg), tuple(cfg.modes))
  seconds = time.perf_counter() - start
  print(result.table())
  print(f"\nsearch took {seconds:.1f} s")
  out = result.to_dict()
  out["search_seconds"] = seconds
  out["config"] = cfg.to_dict()
  if _OUTPUT.value:
    with open(_OUTPUT.value, "w") as f:
      json.dump(out, f, indent=1, default=str)


if __name__ == "__main__":
  app.run(main)
