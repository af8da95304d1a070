"""Decode step time against the memory roofline, on the current backend.

For the ~100M-parameter `llama-100m` config in float32 on one device: times one
decode step (host padding, dispatch, the jitted program, reading the tokens back)
at batch 1, 8 and 32 with 256 tokens of context each, against two floors for the
bytes a step must read (every weight but the embedding table, of which a step reads
one row per token, plus the K/V of its context):

- the memory roofline: those bytes over the copy bandwidth (a jitted, donated
  `a + 1` over 256 MiB; read + write bytes over its time);
- the read ceiling: one jitted matrix-vector product over a matrix of those bytes,
  the fastest way we found for XLA on this backend to read them. `ceiling / roofline`
  bounds what fraction of the roofline any program can reach here.

A shared host's bandwidth drifts from minute to minute, so the three are timed in
alternating rounds and each figure is the median of its rounds' ratios.

  python benchmarks/decode_step.py [--context=256] [--steps=20] [--rounds=5]
"""

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

import pdserve_jax as pdj
from pdserve_jax.core.pages import PageAllocator
from pdserve_jax.model import sharding
from pdserve_jax.runtime.programs import InstanceRunner, RunnerShape, SamplingRows
from pdserve_jax.runtime.profiler import median_time

flags.DEFINE_integer("context", 256, "tokens of context per request")
flags.DEFINE_integer("steps", 20, "timed steps per batch size and round")
flags.DEFINE_integer("rounds", 5, "alternating rounds of step, copy and read timings")
flags.DEFINE_multi_integer("batch", [1, 8, 32], "batch sizes")
FLAGS = flags.FLAGS


def copy_timer(nbytes=256 << 20):
  """() -> copy bandwidth in bytes/s (read + write) of one timing."""
  # The input is donated so the output reuses its memory: no fresh pages to fault in.
  copy = jax.jit(lambda a: a + 1.0, donate_argnums=0)
  x = [jnp.ones(nbytes // 4, jnp.float32)]

  def run():
    x[0] = copy(x[0])
    x[0].block_until_ready()

  return lambda: 2 * nbytes / median_time(run, 10)


def read_timer(nbytes: int, width: int):
  """() -> seconds for one matrix-vector product over `nbytes` of float32."""
  w = jnp.ones((nbytes // (4 * width), width), jnp.float32)
  v = jnp.ones((1, width), jnp.float32)
  matvec = jax.jit(lambda v, w: v @ w.T)
  return lambda: median_time(lambda: matvec(v, w).block_until_ready(), 10)


def step_bytes(cfg, params, batch: int, context: int) -> int:
  weights = sum(a.nbytes for a in jax.tree.leaves(params))
  if not cfg.tie_word_embeddings:  # a tied table is read whole, as the LM head
    weights -= params["embed"].nbytes - batch * params["embed"][0].nbytes
  return weights + batch * (context + 1) * cfg.kv_bytes_per_token(4)


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
  copy_bw = copy_timer()
  print(f"backend={jax.default_backend()} device={jax.devices()[0].device_kind} "
        f"params={cfg.num_params() / 1e6:.1f}M")
  print(f"{'batch':>5} {'MiB read':>9} {'step ms':>8} {'copy GB/s':>10} {'roofline ms':>12} "
        f"{'of roofline':>12} {'ceiling ms':>11} {'of ceiling':>11} {'ceiling/roofline':>17} "
        f"{'tok/s':>6}")
  for b in FLAGS.batch:
    nbytes = step_bytes(cfg, model.params, b, ctx)
    read = read_timer(nbytes, cfg.hidden_size)
    rows = SamplingRows.greedy(b)
    step = lambda: np.asarray(runner.decode([1] * b, [ctx] * b, tables[:b], rows).tokens)
    rounds = []
    for _ in range(FLAGS.rounds):
      t, bw, ceiling = median_time(step, FLAGS.steps), copy_bw(), read()
      rounds.append((t, bw, nbytes / bw, ceiling))
    t, bw, roof, ceiling = np.median(rounds, axis=0)
    of_roof = np.median([r / s for s, _, r, _ in rounds])
    of_ceiling = np.median([c / s for s, _, _, c in rounds])
    ceiling_of_roof = np.median([r / c for _, _, r, c in rounds])
    print(f"{b:>5} {nbytes / 2**20:>9.0f} {t * 1e3:>8.2f} {bw / 1e9:>10.1f} {roof * 1e3:>12.2f} "
          f"{of_roof:>11.0%} {ceiling * 1e3:>11.2f} {of_ceiling:>10.0%} {ceiling_of_roof:>16.0%} "
          f"{b / t:>6.0f}")
    del read


if __name__ == "__main__":
  app.run(main)
