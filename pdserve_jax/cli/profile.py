"""absl app: time this library's prefill and decode programs into a latency model.

  python -m pdserve_jax.cli.profile --config=profile_cpu \
      --output_json=latency_cpu.json [--config.kind=shapes]

Writes what `simulate`, `plan` and `sweep` read (`--config.latency=<the JSON's
path>`): with `kind=polynomial`, the fitted `PolynomialLatencyModel` (seconds)
with the raw samples beside it; with `kind=shapes`, the `ShapeTableLatencyModel`
of every compiled program shape of that instance. (A latency model, not a result
file: `pdserve_jax.results` is for served workloads.)
"""

import json
import os

from pdserve_jax.cli import engine_runs  # first: sets XLA_FLAGS before jax loads
from pdserve_jax.cli import common

RULES = {"kind": common.one_of("polynomial", "shapes"), "tp": common.at_least(1),
         "reps": common.at_least(1), "num_pages": common.at_least(2),
         **{k: common.at_least(1) for k in ("page_size", "max_batch", "max_seq_len",
                                            "min_token_bucket", "max_step_tokens")}}


def runner_from_config(c):
  import pdserve_jax as pdj
  from pdserve_jax.model import sharding
  from pdserve_jax.runtime.programs import InstanceRunner, RunnerShape

  model = pdj.random_model(engine_runs.preset(c.model), seed=0, std=c.init_std)
  shape = RunnerShape(page_size=c.page_size, num_pages=c.num_pages, max_rows=c.max_batch,
                      max_step_tokens=max(c.max_step_tokens, c.max_seq_len),
                      max_seq_len=c.max_seq_len, min_step_tokens=c.min_token_bucket)
  return InstanceRunner(model, sharding.split_devices([c.tp])[0], shape)


def main(c, out: common.Outputs):
  common.check(c, RULES)
  for key in ("prefill_batches", "prefill_lens", "decode_batches", "decode_contexts"):
    common.numbers(key, c[key], int)
  engine_runs.preset(c.model)
  import jax
  from pdserve_jax.runtime import profiler

  runner = runner_from_config(c)
  path = out.json or "latency_profile.json"
  if c.kind == "shapes":
    table = profiler.profile_shapes(runner, c.reps)
    table.save(path)
    print(f"backend={jax.default_backend()} model={c.model} tp={c.tp}: {len(table.packed)} "
          f"packed and {len(table.decode)} decode shapes timed")
    print(f"wrote {os.path.abspath(path)}")
    return
  fit, pre, dec = profiler.profile(runner, c.prefill_batches, c.prefill_lens,
                                   c.decode_batches, c.decode_contexts,
                                   c.max_step_tokens, c.reps)
  print(f"backend={jax.default_backend()} model={c.model} tp={c.tp}: "
        f"{len(pre)} prefill and {len(dec)} decode points")
  print(f"prefill s = {fit.prefill[0]:.3e} + {fit.prefill[1]:.3e}*S + {fit.prefill[2]:.3e}*S2")
  print(f"decode  s = {fit.decode_small[0]:.3e} + {fit.decode_small[1]:.3e}*C "
        f"+ {fit.decode_small[2]:.3e}*B")
  for name, samples, predict in (("prefill", pre, fit.prefill_time),
                                 ("decode", dec, fit.decode_time)):
    errs = [abs(predict(l) - t) / t for l, t in samples]
    print(f"{name} fit: median relative error {sorted(errs)[len(errs) // 2]:.1%}, "
          f"max {max(errs):.1%}")
  doc = dict(json.loads(fit.to_json()), backend=jax.default_backend(), model=c.model, tp=c.tp,
             prefill_samples=pre, decode_samples=dec)
  with open(path, "w") as f:
    json.dump(doc, f, indent=1)
  print(f"wrote {os.path.abspath(path)}")


if __name__ == "__main__":
  common.run(main, "profile_cpu", output_json="latency_profile.json")
