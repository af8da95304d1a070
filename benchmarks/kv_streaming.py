"""Whole-request KV copies against layer-wise streaming: one disaggregated deployment,
one workload, engine and simulator side by side, with the ratios.

For each of `kv_transfer="whole"` and `"layerwise"` (in `--layer_groups` groups) an
engine is built and profiled (`profiler.setup_from_engine`: every program shape,
the loop's host time, the KV copy as fitted by `profile_transfers`, for streaming
one layer group's copy); then the two serve the same Poisson workload in turn,
`--attempts` rounds (a shared machine drifts: side by side, round by round), and the
simulator runs each deployment on its engine's profile. Prints P50 of TTFT, of the
time to the second token (arrival to token 2: the first token is sampled by the
prefill, so the hand-off shows between tokens 1 and 2) and of TPOT, and layerwise /
whole for each: per round for the engine, then the median round, and the simulator.

A last block runs the simulator alone on a datasheet setup where the copy is large
against the prefill (llama3-8b on A100-80GB, KV over the 25 GB/s network, and over
4.5 GB/s, the low end sglang-jax measured for `jax.experimental.transfer` over DCN,
sglang-jax #1427), at the same lengths scaled up.

Run with each virtual CPU device single-threaded (set when XLA_FLAGS is unset):

  XLA_FLAGS="--xla_force_host_platform_device_count=8 --xla_cpu_multi_thread_eigen=false \
      intra_op_parallelism_threads=1" python benchmarks/kv_streaming.py [--json=out.json]
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
from pdserve_jax.model.config import get_preset  # noqa: E402
from pdserve_jax.runtime import profiler  # noqa: E402
from pdserve_jax.sim import hardware, simulator as sim  # noqa: E402
from pdserve_jax.sim.latency import latency_source  # noqa: E402

flags.DEFINE_string("model", "llama-30m", "model preset (its layers must split into groups)")
flags.DEFINE_integer("requests", 20, "requests in the workload")
flags.DEFINE_float("rate", 1.0, "Poisson arrival rate (req/s)")
flags.DEFINE_integer("attempts", 3, "engine rounds, each deployment once a round")
flags.DEFINE_integer("layer_groups", 4, "layer groups of the streamed prefill")
flags.DEFINE_boolean("engine", True, "run the engine (else the datasheet block only)")
flags.DEFINE_string("json", "", "write the figures here")
FLAGS = flags.FLAGS

ENGINE = dict(page_size=16, num_pages=128, max_seq_len=256, min_token_bucket=32,
              warmup=True, ttft_slo=1.0, tpot_slo=0.1)
INSTANCE = pdj.InstanceSpec(tp=1, max_batch=16, max_step_tokens=256)
METRICS = ("ttft", "second_token", "tpot")


def p50s(reqs) -> dict:
  """Median TTFT, arrival to second token, and TPOT (s) of finished requests."""
  two = [r for r in reqs if len(r.token_times) > 1]
  return {"ttft": float(np.median([r.ttft for r in reqs])),
          "second_token": float(np.median([r.token_times[1] - r.arrival_time for r in two])),
          "tpot": float(np.median([r.tpot for r in two]))}


def deployments(groups: int, same_node: bool = True, spec=INSTANCE) -> dict:
  whole = pdj.Disaggregated(spec, spec, same_node=same_node)
  return {"whole": whole,
          "layerwise": dataclasses.replace(whole, kv_transfer="layerwise", layer_groups=groups)}


def engines_and_sim(model, deps: dict, reqs, attempts: int) -> dict:
  """Both engines built and profiled, then serving `reqs` in turn each round."""
  cfg = pdj.EngineConfig(**{**ENGINE, "log_steps": True})
  engines, out = {}, {}
  try:
    for name, dep in deps.items():
      engines[name] = pdj.Engine(model, dep, cfg)
      setup = profiler.setup_from_engine(engines[name])
      out[name] = {"sim": p50s(sim.simulate(reqs, setup, dep, cfg.ttft_slo,
                                            cfg.tpot_slo).requests),
                   "copy_fixed_s": setup.hardware.link_latency_s,
                   "copy_bytes_per_s": setup.hardware.intra_node_bw,
                   "step_overhead_s": setup.latency(1, 1).step_overhead_s, "rounds": []}
      print(f"  {name}: profiled KV copy {out[name]['copy_fixed_s'] * 1e3:.2f} ms fixed + "
            f"{out[name]['copy_bytes_per_s'] / 1e9:.2f} GB/s"
            + (" (one layer group)" if name == "layerwise" else "")
            + f", host time per step {out[name]['step_overhead_s'] * 1e3:.2f} ms", flush=True)
    for k in range(attempts):
      for name, engine in engines.items():
        out[name]["rounds"].append(p50s(engine.run_workload([r.fresh() for r in reqs])
                                        .requests))
      ratio = {m: out["layerwise"]["rounds"][-1][m] / out["whole"]["rounds"][-1][m]
               for m in METRICS}
      print(f"  round {k + 1}: layerwise / whole " + ", ".join(
          f"{m} {ratio[m]:.3f}" for m in METRICS), flush=True)
  finally:
    for engine in engines.values():
      engine.close()
  for name in deps:  # the round whose TTFT ratio is the median
    ratios = [out["layerwise"]["rounds"][k]["ttft"] / out["whole"]["rounds"][k]["ttft"]
              for k in range(attempts)]
    mid = int(np.argsort(ratios)[len(ratios) // 2])
    out[name]["engine"] = out[name]["rounds"][mid]
  return out


def table(rows: dict, sides) -> None:
  head = "".join(f"{m + ' ' + s:>22}" for m in METRICS for s in sides)
  print(f"{'':<12}{head}   (P50, ms)")
  for name, row in rows.items():
    print(f"{name:<12}" + "".join(f"{row[s][m] * 1e3:>22.2f}" for m in METRICS for s in sides))
  ratio = {s: {m: rows["layerwise"][s][m] / rows["whole"][s][m] for m in METRICS}
           for s in sides}
  print(f"{'ratio':<12}" + "".join(f"{ratio[s][m]:>22.3f}" for m in METRICS for s in sides)
        + "   (layerwise / whole)")
  rows["ratio"] = ratio


def datasheet(groups: int) -> dict:
  """The simulator alone where the copy is large against the prefill."""
  model = get_preset("llama3-8b")
  out = {}
  reqs = workloads.synthetic(400, 6.0, workloads.Uniform(1024, 3072),
                             workloads.Uniform(64, 256), seed=3)
  spec = pdj.InstanceSpec(tp=1, max_batch=64, max_step_tokens=8192)
  for bw_name, bw in (("25 GB/s", 25e9), ("4.5 GB/s", 4.5e9)):
    hw = dataclasses.replace(hardware.get_hardware("a100-80gb"), inter_node_bw=bw)
    setup = sim.Setup(model, hw, latency_source("roofline", model, hw))
    rows = {name: {"sim": p50s(sim.simulate(reqs, setup, dep).requests)}
            for name, dep in deployments(groups, same_node=False, spec=spec).items()}
    print(f"\nsimulator, llama3-8b, A100-80GB, 1 prefill + 1 decode, KV over {bw_name}, "
          f"400 requests at 6/s, prompts 1024-3072, outputs 64-256, {groups} groups:")
    table(rows, ("sim",))
    out[bw_name] = rows
  return out


def main(_):
  out = {}
  if FLAGS.engine:
    model = pdj.random_model(pdj.get_preset(FLAGS.model), seed=0, std=0.1)
    reqs = workloads.synthetic(FLAGS.requests, FLAGS.rate, workloads.Uniform(64, 192),
                               workloads.Uniform(8, 48), seed=3)
    print(f"engine and simulator: model={FLAGS.model} {FLAGS.requests} requests Poisson "
          f"{FLAGS.rate}/s, 1 prefill + 1 decode instance of 1 device, "
          f"{FLAGS.layer_groups} layer groups")
    rows = engines_and_sim(model, deployments(FLAGS.layer_groups), reqs, FLAGS.attempts)
    print("engine: the round of median TTFT ratio; simulator: each on its engine's profile")
    table(rows, ("engine", "sim"))
    out["engine_and_sim"] = rows
  out["datasheet"] = datasheet(FLAGS.layer_groups)
  if FLAGS.json:
    with open(FLAGS.json, "w") as f:
      json.dump(out, f, indent=1)


if __name__ == "__main__":
  app.run(main)
