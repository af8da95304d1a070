"""absl app: SLO attainment against arrival rate per mode (DistServe's Figure 8),
from the real engine and from the simulator, on the same axes.

  python -m pdserve_jax.cli.sweep --config=sweep_demo [--plots_dir=DIR]
  python -m pdserve_jax.cli.sweep --config=sweep_opt13b   # simulator only
  python -m pdserve_jax.cli.sweep --config=sweep_demo --config.goodput=True

With `run_engine`, each mode's engine is built once and serves the workload block
at each of `rates`; with `latency="profile"` the simulator's latency model is
that engine's own runners, timed just before it serves (`runtime.profiler.setup_from_engine`,
as `benchmarks/sim_vs_engine.py` does), and the simulator serves the very same
requests. Without `run_engine` only the simulator runs, on a named latency model
("distserve", "roofline" or a profiled JSON). Writes to `--plots_dir` (default
sweep_plots): attainment vs rate, TTFT/TPOT CDFs per rate, the semi-PD share
over time; `--output_json` the result with every run.

With `goodput` (and `run_engine`), the knee itself: per mode, the goodput by
bisection on the engine (each point a real run of the workload) and in the
simulator on the same requests, seed by seed (`goodput_seeds`), both with one
procedure (`metrics.goodput_search` between a quarter of the simulated capacity
and twice it, to `goodput_tol`), printed with 95% intervals and their ratio; the simulator with
each instance's host loop its own, with one engine thread for all
(`Setup.shared_host`, as the engine runs), and with that and its steps slowed by
as much as the engine's own steps strayed from their profile in the seed's runs
(what is left of the gap is then the simulator's, not the machine's speed).
`rates` are not used then.

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

RULES = {"target": common.fraction, "profile_reps": common.at_least(1),
         "goodput_seeds": common.at_least(1), "goodput_tol": common.positive}


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


def knee(cfg, by_mode: dict) -> dict:
  """Each mode's goodput on the engine and in the simulator, seed by seed."""
  import dataclasses

  import numpy as np

  import pdserve_jax as pdj
  from pdserve_jax.core import metrics
  from pdserve_jax.runtime import profiler
  from pdserve_jax.sim import goodput as gp
  from pdserve_jax.sim import simulator as sim

  ec = engine_runs.engine_config(cfg, log_steps=True)
  make = workloads.from_config(cfg.workload, ec.max_seq_len,
                               engine_runs.max_prompt_len(by_mode.values(), ec))
  model = engine_runs.load_model(cfg)
  engine_runs.check_servable(by_mode, model)
  slos, target, tol = (cfg.ttft_slo, cfg.tpot_slo), cfg.target, cfg.goodput_tol
  seeds = range(cfg.workload.seed, cfg.workload.seed + cfg.goodput_seeds)
  out = {}
  for mode, dep in by_mode.items():
    with pdj.Engine(model, dep, ec) as engine:
      setup = profiler.setup_from_engine(engine, cfg.profile_reps)
      setups = {"sim": dataclasses.replace(setup, shared_host=False),
                "sim_shared_host": dataclasses.replace(setup, shared_host=True)}
      values = {k: [] for k in ("engine", *setups, "sim_at_engine_speed")}
      drift = []
      for seed in seeds:
        first = len(drift)
        cap = gp.saturation_throughput(make(gp.BURST_RATE, seed), setups["sim"], dep, *slos)

        def served(rate):
          engine.step_log.clear()
          report = engine_runs.serve_workload(engine, make(rate, seed),
                                              f"{mode} seed {seed} at {rate:.1f}/s")
          lat = setup.latency(1, 1)
          drift.append(float(np.median([(r.finished - r.started) / lat.calls_time(
              r.packed_calls, r.decode_calls) for r in engine.step_log])) - 1)
          return report.summary["attainment"]
        # One bracket for both: a quarter of the simulated capacity up to twice it (a
        # finite sample can meet SLOs at rates no steady state sustains; the engine's
        # capacity may still exceed the simulator's).
        # Below the bracket, at most three halvings (each run takes longer): then 0.
        search = lambda att: metrics.goodput_search(att, target, cap / 4, 2 * cap, tol,
                                                    max_doublings=3, grow=False)
        values["engine"].append(search(served))
        # The simulator once more with every step as much slower than its profile as
        # the engine's steps ran in this seed's runs: how much of the gap is the
        # machine's speed while serving rather than what the simulator decides.
        slow = 1 + float(np.median(drift[first:]))
        setups["sim_at_engine_speed"] = dataclasses.replace(
            setups["sim_shared_host"], latency=lambda tp, pp, f=slow: _Slower(
                setup.latency(tp, pp), f))
        for key, s in setups.items():
          values[key].append(search(lambda rate: sim.simulate(
              make(rate, seed), s, dep, *slos).attainment(*slos)))
        print(f"  {mode} seed {seed}: goodput engine {values['engine'][-1]:.1f}, simulator "
              f"{values['sim'][-1]:.1f} (one host {values['sim_shared_host'][-1]:.1f}; at the "
              f"engine's speed, {slow - 1:+.0%}, {values['sim_at_engine_speed'][-1]:.1f}), "
              f"simulated capacity {cap:.1f} req/s", flush=True)
    est = {k: gp.Estimate(tuple(v), tuple(seeds)) for k, v in values.items()}
    out[mode] = dict({k: e.to_dict() for k, e in est.items()},
                     step_drift=float(np.median(drift)), num_devices=dep.num_devices,
                     deployment=dep.describe())
  return out


class _Slower:
  """A latency model `factor` times slower (a profile scaled to a run's speed)."""

  def __init__(self, base, factor: float):
    self.base, self.factor = base, factor
    self.step_overhead_s = getattr(base, "step_overhead_s", 0.0) * factor

  def step_time(self, step, pages=None) -> float:
    return self.base.step_time(step, pages) * self.factor


def knee_table(result: dict) -> str:
  rows = [f"{'mode':<26}{'engine req/s':>18}{'sim':>18}{'sim/engine':>12}"
          f"{'sim, one host':>18}{'/engine':>9}{'steps vs profile':>18}"
          f"{'sim at engine speed':>21}{'/engine':>9}"]
  for mode, r in result.items():
    cell = lambda e: f"{e['mean']:.1f} ± {e['half_width_95']:.1f}".rjust(18)
    e = r["engine"]["mean"]
    ratio = lambda k: "-" if not e else f"{r[k]['mean'] / e:.2f}"
    rows.append(f"{mode:<26}{cell(r['engine'])}{cell(r['sim'])}{ratio('sim'):>12}"
                f"{cell(r['sim_shared_host'])}{ratio('sim_shared_host'):>9}"
                f"{r['step_drift']:>+18.0%}{cell(r['sim_at_engine_speed']):>21}"
                f"{ratio('sim_at_engine_speed'):>9}")
  return "\n".join(rows)


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
  if cfg.get("goodput", False):
    if not (cfg.run_engine and cfg.latency == "profile"):
      raise common.ConfigError("goodput: compares the engine with the simulator profiled "
                               "from it; needs run_engine=True and latency='profile'")
    result = knee(cfg, by_mode)
    print(f"goodput per deployment at {cfg.target:.0%} attainment, mean ± 95% over "
          f"{cfg.goodput_seeds} seed(s) of {cfg.workload.num_requests} requests; SLOs TTFT "
          f"{cfg.ttft_slo * 1e3:g} ms, TPOT {cfg.tpot_slo * 1e3:g} ms")
    print(knee_table(result))
    common.save("sweep", cfg, out, [], [], start, knee=result)
    return
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
