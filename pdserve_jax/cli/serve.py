"""absl app: serve one workload with the real engine, in each listed mode, and say
which mode met the SLOs best at that load.

  python -m pdserve_jax.cli.serve     # serve_demo: the demo model in four modes
  python -m pdserve_jax.cli.serve --config=serve_demo \
      --config.modes=semi_pd --config.workload.rate=4 --output_json=out.json

With `--role=prefill|decode|router` it is `cli.api`'s multi-process server instead:
instances as worker processes, the router serving HTTP (see `cli.api`).

Each mode (`cli.deployments`) runs on its own engine built from the config's
deployment blocks and `config.engine` (`pdj.EngineConfig`), and serves the
`config.workload` block at its `rate`. With `prompts` and a model that has a
tokenizer (`checkpoint="demo"`, an HF folder), each engine first prints their
continuations (one line for a mode whose text equals the first mode's). Prints one
table row per mode, then the modes' SLO attainment with the best named;
`--output_json` writes the result (`pdserve_jax.results`), `--plots_dir` its TTFT/TPOT
CDFs and semi-PD share.
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
  runs, texts = [], {}
  for mode, dep in by_mode.items():
    with pdj.Engine(model, dep, ec) as engine:
      if text:
        texts[mode] = engine_runs.continuations(engine, cfg)
        print_texts(cfg.prompts, texts)
      report = engine_runs.serve_workload(engine, requests, mode)
      stats = engine.stats()
    runs.append(results.run_record(mode, "engine", dep, w.rate, report.requests, cfg.ttft_slo,
                                   cfg.tpot_slo, report.share_history, engine_stats=stats))
    print(f"  served {mode}: {dep.describe()}", flush=True)
  print(common.table(runs))
  print(answer(runs))
  plots = (figures.write(out.plots_dir, runs, cfg.ttft_slo, cfg.tpot_slo)
           if out.plots_dir else [])
  common.save("serve", cfg, out, runs, plots, start)


def print_texts(prompts, texts: dict) -> None:
  """The latest mode's continuations of `prompts`, or one line when they equal the
  first mode's (`texts`: mode -> continuations, in serving order)."""
  first, mode = list(texts)[0], list(texts)[-1]
  if mode != first and texts[mode] == texts[first]:
    print(f"  [{mode}] the same continuations as {first}")
    return
  for prompt, continuation in zip(prompts, texts[mode]):
    print(f"  [{mode}] {prompt!r} -> {continuation!r}")


def answer(runs) -> str:
  """Which mode to deploy at this load: each mode's SLO attainment, the best named
  (all of them when tied), and a hint when no mode served half the requests."""
  att = {r["mode"]: r["summary"]["attainment"] for r in runs}
  top = max(att.values())
  best = [m for m, a in att.items() if a == top]
  devices = {r["num_devices"] for r in runs}
  n = devices.pop() if len(devices) == 1 else None
  where = f"At {runs[0]['rate_rps']:g} req/s on " + (
      "these devices" if n is None else f"{n} device{'s' if n > 1 else ''}"
      + (" each" if len(runs) > 1 else ""))
  who = " and ".join(best)
  if len(best) == len(att):
    text = (f"{where}, {'every mode' if len(att) > 1 else who} met both SLOs for {top:.0%} "
            f"of requests" + (": at this load they do not differ." if len(att) > 1 else "."))
  else:
    rest = ", ".join(f"{m} {a:.0%}" for m, a in sorted(att.items(), key=lambda x: -x[1])
                     if m not in best)
    text = (f"{where}, {who} met both SLOs for {top:.0%} of requests ({rest}): {who} "
            f"{'wins' if len(best) == 1 else 'tie'} at this load.")
  if top < 0.5:  # beyond every mode: a busy or slow machine ranks them by noise
    text += (" No mode served half the requests within the SLOs: the load is beyond "
             "this machine now; a lower workload.rate compares the modes where they serve.")
  return text


if __name__ == "__main__":
  common.run(main, "serve_demo")
