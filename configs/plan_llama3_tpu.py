"""Planner: Llama 3 8B on one v5e host (8 chips) from the cost table of its
programs compiled for TPU (`configs/latency/llama3-8b_v5e.json`: XLA's flops, bytes
and collectives per tp and bucket; attention added from contexts; see
`sim.latency.tpu_cost`), on the conversation trace under P90-style SLOs TTFT
0.4 s and TPOT 0.05 s. The efficiency factors are printed with the plan and set by
`--config.latency_params.<name>=<value>`. Run from the repository root:

  python -m pdserve_jax.cli.plan --config=plan_llama3_tpu
  ... --config.hardware=v6e       # Trillium, the same counts at its peaks
  python -m pdserve_jax.cli.plan --config=plan_llama3_70b_tpu

The table was made by (`configs/latency/tpu_cost_llama3.py`, ~15 min on 2 cores):

  python -m pdserve_jax.cli.tpu_cost --config=latency/tpu_cost_llama3 \
      --config.model=llama3-8b --config.tp=8,4 \
      --output_json=configs/latency/llama3-8b_v5e.json

It holds tp 4 and 8 only (what was compiled), so the plan searches those. The
counts are of the programs compiled for a v5e; a v6e plan applies them at v6e's
peaks (flops are the program's; bytes may differ by layouts).
"""

import os

from pdserve_jax.cli.plan import tpu_config

TABLE = os.path.join(os.path.dirname(__file__), "latency", "llama3-8b_v5e.json")


def get_config():
  return tpu_config("llama3-8b", TABLE, ttft_slo=0.4,
                    tpot_slo=0.05, num_nodes=1, tp_options=(4, 8), pp_options=(1, 2))
