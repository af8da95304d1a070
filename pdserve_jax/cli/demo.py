"""`make demo`: a small model saved, reloaded and generating greedily on a 2-way mesh."""

import os
import tempfile

from absl import app
import jax
import numpy as np

import pdserve_jax as pdj
from pdserve_jax.kv.allocator import PageAllocator
from pdserve_jax.model import sharding
from pdserve_jax.runtime.programs import InstanceRunner, RunnerShape, SamplingRows


def main(_):
  cfg = pdj.get_preset("small")
  with tempfile.TemporaryDirectory() as d:
    pdj.random_model(cfg, seed=0, std=0.1).save(os.path.join(d, "ckpt"))
    model = pdj.load(os.path.join(d, "ckpt"))
  runner = InstanceRunner(model, sharding.make_mesh(jax.devices()[:2]),
                          RunnerShape(page_size=16, num_pages=64, max_seq_len=256))
  prompts = [[1, 2, 3, 4], list(range(10, 40))]
  alloc = PageAllocator(64, 16, reserved=1)
  tables = [alloc.ensure(i, len(p) + 16) for i, p in enumerate(prompts)]
  out = [[int(t)] for t in np.asarray(runner.prefill(prompts, [0, 0], tables,
                                                     SamplingRows.greedy(2)))[:2]]
  for step in range(1, 16):
    nxt = np.asarray(runner.decode([o[-1] for o in out], [len(p) + step - 1 for p in prompts],
                                   tables, SamplingRows.greedy(2)))
    for o, t in zip(out, nxt):
      o.append(int(t))
  ref = pdj.greedy_reference(model, prompts, 16)
  for p, o, r in zip(prompts, out, ref):
    print(f"prompt[{len(p)}] -> {o}  {'matches' if o == r else 'DIFFERS FROM'} forward()")


if __name__ == "__main__":
  app.run(main)
