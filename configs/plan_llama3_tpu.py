"""Planner: Llama 3 8B on one v5e host (8 chips) from the cost table of its
programs compiled for TPU (`configs/latency/llama3-8b_v5e.json`: XLA's flops, bytes
and collectives per tp and bucket; attention added from contexts; see
`sim.latency.tpu_cost`), on the conversation trace under P90-style SLOs TTFT
0.4 s and TPOT 0.05 s. The efficiency factors are printed with the plan and set by
`--config.latency_params.<name>=<value>`. Run from the repository root:

  python -m pdserve_jax.cli.plan --config=configs/plan_llama3_tpu.py
  ... --config.hardware=v6e       # Trillium, the same counts at its peaks
  python -m pdserve_jax.cli.plan --config=configs/plan_llama3_70b_tpu.py

The table was made by (`configs/latency/tpu_cost_llama3.py`, ~15 min on 2 cores):

  python -m pdserve_jax.cli.tpu_cost --config=configs/latency/tpu_cost_llama3.py \
      --config.model=llama3-8b --config.tp=8,4 \
      --output_json=configs/latency/llama3-8b_v5e.json

It holds tp 4 and 8 only (what was compiled), so the plan searches those. The
counts are of the programs compiled for a v5e; a v6e plan applies them at v6e's
peaks (flops are the program's; bytes may differ by layouts).
"""

import ml_collections

from pdserve_jax import workloads
from pdserve_jax.cli import modes


def get_config():
  c = ml_collections.ConfigDict()
  c.model = "llama3-8b"
  c.hardware = "v5e"
  c.latency = "configs/latency/llama3-8b_v5e.json"
  # TpuCostLatencyModel's factors (its defaults, written out to be seen and set).
  c.latency_params = ml_collections.ConfigDict(dict(
      mxu_efficiency=0.6, hbm_efficiency=0.8, ici_efficiency=0.7, step_overhead_s=2e-3))
  c.overheads = "none"
  c.page_size = 16
  c.memory_utilization = 0.9
  c.ttft_slo = 0.4
  c.tpot_slo = 0.05
  c.modes = ("disaggregated", "colocated_prefill_first", "colocated_chunked")
  blocks = modes.blocks()
  c.instance = blocks["instance"]
  # The table's buckets: 128 rows, 2048-token packed calls.
  c.instance.max_batch = 128
  c.instance.max_tokens = 2048
  c.instance.chunk_tokens = 512
  c.semi_pd = blocks["semi_pd"]
  c.workload = workloads.config(source="trace", trace="../shared/data/traces/splitwise_conv.csv",
                                num_requests=300)
  c.num_nodes = 1
  c.tp_options = (4, 8)
  c.pp_options = (1, 2)
  c.semi_pd_shares = (0.5, 0.6, 0.7)
  c.target = 0.9
  c.tol = 0.05
  c.target_rate = 0.0
  c.max_spread = 0.0  # one seed: a quick ranking
  c.min_seeds = 3
  c.max_seeds = 8
  return c
