"""absl app: XLA's flops, bytes and collectives of the engine's programs compiled
for a TPU topology (compile-only devices from libtpu: no TPU needed), as the cost
table `plan`, `simulate` and `sweep` read (`--config.latency=<the JSON>`).

  python -m pdserve_jax.cli.tpu_cost --config=latency/tpu_cost_llama3 \
      --config.model=llama3-8b --config.tp=1,2,4,8 \
      --output_json=configs/latency/llama3-8b_tpu.json

What is compiled and why (layers unrolled at 1 and 2, a 2-page pool, attention's
kernels left to the latency model): `runtime.cost`. A program of an 8B model takes
about a minute to compile on a 2-core machine; a table is 4 compiles per point
and tp.
"""

import json
import sys

from pdserve_jax.cli import common

RULES = {**{k: common.at_least(1) for k in ("page_size", "max_rows", "max_step_tokens",
                                             "max_seq_len", "min_step_tokens")}}


def main(c, out: common.Outputs):
  common.check(c, RULES)
  from jax.experimental import topologies

  from pdserve_jax.model.config import get_preset
  from pdserve_jax.runtime import cost
  from pdserve_jax.runtime.buckets import RunnerShape

  if not out.json:
    raise ValueError("--output_json is required: where to write the cost table")
  shape = RunnerShape(page_size=c.page_size, max_rows=c.max_rows,
                      max_step_tokens=c.max_step_tokens, max_seq_len=c.max_seq_len,
                      min_step_tokens=c.min_step_tokens)
  devices = topologies.get_topology_desc(c.topology, "tpu").devices
  command = " ".join(["python -m pdserve_jax.cli.tpu_cost"] + sys.argv[1:])

  def write(table):  # after each tp, so a long build keeps what it compiled
    with open(out.json, "w") as f:
      json.dump(dict(table, command=command), f, indent=1)

  table = cost.build_cost_table(
      get_preset(c.model), devices, c.topology, shape, common.numbers("tp", c.tp, int),
      common.numbers("token_points", c.token_points, int),
      common.numbers("batch_points", c.batch_points, int),
      progress=lambda s: print(s, file=sys.stderr, flush=True), on_tp=write)
  write(table)
  print(f"wrote {out.json}")


if __name__ == "__main__":
  common.run(main, "latency/tpu_cost_llama3")
