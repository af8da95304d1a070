"""Cost tables of Llama 3 programs compiled for TPU (`cli.tpu_cost`), read by
`configs/plan_llama3_tpu.py`. Made on a CPU-only machine with libtpu by:

  python -m pdserve_jax.cli.tpu_cost --config=latency/tpu_cost_llama3 \
      --config.model=llama3-8b --config.tp=8,4 \
      --output_json=configs/latency/llama3-8b_v5e.json
  python -m pdserve_jax.cli.tpu_cost --config=latency/tpu_cost_llama3 \
      --config.model=llama3-70b --config.tp=8 \
      --output_json=configs/latency/llama3-70b_v5e.json

The buckets are the engine's for a 128-row, 2048-token instance (the plan
config's `instance`); two points per program, the smallest and largest buckets
the plan uses most, between which the latency model interpolates. Each point is
compiled at 1 and 2 layers: about 1-3 min a compile for 8B on 2 cores, 3-4 min
for 70B, so these tables hold the tp the plans search (8B: 4 and 8; 70B: 8).
The counts do not depend on the TPU generation beyond layouts: the small preset's
programs compiled for v5e and v6e agree to 0.0002% in flops and 0.05% in bytes.
"""

import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.model = "llama3-8b"
  c.topology = "v5e:2x4"  # jax.experimental.topologies name; 8 chips
  c.tp = (8, 4)
  c.page_size = 16
  c.max_rows = 128
  c.max_step_tokens = 2048
  c.max_seq_len = 4096
  c.min_step_tokens = 256
  c.token_points = (256, 2048)  # packed buckets compiled
  c.batch_points = (8, 128)  # decode buckets compiled, paired with the above
  return c
