"""absl app: serve one workload with the real engine, in each listed mode.

  python -m pdserve_jax.cli.serve --config=configs/serve_demo.py \
      --config.modes=semi_pd --config.workload.rate=4 --output_json=out.json

With `--role=prefill|decode|router` it is `cli.api`'s multi-process server instead:
instances as worker processes, the router serving HTTP (see `cli.api`).

Each mode (`cli.deployments`) runs on its own engine built from the config's
deployment blocks and `config.engine` (`pdj.EngineConfig`), and serves the
`config.workload` block at its `rate`. With `prompts` and a model that has a
tokenizer (`checkpoint="demo"`, an HF folder), each engine first prints their
continuations. Prints one table row per mode; `--output_json` writes the result
(`pdserve_jax.results`), `--plots_dir` its TTFT/TPOT CDFs and semi-PD share.
"""

import time

from pdserve_jax.cli import engine_runs  # first: sets XLA_FLAGS before jax loads
from absl import flags

from pdserve_jax.cli import api, common, figures, deployments
from pdserve_jax import results, workloads

RULES = {"generation.max_tokens": common.at_least(1),
         "generation.temperature": lambda v: None if v >= 0 else "must be >= 0"}


def main(cfg, out: common.Outputs):
  if flags.FLAGS.role != "engine":
    return api.main(cfg, out)
  start = time.perf_counter()
  import pdserve_jax as pdj

  # Everything is checked before the model loads and any mode serves.
  common.check(cfg, {**common.RULES, **RULES})
  if not all(isinstance(p, str) for p in cfg.prompts):
    raise common.ConfigError(f"prompts: expected strings, got {cfg.prompts!r}")
  workloads.check_config(cfg.workload)
  names = deployments.modes(cfg)
  by_mode = {m: deployments.deployment(cfg, m) for m in names}
  ec = engine_runs.engine_config(cfg)
  make = workloads.from_config(cfg.workload, ec.max_seq_len,
                               engine_runs.max_prompt_len(by_mode.values(), ec))
  requests = make(cfg.workload.rate)
  model = engine_runs.load_model(cfg)
  engine_runs.check_servable(by_mode, model)
  w = cfg.workload
  print(f"model {model.config.name}: {model.config.num_params() / 1e6:.1f}M params; "
        f"{len(requests)} requests, {w.source} {w.arrival} {w.rate:g}/s; SLOs TTFT "
        f"{cfg.ttft_slo * 1e3:g} ms, TPOT {cfg.tpot_slo * 1e3:g} ms")
  text = bool(cfg.prompts) and model.tokenizer is not None
  if cfg.prompts and not text:
    print("  (prompts skipped: the model has no tokenizer)")
  runs = []
  for mode, dep in by_mode.items():
    with pdj.Engine(model, dep, ec) as engine:
      if text:
        engine_runs.print_continuations(engine, cfg, mode)
      report = engine_runs.serve_workload(engine, requests, mode)
      stats = engine.stats()
    runs.append(results.run_record(mode, "engine", dep, w.rate, report.requests, cfg.ttft_slo,
                                   cfg.tpot_slo, report.share_history, engine_stats=stats))
    print(f"  served {mode}: {dep.describe()}", flush=True)
  print(common.table(runs))
  plots = (figures.write(out.plots_dir, runs, cfg.ttft_slo, cfg.tpot_slo)
           if out.plots_dir else [])
  common.save("serve", cfg, out, runs, plots, start)


if __name__ == "__main__":
  common.run(main, "configs/serve_demo.py")
