"""Pure decode steps through the packed program (ragged paged attention) vs the
decode program (paged decode attention), side by side on this backend.

Issue 13 keeps the decode program for pure-decode steps where it is faster; this
prints both per batch size and context, as medians of timed calls of the same
runner (ids and pages alike), and the ratio. On CPU both use the jnp references; on
GPU/TPU the Pallas kernels.

  python benchmarks/ragged_vs_decode.py [--model=llama-100m] [--batch=1,8,32] [--context=256]
"""

import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

flags.DEFINE_string("model", "llama-100m", "model preset (random weights)")
flags.DEFINE_list("batch", ["1", "8", "32"], "decode batch sizes")
flags.DEFINE_integer("context", 256, "tokens each row attends over")
flags.DEFINE_integer("reps", 10, "timed calls per point")
FLAGS = flags.FLAGS


def main(_):
  import jax
  import numpy as np

  import pdserve_jax as pdj
  from pdserve_jax.core.pages import PageAllocator
  from pdserve_jax.model import sharding
  from pdserve_jax.runtime.programs import InstanceRunner, RunnerShape, SamplingRows
  from pdserve_jax.runtime.profiler import median_time

  batches = [int(b) for b in FLAGS.batch]
  ctx, page = FLAGS.context, 16
  model = pdj.random_model(pdj.get_preset(FLAGS.model), seed=0)
  width = ctx + 2 * page
  shape = RunnerShape(page_size=page, num_pages=max(batches) * (width // page) + 1,
                      max_rows=max(batches), max_step_tokens=max(batches), max_seq_len=width,
                      min_step_tokens=1)
  runner = InstanceRunner(model, sharding.make_mesh(jax.devices()[:1]), shape)
  alloc = PageAllocator(shape.num_pages, page, reserved=1)
  tables = [alloc.ensure(i, ctx + 1) for i in range(max(batches))]
  print(f"backend={jax.default_backend()} model={FLAGS.model} context={ctx}")
  print(f"{'batch':>6}{'packed ms':>11}{'decode ms':>11}{'packed/decode':>15}")
  for b in batches:
    rows = SamplingRows.greedy(b)
    packed = median_time(lambda: np.asarray(runner.packed(
        [[1]] * b, [ctx] * b, tables[:b], rows).tokens), FLAGS.reps)
    decode = median_time(lambda: np.asarray(runner.decode(
        [1] * b, [ctx] * b, tables[:b], rows).tokens), FLAGS.reps)
    print(f"{b:>6}{packed * 1e3:>11.2f}{decode * 1e3:>11.2f}{packed / decode:>15.2f}",
          flush=True)


if __name__ == "__main__":
  app.run(main)
