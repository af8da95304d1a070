"""absl app: SLO attainment against arrival rate per mode (DistServe's Figure 8),
from the real engine and from the simulator, on the same axes.

  python -m pdserve_jax.cli.sweep --config=sweep_demo [--plots_dir=DIR]
  python -m pdserve_jax.cli.sweep --config=sweep_opt13b   # simulator only

With `run_engine`, each mode's engine is built once and serves the workload block
at each of `rates`; with `latency="profile"` the simulator's latency model is
that engine's own runners, timed just before it serves (`runtime.profiler.setup_from_engine`,
as `benchmarks/sim_vs_engine.py` does), and the simulator serves the very same
requests. Without `run_engine` only the simulator runs, on a named latency model
("distserve", "roofline" or a profiled JSON). Writes to `--plots_dir` (default
sweep_plots): attainment vs rate, TTFT/TPOT CDFs per rate, the semi-PD share
over time; `--output_json` the result with every run.

Limits: an engine serves its rates one after the other, so a semi-PD
partitioner starts each rate where the last one left it, while the simulator
starts every rate from `semi_pd.prefill_share`. Engine timings on a shared CPU
drift by tens of percent from minute to minute.
"""

import os
import time

# One core's work per virtual device, as benchmarks/sim_vs_engine.py runs: two
# devices then slow each other only as much as the profiled overlap says.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                      "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")

from pdserve_jax.cli import engine_runs  # noqa: E402  (before anything imports jax)
from pdserve_jax.cli import common, figures, deployments, sim_runs  # noqa: E402
from pdserve_jax import results, workloads  # noqa: E402

RULES = {"target": common.fraction, "profile_reps": common.at_least(1)}


def engine_and_sim(cfg, by_mode: dict, rates, setup) -> list:
  """Each mode's engine at every rate, and the simulator on the same requests."""
  import pdserve_jax as pdj

  profiled = setup is None
  ec = engine_runs.engine_config(cfg, log_steps=profiled)
  make = workloads.from_config(cfg.workload, ec.max_seq_len,
                               engine_runs.max_prompt_len(by_mode.values(), ec))
  model = engine_runs.load_model(cfg)
  engine_runs.check_servable(by_mode, model)
  latency = "profiled" if profiled else cfg.latency
  runs = []
  with common.progress(len(by_mode) * len(rates), "sweep", "run") as bar:
    for mode, dep in by_mode.items():
      bar.set_postfix_str(f"{mode}: warm-up")
      with pdj.Engine(model, dep, ec) as engine:
        if profiled:
          bar.set_postfix_str(f"{mode}: profiling")
          from pdserve_jax.runtime import profiler  # loads jax, as the engine has already
          setup = profiler.setup_from_engine(engine, cfg.profile_reps)
        for rate in rates:
          bar.set_postfix_str(f"{mode} at {rate:g}/s")
          requests = make(rate)
          report = engine_runs.serve_workload(engine, requests, f"{mode} {rate:g}/s")
          runs.append(results.run_record(mode, "engine", dep, rate, report.requests,
                                         cfg.ttft_slo, cfg.tpot_slo, report.share_history,
                                         engine_stats=engine.stats()))
          runs.append(sim_runs.run(setup, dep, requests, rate, cfg.ttft_slo, cfg.tpot_slo,
                                     latency))
          bar.update(1)
  return runs


def sim_only(cfg, by_mode: dict, rates, setup) -> list:
  make = workloads.from_config(cfg.workload, setup.model.max_position_embeddings)
  runs = []
  with common.progress(len(by_mode) * len(rates), "sweep (simulator)", "run") as bar:
    for dep in by_mode.values():
      for rate in rates:
        runs += sim_runs.run_seeds(setup, dep, make, rate, cfg)
        bar.update(1)
  return runs


def main(cfg, out: common.Outputs):
  start = time.perf_counter()
  common.check(cfg, {**common.RULES, **RULES})
  workloads.check_config(cfg.workload)
  by_mode = {m: deployments.deployment(cfg, m) for m in deployments.modes(cfg)}
  rates = sorted(set(common.numbers("rates", cfg.rates)))
  if cfg.latency == "profile" and not cfg.run_engine:
    raise common.ConfigError("latency: 'profile' times the engine's runners; with "
                             "run_engine=False name a latency model ('distserve', "
                             "'roofline' or a profiled JSON)")
  setup = None if cfg.latency == "profile" else sim_runs.setup(cfg)
  runs = (engine_and_sim if cfg.run_engine else sim_only)(cfg, by_mode, rates, setup)
  print(common.table(runs))
  summary = sim_runs.seed_summary(runs)
  if summary:
    print(summary)
  plots = []
  if out.plots_dir:
    title = (f"{cfg.model}: {cfg.workload.num_requests} requests per rate, SLOs TTFT "
             f"{cfg.ttft_slo * 1e3:g} ms, TPOT {cfg.tpot_slo * 1e3:g} ms")
    plots = figures.write(out.plots_dir, runs, cfg.ttft_slo, cfg.tpot_slo, title, cfg.target,
                          cdf_per_rate=True)
    print(f"plots in {os.path.abspath(out.plots_dir)}")
  common.save("sweep", cfg, out, runs, plots, start)


if __name__ == "__main__":
  common.run(main, "sweep_demo", plots_dir="sweep_plots")
