"""Decode step time against the memory roofline, on the current backend.

For the ~100M-parameter `llama-100m` config in float32 on one device: times one
decode step (host padding, dispatch, the jitted program, reading the tokens back)
at batch 1, 8 and 32 with 256 tokens of context each, and compares it with the
memory roofline: (weight bytes + KV bytes read) / copy bandwidth, the bandwidth
measured in the same run by timing a jitted, donated copy of a 256 MiB array.

  python benchmarks/decode_step.py [--context=256] [--steps=20]
"""

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

import pdserve_jax as pdj
from pdserve_jax.kv.allocator import PageAllocator
from pdserve_jax.model import sharding
from pdserve_jax.runtime.programs import InstanceRunner, RunnerShape, SamplingRows
from pdserve_jax.sim.profiler import median_time

flags.DEFINE_integer("context", 256, "tokens of context per request")
flags.DEFINE_integer("steps", 20, "timed steps per batch size")
flags.DEFINE_multi_integer("batch", [1, 8, 32], "batch sizes")
FLAGS = flags.FLAGS


def copy_bandwidth(nbytes=256 << 20):
  # The input is donated so the output reuses its memory: no fresh pages to fault in.
  copy = jax.jit(lambda a: a + 1.0, donate_argnums=0)
  x = [jnp.ones(nbytes // 4, jnp.float32)]

  def run():
    x[0] = copy(x[0])
    x[0].block_until_ready()

  return 2 * nbytes / median_time(run, 10)  # read + write


def main(_):
  cfg = pdj.get_preset("llama-100m")
  model = pdj.random_model(cfg, seed=0)
  ctx, page = FLAGS.context, 16
  max_b = max(FLAGS.batch)
  shape = RunnerShape(page_size=page, num_pages=max_b * (ctx // page + 2) + 1,
                      max_rows=max_b, max_step_tokens=16, max_seq_len=ctx + 2 * page)
  runner = InstanceRunner(model, sharding.make_mesh(jax.devices()[:1]), shape)
  alloc = PageAllocator(shape.num_pages, page, reserved=1)
  tables = [alloc.ensure(i, ctx + 1) for i in range(max_b)]
  bw = copy_bandwidth()
  weight_bytes = sum(a.nbytes for a in jax.tree.leaves(model.params))
  print(f"backend={jax.default_backend()} device={jax.devices()[0].device_kind} "
        f"params={cfg.num_params() / 1e6:.1f}M weights={weight_bytes / 2**20:.0f} MiB "
        f"copy bandwidth={bw / 1e9:.2f} GB/s")
  print(f"{'batch':>5} {'step ms':>9} {'roofline ms':>12} {'of roofline':>12} {'tok/s':>9}")
  for b in FLAGS.batch:
    rows = SamplingRows.greedy(b)
    step = lambda: np.asarray(runner.decode([1] * b, [ctx] * b, tables[:b], rows).tokens)
    t = median_time(step, FLAGS.steps)
    kv_bytes = b * (ctx + 1) * cfg.kv_bytes_per_token(4)
    roof = (weight_bytes + kv_bytes) / bw
    print(f"{b:>5} {t * 1e3:>9.2f} {roof * 1e3:>12.2f} {roof / t:>11.0%} {b / t:>9.0f}")


if __name__ == "__main__":
  app.run(main)
