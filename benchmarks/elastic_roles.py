"""SLO attainment of a static prefill:decode split, elastic roles and semi-PD, on a
workload whose prompt/output mix shifts (`workloads.long_prompt_burst`: chat, a
burst of long prompts with short outputs, chat again), engine and simulator side by
side, on the same devices.

Four one-device instances: static 2 prefill + 2 decode, the same with elastic roles
(`Disaggregated(elastic=ElasticConfig(...))`, moving instances between roles as the
TTFT and TPOT attainment of each phase says, `core.elastic`), and semi-PD with four
replicas and its SLO partitioner (each replica time-shares its device between the
phases). Each engine is built and profiled (`profiler.setup_from_engine`), then they
serve the workload in turn, `--attempts` rounds (a shared machine drifts: side by
side, round by round); the simulator runs each deployment and the same requests on
its engine's profile. Prints attainment (both SLOs), P90 TTFT and TPOT, and how many
role moves or share changes each made: every engine round, then the simulator. On
virtual CPU devices the instances share the host's cores, so more instances on a
phase add no compute there: the datasheet block below is where roles can matter.

A last block runs the simulator alone on a datasheet setup (llama3-8b, A100-80GB,
roofline, 4 instances), where the devices do not share a host's cores as virtual
CPU devices do, over a range of rates, with the static splits 1:3 and 3:1 too.

  XLA_FLAGS="--xla_force_host_platform_device_count=8 --xla_cpu_multi_thread_eigen=false \
      intra_op_parallelism_threads=1" python benchmarks/elastic_roles.py [--json=out.json]
"""

import json
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                      "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")

from absl import app, flags  # noqa: E402
import numpy as np  # noqa: E402

import pdserve_jax as pdj  # noqa: E402
from pdserve_jax import workloads  # noqa: E402
from pdserve_jax.core import metrics  # noqa: E402
from pdserve_jax.core.elastic import ElasticConfig  # noqa: E402
from pdserve_jax.model.config import get_preset  # noqa: E402
from pdserve_jax.runtime import profiler  # noqa: E402
from pdserve_jax.sim import hardware, simulator as sim  # noqa: E402
from pdserve_jax.sim.latency import latency_source  # noqa: E402

flags.DEFINE_string("model", "llama-30m", "model preset")
flags.DEFINE_integer("requests", 48, "requests in the workload (a third in the burst)")
flags.DEFINE_integer("attempts", 2, "engine rounds, each deployment once a round")
flags.DEFINE_float("rate", 2.0, "chat arrival rate (req/s); the burst comes at twice it")
flags.DEFINE_float("ttft_slo", 1.0, "TTFT SLO (s) of the engine runs")
flags.DEFINE_float("tpot_slo", 0.1, "TPOT SLO (s) of the engine runs")
flags.DEFINE_integer("window", 8, "requests per decision of the elastic controller and "
                     "the semi-PD partitioner")
flags.DEFINE_boolean("engine", True, "run the engine (else the datasheet block only)")
flags.DEFINE_string("json", "", "write the figures here")
FLAGS = flags.FLAGS

ENGINE = dict(page_size=16, num_pages=128, max_seq_len=256, min_token_bucket=32,
              warmup=True)


def deployments(spec, window: int, splits=((2, 2),)) -> dict:
  out = {f"static {p}:{d}": pdj.Disaggregated(spec, spec, p, d) for p, d in splits}
  out["elastic 2:2"] = pdj.Disaggregated(spec, spec, 2, 2,
                                         elastic=ElasticConfig(window=window))
  out["semi-PD x4"] = pdj.SemiPD(spec, 4, 0.5, partitioner=pdj.PartitionerConfig(
      window=window))
  return out


def summary(reqs, ttft_slo, tpot_slo, history) -> dict:
  s = metrics.summarize(reqs, ttft_slo, tpot_slo)
  return {"attainment": s["attainment"], "ttft_p90": s["ttft_s"]["p90"],
          "tpot_p90": s["tpot_s"]["p90"], "moves": max(len(history) - 1, 0)}


def history(hist: dict) -> list:
  return next(iter(hist.values())) if hist else []


def engines_and_sim(model, deps: dict, reqs, ttft_slo, tpot_slo, attempts) -> dict:
  """Every engine built and profiled, then serving `reqs` in turn each round."""
  cfg = pdj.EngineConfig(**ENGINE, ttft_slo=ttft_slo, tpot_slo=tpot_slo, log_steps=True)
  engines, out = {}, {}
  try:
    for name, dep in deps.items():
      engines[name] = pdj.Engine(model, dep, cfg)
      setup = profiler.setup_from_engine(engines[name])
      res = sim.simulate(reqs, setup, dep, ttft_slo, tpot_slo)
      out[name] = {"sim": summary(res.requests, ttft_slo, tpot_slo,
                                  history(res.share_history)), "rounds": []}
    for k in range(attempts):
      for name, engine in engines.items():
        report = engine.run_workload([r.fresh() for r in reqs])
        out[name]["rounds"].append(summary(report.requests, ttft_slo, tpot_slo,
                                           report.share_history))
      print(f"  round {k + 1}: " + ", ".join(
          f"{n} {out[n]['rounds'][-1]['attainment']:.3f}" for n in deps), flush=True)
  finally:
    for engine in engines.values():
      engine.close()
  return out


def print_rows(rows: dict, sides) -> None:
  cols = ("attainment", "ttft_p90", "tpot_p90", "moves")
  print(f"{'':<14}" + "".join(f"{c + ' ' + s:>18}" for c in cols for s in sides))
  for name, row in rows.items():
    cells = []
    for c in cols:
      for s in sides:
        v = row[s][c]
        cells.append(f"{v:>18.3f}" if c != "moves" else f"{v:>18d}")
    print(f"{name:<14}" + "".join(cells))


def datasheet(window: int) -> dict:
  model = get_preset("llama3-8b")
  hw = hardware.get_hardware("a100-80gb")
  setup = sim.Setup(model, hw, latency_source("roofline", model, hw))
  spec = pdj.InstanceSpec(tp=1, max_batch=128, max_step_tokens=8192)
  ttft_slo, tpot_slo = 1.0, 0.05
  out = {}
  deps = deployments(spec, 16, splits=((2, 2), (1, 3), (3, 1)))
  print(f"\nsimulator, llama3-8b, A100-80GB roofline, 4 instances of 1 GPU, 600 requests "
        f"(chat, a burst of long prompts, chat; context 4096), SLOs TTFT {ttft_slo} s, "
        f"TPOT {tpot_slo} s; attainment by chat rate (req/s):")
  print(f"{'rate':<6}" + "".join(f"{n:>14}" for n in deps))
  for rate in (3.0, 4.0, 5.0, 6.0, 7.0):
    reqs = workloads.long_prompt_burst(4096, 600, rate, seed=0)
    row = {n: sim.simulate(reqs, setup, d, ttft_slo, tpot_slo).attainment(ttft_slo, tpot_slo)
           for n, d in deps.items()}
    print(f"{rate:<6}" + "".join(f"{v:>14.3f}" for v in row.values()), flush=True)
    out[rate] = row
  return out


def main(_):
  out = {}
  if FLAGS.engine:
    model = pdj.random_model(pdj.get_preset(FLAGS.model), seed=0, std=0.1)
    reqs = workloads.long_prompt_burst(ENGINE["max_seq_len"], FLAGS.requests, FLAGS.rate)
    spec = pdj.InstanceSpec(tp=1, max_batch=16, max_step_tokens=256)
    print(f"engine and simulator: model={FLAGS.model}, {FLAGS.requests} requests (chat at "
          f"{FLAGS.rate}/s, a burst of long prompts, chat), 4 devices, SLOs TTFT "
          f"{FLAGS.ttft_slo} s, TPOT {FLAGS.tpot_slo} s")
    rows = engines_and_sim(model, deployments(spec, FLAGS.window), reqs, FLAGS.ttft_slo,
                           FLAGS.tpot_slo, FLAGS.attempts)
    for k in range(FLAGS.attempts):
      print(f"engine round {k + 1} and the simulator:")
      print_rows({n: dict(r, engine=r["rounds"][k]) for n, r in rows.items()},
                 ("engine", "sim"))
    out["engine_and_sim"] = rows
  out["datasheet"] = datasheet(FLAGS.window)
  if FLAGS.json:
    with open(FLAGS.json, "w") as f:
      json.dump(out, f, indent=1, default=float)


if __name__ == "__main__":
  np.set_printoptions(precision=3)
  app.run(main)
