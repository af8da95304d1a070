"""absl app: serve one workload with the real engine in one or several modes.

  python -m pdserve_jax.cli.serve --config=configs/serve_demo.py \
      --config.modes=semi_pd --config.workload.rate=4 --output_json=out.json

Modes are named "colocated_prefill_first", "colocated_chunked", "disaggregated" and
"semi_pd". Each mode's deployment (`pdserve_jax.deploy`) is built from the
config's `instance`, `disaggregated` and `semi_pd` blocks, and each runs on its
own engine with the shared runtime knobs of `config.engine` (`pdj.EngineConfig`).
Prints one table row per mode: devices, TTFT and TPOT P50/P90, SLO attainment,
throughput and preemptions.
"""

import dataclasses
import json
import os

from absl import app, flags
from ml_collections import config_flags

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import pdserve_jax as pdj  # noqa: E402
from pdserve_jax import deploy, workloads  # noqa: E402

config_flags.DEFINE_config_file("config", "configs/serve_demo.py", "serving experiment")
flags.DEFINE_string("output_json", "", "write the per-mode summaries here")

MODES = ("colocated_prefill_first", "colocated_chunked", "disaggregated", "semi_pd")


def load_model(cfg) -> pdj.Model:
  if cfg.hf_path:
    return pdj.load_hf(cfg.hf_path, dtype=cfg.dtype)
  if cfg.checkpoint:
    return pdj.load(cfg.checkpoint, dtype=cfg.dtype)
  return pdj.random_model(pdj.get_preset(cfg.model), seed=cfg.seed, std=cfg.init_std)


def make_requests(w, max_seq_len: int):
  half = max_seq_len // 2
  return workloads.synthetic(
      w.num_requests, w.rate, workloads.Lognormal(w.prompt_mean, w.prompt_spread, 1, half),
      workloads.Lognormal(w.output_mean, w.output_spread, 1, half - 1), w.process, w.cv,
      w.seed)


def build_deployment(cfg, mode: str):
  """`mode`'s deployment from the config's `instance`, `disaggregated` and `semi_pd`."""
  i = cfg.instance

  def spec(tp: int, max_tokens: int = i.max_tokens) -> deploy.InstanceSpec:
    return deploy.InstanceSpec(tp=tp, max_batch=i.max_batch, max_tokens=max_tokens,
                               page_policy=i.page_policy)

  if mode == "colocated_prefill_first":
    dep = deploy.Colocated(spec(i.tp), policy="prefill_first")
  elif mode == "colocated_chunked":
    dep = deploy.Colocated(spec(i.tp, i.token_budget), policy="chunked")
  elif mode == "disaggregated":
    d = cfg.disaggregated
    dep = deploy.Disaggregated(spec(d.prefill_tp), spec(d.decode_tp), d.num_prefill,
                               d.num_decode)
  elif mode == "semi_pd":
    s = cfg.semi_pd
    part = deploy.PartitionerConfig(**s.partitioner.to_dict()) if s.dynamic else None
    dep = deploy.SemiPD(spec(i.tp), prefill_share=s.prefill_share, partitioner=part)
  else:
    raise ValueError(f"unknown mode {mode!r}; known: {list(MODES)}")
  dep.check()
  return dep


def engine_config(cfg) -> pdj.EngineConfig:
  known = {f.name for f in dataclasses.fields(pdj.EngineConfig)}
  fields = cfg.engine.to_dict()
  unknown = sorted(set(fields) - known)
  if unknown:
    raise ValueError(f"config.engine has fields EngineConfig lacks: {unknown} (batch "
                     "limits and parallelism belong in config.instance)")
  return pdj.EngineConfig(**fields)


def serve(model, deployment, ec: pdj.EngineConfig, requests):
  """Serves fresh copies of `requests`; returns the report and the engine's stats."""
  with pdj.Engine(model, deployment, ec) as engine:
    report = engine.run_workload([r.fresh() for r in requests])
    stats = engine.stats()
  return report, stats


def format_row(mode, deployment, s, stats):
  ms = lambda v: f"{v * 1e3:8.1f}" if v is not None else "       -"
  return (f"{mode:<24} {deployment.num_devices:>4} {ms(s['ttft_s']['p50'])} "
          f"{ms(s['ttft_s']['p90'])} {ms(s['tpot_s']['p50'])} {ms(s['tpot_s']['p90'])} "
          f"{s['attainment']:>7.0%} {s['throughput_rps']:>7.2f} "
          f"{s['output_tokens_per_s']:>8.1f} {stats['preemptions']:>8d}")


HEADER = (f"{'mode':<24} {'devs':>4} {'TTFT p50':>8} {'TTFT p90':>8} {'TPOT p50':>8} "
          f"{'TPOT p90':>8} {'attain':>7} {'req/s':>7} {'tok/s':>8} {'preempt':>8}"
          "   (times in ms)")


def main(_):
  cfg = flags.FLAGS.config
  modes = [m.strip() for m in cfg.modes.split(",") if m.strip()]
  # Every mode's deployment and the engine config are checked before any serving.
  deployments = {m: build_deployment(cfg, m) for m in modes}
  ec = engine_config(cfg)
  model = load_model(cfg)
  requests = make_requests(cfg.workload, ec.max_seq_len)
  print(f"model {model.config.name}: {model.config.num_params() / 1e6:.1f}M params; "
        f"{len(requests)} requests, Poisson {cfg.workload.rate}/s; SLOs TTFT "
        f"{ec.ttft_slo * 1e3:.0f} ms, TPOT {ec.tpot_slo * 1e3:.0f} ms")
  out = {}
  rows = []
  for mode, dep in deployments.items():
    report, stats = serve(model, dep, ec, requests)
    out[mode] = dict(report.summary, deployment=dep.describe(), stats=stats,
                     share_history=report.share_history)
    rows.append(format_row(mode, dep, report.summary, stats))
    print(f"  served {mode}: {dep.describe()}", flush=True)
  print(HEADER)
  print("\n".join(rows))
  if flags.FLAGS.output_json:
    with open(flags.FLAGS.output_json, "w") as f:
      json.dump(out, f, indent=1)


if __name__ == "__main__":
  app.run(main)
