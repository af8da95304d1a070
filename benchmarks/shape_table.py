"""How well a shape table prices program calls it never timed, on this backend.

Profiles every compiled shape of a small runner (`profiler.profile_shapes`), then
times ragged calls of other sizes that the runner pads into those buckets and
prints measured / table time for each. The table is exact when padding is all a
call's cost depends on; the target is a ratio within 0.5..2 on a quiet machine
(load from other processes widens it, which is why no test asserts it:
`tests/test_profiler.py` checks the bucket each call lands in instead).

  python benchmarks/shape_table.py [--reps=9]
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

import pdserve_jax as pdj  # noqa: E402
from pdserve_jax.model import sharding  # noqa: E402
from pdserve_jax.runtime.programs import InstanceRunner, RunnerShape, SamplingRows  # noqa: E402
from pdserve_jax.runtime import profiler  # noqa: E402

flags.DEFINE_string("model", "tiny", "model preset")
flags.DEFINE_integer("reps", 9, "timed calls per shape (the median is kept)")
FLAGS = flags.FLAGS

# (positions, page tables) of decode calls and (prompts, page tables) of prefill
# calls that no profiled call made: ragged rows padded into a bucket.
DECODES = [([10, 20, 30], [[1, 2], [3, 4, 5], [6, 7, 8, 9]]),
           ([5], [[1]]),
           ([7, 38], [[1], [2, 3, 4, 5, 6]])]
PREFILLS = [([20, 9], [[10, 11, 12], [13, 14]]),
            ([30], [[1, 2, 3, 4]]),
            ([17, 3], [[1, 2, 3], [4]])]


def main(_):
  model = pdj.random_model(pdj.get_preset(FLAGS.model), seed=0)
  shape = RunnerShape(page_size=8, num_pages=40, max_rows=4, max_step_tokens=64, max_seq_len=64,
                      min_step_tokens=16)
  runner = InstanceRunner(model, sharding.split_devices([1])[0], shape)
  runner.warmup()
  table = profiler.profile_shapes(runner, reps=FLAGS.reps)
  print(f"{'call':<34} {'bucket':<12} {'measured ms':>11} {'table ms':>9} {'ratio':>6}")
  ratios = []
  for positions, tables in DECODES:
    key = shape.decode_shape(len(tables))
    rows = SamplingRows.greedy(len(tables))
    t = profiler.median_time(lambda: np.asarray(runner.decode(
        [1] * len(tables), positions, tables, rows).tokens), FLAGS.reps)
    ratios.append(t / table.decode[key])
    print(f"{f'decode context {positions}':<34} {str(key):<12} {t * 1e3:>11.2f} "
          f"{table.decode[key] * 1e3:>9.2f} {ratios[-1]:>6.2f}")
  for lens, tables in PREFILLS:
    (key,), _ = shape.step_calls(lens, 0)
    prompts, rows = [[1] * n for n in lens], SamplingRows.greedy(len(lens))
    t = profiler.median_time(lambda: np.asarray(runner.packed(
        prompts, [0] * len(lens), tables, rows).tokens), FLAGS.reps)
    ratios.append(t / table.packed[key])
    print(f"{f'packed prompts {lens}':<34} {str(key):<12} {t * 1e3:>11.2f} "
          f"{table.packed[key] * 1e3:>9.2f} {ratios[-1]:>6.2f}")
  inside = sum(0.5 < r < 2.0 for r in ratios)
  print(f"{inside}/{len(ratios)} calls within 0.5..2x of the table "
        f"(ratios {min(ratios):.2f}..{max(ratios):.2f})")


if __name__ == "__main__":
  app.run(main)
