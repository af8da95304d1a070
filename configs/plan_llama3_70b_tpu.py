"""Planner: Llama 3 70B on two v5e hosts (16 chips: its 140 GB of bf16 weights
need more than one host's 128 GB) from the cost table of its programs compiled for
TPU (`configs/latency/llama3-70b_v5e.json`; see `configs/plan_llama3_tpu.py` and
`sim.latency.tpu_cost`), on the conversation trace under P90-style SLOs TTFT 1 s
and TPOT 0.1 s. Run from the repository root:

  python -m pdserve_jax.cli.plan --config=plan_llama3_70b_tpu
  ... --config.hardware=v6e --config.num_nodes=1   # Trillium: one host holds it

The table was made by (`configs/latency/tpu_cost_llama3.py`):

  python -m pdserve_jax.cli.tpu_cost --config=latency/tpu_cost_llama3 \
      --config.model=llama3-70b --config.tp=8 \
      --output_json=configs/latency/llama3-70b_v5e.json

It holds tp 8 only (4 compiles of about 3-4 min each on 2 cores), so the plan
searches tp 8 with pipeline stages across hosts. The counts are of programs
compiled for a v5e; a v6e plan applies them at v6e's peaks.
"""

import os

from pdserve_jax.cli.plan import tpu_config

TABLE = os.path.join(os.path.dirname(__file__), "latency", "llama3-70b_v5e.json")


def get_config():
  return tpu_config("llama3-70b", TABLE, ttft_slo=1.0,
                    tpot_slo=0.1, num_nodes=2, tp_options=(8,), pp_options=(1, 2, 4))
