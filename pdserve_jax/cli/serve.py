"""absl app: serve one workload with the real engine in one or several modes.

  python -m pdserve_jax.cli.serve --config=configs/serve_demo.py \
      --config.modes=semi_pd --config.workload.rate=4 --output_json=out.json

Modes are named "colocated_prefill_first", "colocated_chunked", "disaggregated" and
"semi_pd"; each runs on its own engine with the shared `config.engine` fields.
Prints one table row per mode: TTFT and TPOT P50/P90, SLO attainment, throughput.
"""

import json
import os

from absl import app, flags
from ml_collections import config_flags

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import pdserve_jax as pdj  # noqa: E402
from pdserve_jax import workloads  # noqa: E402

config_flags.DEFINE_config_file("config", "configs/serve_demo.py", "serving experiment")
flags.DEFINE_string("output_json", "", "write the per-mode summaries here")

MODE_FIELDS = {
    "colocated_prefill_first": dict(mode="colocated", policy="prefill_first"),
    "colocated_chunked": dict(mode="colocated", policy="chunked"),
    "disaggregated": dict(mode="disaggregated"),
    "semi_pd": dict(mode="semi_pd"),
}


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


def engine_config(cfg, mode: str) -> pdj.EngineConfig:
  if mode not in MODE_FIELDS:
    raise ValueError(f"unknown mode {mode!r}; known: {sorted(MODE_FIELDS)}")
  return pdj.EngineConfig(**{**cfg.engine.to_dict(), **MODE_FIELDS[mode]})


def serve(model, cfg, mode: str, requests):
  with pdj.Engine(model, engine_config(cfg, mode)) as engine:
    report = engine.run_workload([r.fresh() for r in requests])
  return report


def devices_used(ec: pdj.EngineConfig) -> int:
  return ec.devices_needed


def format_row(mode, ec, s):
  ms = lambda v: f"{v * 1e3:8.1f}" if v is not None else "       -"
  return (f"{mode:<24} {devices_used(ec):>4} {ms(s['ttft_s']['p50'])} {ms(s['ttft_s']['p90'])} "
          f"{ms(s['tpot_s']['p50'])} {ms(s['tpot_s']['p90'])} {s['attainment']:>7.0%} "
          f"{s['throughput_rps']:>7.2f} {s['output_tokens_per_s']:>8.1f}")


HEADER = (f"{'mode':<24} {'devs':>4} {'TTFT p50':>8} {'TTFT p90':>8} {'TPOT p50':>8} "
          f"{'TPOT p90':>8} {'attain':>7} {'req/s':>7} {'tok/s':>8}   (times in ms)")


def main(_):
  cfg = flags.FLAGS.config
  model = load_model(cfg)
  requests = make_requests(cfg.workload, cfg.engine.max_seq_len)
  modes = [m.strip() for m in cfg.modes.split(",") if m.strip()]
  print(f"model {model.config.name}: {model.config.num_params() / 1e6:.1f}M params; "
        f"{len(requests)} requests, Poisson {cfg.workload.rate}/s; SLOs TTFT "
        f"{cfg.engine.ttft_slo * 1e3:.0f} ms, TPOT {cfg.engine.tpot_slo * 1e3:.0f} ms")
  out = {}
  rows = []
  for mode in modes:
    ec = engine_config(cfg, mode)
    report = serve(model, cfg, mode, requests)
    out[mode] = dict(report.summary, share_history=report.share_history)
    rows.append(format_row(mode, ec, report.summary))
    print(f"  served {mode}", flush=True)
  print(HEADER)
  print("\n".join(rows))
  if flags.FLAGS.output_json:
    with open(flags.FLAGS.output_json, "w") as f:
      json.dump(out, f, indent=1)


if __name__ == "__main__":
  app.run(main)
