"""absl app: time this library's prefill and decode programs into a latency model.

  python -m pdserve_jax.cli.profile --config=configs/profile_cpu.py \
      --output_json=latency_cpu.json [--config.kind=shapes]

Writes what `sim` and the planner read (`latency_source` with the JSON's path):
with `kind=polynomial`, the fitted `PolynomialLatencyModel` (seconds) with the raw
samples beside it; with `kind=shapes`, the `ShapeTableLatencyModel` of every
compiled program shape of that instance.
"""

import json
import os

from absl import app, flags
from ml_collections import config_flags

import jax  # noqa: E402

import pdserve_jax as pdj  # noqa: E402
from pdserve_jax.model import sharding  # noqa: E402
from pdserve_jax.runtime.programs import InstanceRunner, RunnerShape  # noqa: E402
from pdserve_jax.sim import profiler  # noqa: E402

config_flags.DEFINE_config_file("config", "configs/profile_cpu.py", "profiling grid")
flags.DEFINE_string("output_json", "latency_profile.json", "where to write the fit")


def runner_from_config(c) -> InstanceRunner:
  model = pdj.random_model(pdj.get_preset(c.model), seed=0, std=c.init_std)
  shape = RunnerShape(page_size=c.page_size, num_pages=c.num_pages, max_decode_batch=c.max_batch,
                      max_prefill_batch=c.max_prefill_batch,
                      max_prefill_len=max(c.prefill_lens), max_seq_len=c.max_seq_len,
                      min_prefill_len=c.min_prefill_bucket, min_table_width=c.min_pages_bucket)
  return InstanceRunner(model, sharding.split_devices([c.tp])[0], shape)


def main(_):
  c = flags.FLAGS.config
  runner = runner_from_config(c)
  if c.kind == "shapes":
    table = profiler.profile_shapes(runner, c.reps)
    table.save(flags.FLAGS.output_json)
    print(f"backend={jax.default_backend()} model={c.model} tp={c.tp}: {len(table.prefill)} "
          f"prefill and {len(table.decode)} decode shapes timed")
    print(f"wrote {os.path.abspath(flags.FLAGS.output_json)}")
    return
  if c.kind != "polynomial":
    raise app.UsageError(f"kind must be 'polynomial' or 'shapes', got {c.kind!r}")
  fit, pre, dec = profiler.profile(runner, c.prefill_batches, c.prefill_lens,
                                   c.decode_batches, c.decode_contexts,
                                   c.max_prefill_tokens, c.reps)
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
  out = dict(json.loads(fit.to_json()), backend=jax.default_backend(), model=c.model, tp=c.tp,
             prefill_samples=pre, decode_samples=dec)
  with open(flags.FLAGS.output_json, "w") as f:
    json.dump(out, f, indent=1)
  print(f"wrote {os.path.abspath(flags.FLAGS.output_json)}")


if __name__ == "__main__":
  app.run(main)
