"""Simulates one deployment on a workload and prints its latency summary as JSON.

  python -m pdserve_jax.cli.simulate --config=configs/simulate_distserve_fig1.py \
      --config.rate=2.0 --output_json=/tmp/sim.json

The config (`get_config()`, ml_collections) names the model preset, hardware,
latency source, deployment and workload; see `configs/simulate_*.py`. Relative
paths in it are relative to the repository root.
"""

from __future__ import annotations

import json
import os

from absl import app
from absl import flags
from ml_collections import config_flags

from pdserve_jax import deploy, workloads
from pdserve_jax.model.config import get_preset
from pdserve_jax.sim import simulator

_CONFIG = config_flags.DEFINE_config_file("config", None, "Simulation config file.")
_OUTPUT = flags.DEFINE_string("output_json", None, "Where to write the summary as JSON.")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv):
  del argv
  cfg = _CONFIG.value
  if cfg is None:
    raise app.UsageError("--config is required")
  if cfg.workload == "synthetic" and not cfg.rate > 0:
    raise app.UsageError("a synthetic workload needs --config.rate > 0")
  setup = simulator.setup_from_config(cfg, ROOT)
  make = workloads.workload_from_config(cfg, get_preset(cfg.model).max_position_embeddings,
                                        ROOT)
  dep = deploy.from_config(cfg)
  res = simulator.simulate(make(cfg.rate), setup, dep, cfg.ttft_slo, cfg.tpot_slo)
  summary = res.summary(cfg.ttft_slo, cfg.tpot_slo)
  summary["deployment"] = repr(dep)
  text = json.dumps(summary, indent=1)
  print(text)
  if _OUTPUT.value:
    with open(_OUTPUT.value, "w") as f:
      f.write(text)


if __name__ == "__main__":
  app.run(main)
