"""Simulator vs engine: one Poisson workload through the real engine on this machine
and through the simulator with a latency model profiled here, per serving mode.

The engine's instances are profiled just before they serve: every compiled
program shape of the same runners (`runtime.profiler.profile_shapes`), the loop's host
time per step from a closed batch of other requests (`profiler.step_overhead`),
and for disaggregated mode the KV hand-off (`profile_transfers`) and how much the
two instances slow each other on shared cores (`profile_overlap`). That is the
simulator's latency model; it also gets the engine's pool size, and both serve
the same requests as the same deployment (one `pdserve_jax.core.deploy` object handed to
`Engine` and to `simulate`). Prints median TTFT and TPOT side by side and
their relative differences, and how far the engine's own steps ran from their
profiled times in that run (its step log): on a shared machine that drifts by tens
of percent from minute to minute, and a run whose steps strayed more than
`--max_step_error` is repeated, up to `--attempts` times; every attempt is printed.

Run it with each virtual CPU device single-threaded, as `make`'s targets do not, so
that a device's program is one core's work and two devices on two cores slow each
other only as much as `profile_overlap` measures (the script sets these flags when
XLA_FLAGS is unset):

  XLA_FLAGS="--xla_force_host_platform_device_count=8 --xla_cpu_multi_thread_eigen=false \
      intra_op_parallelism_threads=1" python benchmarks/sim_vs_engine.py [--json=out.json]
"""

import dataclasses
import json
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                      "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")

from absl import app, flags  # noqa: E402
import numpy as np  # noqa: E402

import pdserve_jax as pdj  # noqa: E402
from pdserve_jax import workloads  # noqa: E402
from pdserve_jax.runtime import profiler  # noqa: E402
from pdserve_jax.sim import simulator as sim  # noqa: E402

flags.DEFINE_string("model", "llama-30m", "model preset")
flags.DEFINE_list("modes", ["prefill_first", "chunked", "disaggregated", "semi_pd"], "modes")
flags.DEFINE_integer("requests", 40, "requests in the workload")
flags.DEFINE_float("rate", 2.0, "Poisson arrival rate (req/s)")
flags.DEFINE_string("json", "", "write the figures here")
flags.DEFINE_integer("attempts", 3, "runs per mode while the steps stray from the profile")
flags.DEFINE_float("max_step_error", 0.1, "how far the engine's median step may stray from "
                   "its profile for a run to count")
FLAGS = flags.FLAGS

# Runtime knobs of the engine; the simulator gets its pool size from them.
ENGINE = dict(page_size=16, num_pages=128, max_seq_len=256,
              min_token_bucket=32, warmup=True, ttft_slo=1.0,
              tpot_slo=0.1)
# One device per instance; each deployment is served by the engine and simulated as is.
INSTANCE = pdj.InstanceSpec(tp=1, max_batch=16, max_step_tokens=256)
DEPLOYMENTS = {
    "prefill_first": pdj.Colocated(INSTANCE, policy="prefill_first"),
    "chunked": pdj.Colocated(dataclasses.replace(INSTANCE, max_step_tokens=64), policy="chunked"),
    "disaggregated": pdj.Disaggregated(INSTANCE, INSTANCE, num_prefill=1, num_decode=1),
    "semi_pd": pdj.SemiPD(INSTANCE, prefill_share=0.5, partitioner=pdj.PartitionerConfig(
        window=16, step=0.1, min_share=0.1, max_share=0.9, hysteresis=0.1)),
}


def step_model_error(records, latency) -> float:
  """Median of measured / predicted step time over the engine's steps, minus one:
  how far this run's machine strayed from the profile (noise, other tenants)."""
  # A record spans a step's calls, not the loop's time between steps.
  ratios = [(r.finished - r.started) / latency.calls_time(r.packed_calls, r.decode_calls)
            for r in records]
  return float(np.median(ratios)) - 1


def compare(model, mode, reqs, engine_fields=ENGINE, deployment=None):
  """Serves `reqs` in `mode` (or as `deployment`, if given) and simulates the same
  deployment; returns the engine's and the simulator's median TTFT and TPOT and
  the step model's error in this run."""
  dep = DEPLOYMENTS[mode] if deployment is None else deployment
  cfg = pdj.EngineConfig(**{**engine_fields, "log_steps": True})
  with pdj.Engine(model, dep, cfg) as engine:
    setup = profiler.setup_from_engine(engine)
    report = engine.run_workload([r.fresh() for r in reqs])
    records = list(engine.step_log)
  latency = setup.latency(1, 1)
  simulated = sim.simulate(reqs, setup, dep, cfg.ttft_slo, cfg.tpot_slo).summary()
  row = {k: dict(engine=report.summary[k]["p50"], sim=simulated[k]["p50"],
                 rel_diff=simulated[k]["p50"] / report.summary[k]["p50"] - 1)
         for k in ("ttft_s", "tpot_s")}
  row["step_model_error"] = step_model_error(records, latency)
  row["step_overhead_s"] = latency.step_overhead_s
  row["overlap_slowdown"] = setup.overlap_slowdown
  row["copy_fixed_s"] = setup.hardware.link_latency_s
  row["copy_bytes_per_s"] = setup.hardware.intra_node_bw
  return row


def main(_):
  model = pdj.random_model(pdj.get_preset(FLAGS.model), seed=0, std=0.1)
  reqs = workloads.synthetic(FLAGS.requests, FLAGS.rate, workloads.Uniform(16, 128),
                             workloads.Uniform(8, 48), seed=3)
  print(f"model={FLAGS.model} requests={FLAGS.requests} Poisson {FLAGS.rate}/s")
  print(f"{'mode':<14} {'TTFT engine':>11} {'sim':>7} {'diff':>6}   {'TPOT engine':>11} "
        f"{'sim':>7} {'diff':>6}   {'steps vs profile':>16}   host/step  (medians, ms)")
  unknown = [m for m in FLAGS.modes if m not in DEPLOYMENTS]
  if unknown:
    raise app.UsageError(f"unknown mode(s) {unknown}; known: {list(DEPLOYMENTS)}")
  out = {}
  for mode in FLAGS.modes:
    out[mode] = []
    for _ in range(FLAGS.attempts):
      row = compare(model, mode, reqs)
      out[mode].append(row)
      t, p = row["ttft_s"], row["tpot_s"]
      print(f"{mode:<14} {t['engine'] * 1e3:>11.1f} {t['sim'] * 1e3:>7.1f} "
            f"{t['rel_diff']:>+6.0%}   {p['engine'] * 1e3:>11.2f} {p['sim'] * 1e3:>7.2f} "
            f"{p['rel_diff']:>+6.0%}   {row['step_model_error']:>+16.0%}   "
            f"{row['step_overhead_s'] * 1e3:.2f}", flush=True)
      if isinstance(DEPLOYMENTS[mode], pdj.Disaggregated):
        print(f"{'':<14} profiled: KV copy {row['copy_fixed_s'] * 1e3:.2f} ms fixed + "
              f"{row['copy_bytes_per_s'] / 1e9:.2f} GB/s, prefill beside decode slows it "
              f"{row['overlap_slowdown']:.2f}x", flush=True)
      if abs(row["step_model_error"]) <= FLAGS.max_step_error:
        break
      print(f"{'':<14} steps ran {row['step_model_error']:+.0%} off their profile "
            f"(more than {FLAGS.max_step_error:.0%}): the machine changed speed; again")
  if FLAGS.json:
    with open(FLAGS.json, "w") as f:
      json.dump(out, f, indent=1)


if __name__ == "__main__":
  app.run(main)
