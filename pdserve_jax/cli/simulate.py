"""absl app: simulate one workload on each listed mode's deployment.

  python -m pdserve_jax.cli.simulate --config=simulate_distserve_fig1 \
      --config.modes=disaggregated,colocated_prefill_first --config.workload.rate=2

The config names the model preset, hardware and latency source
(`cli.sim_runs`), the modes and their deployment blocks (`cli.deployments`), the SLOs
and the workload block (`workloads.DEFAULTS`). Prints one table row per mode;
`--output_json` writes the result (`pdserve_jax.results`), `--plots_dir` its
TTFT/TPOT CDFs and semi-PD share. `num_seeds` > 1 runs the workload drawn from that
many seeds and prints each mode's attainment as mean ± 95% interval.
"""

import time

from pdserve_jax import workloads
from pdserve_jax.cli import common, figures, deployments, sim_runs


def main(cfg, out: common.Outputs):
  start = time.perf_counter()
  setup = sim_runs.setup(cfg)
  by_mode = [deployments.deployment(cfg, m) for m in deployments.modes(cfg)]
  make = workloads.from_config(cfg.workload, setup.model.max_position_embeddings)
  runs = [r for dep in by_mode
          for r in sim_runs.run_seeds(setup, dep, make, cfg.workload.rate or None, cfg)]
  print(common.table(runs))
  summary = sim_runs.seed_summary(runs)
  if summary:
    print(summary)
  plots = (figures.write(out.plots_dir, runs, cfg.ttft_slo, cfg.tpot_slo)
           if out.plots_dir else [])
  common.save("simulate", cfg, out, runs, plots, start)


if __name__ == "__main__":
  common.run(main, "simulate_distserve_fig1")
