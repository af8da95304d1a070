"""Planner: OPT-13B on one node of 8 A100-80GB with DistServe's latency figures, on
the conversation trace (lengths filtered to OPT's 2048-token context, Poisson
arrivals), under P90-style SLOs TTFT 0.25 s and TPOT 0.1 s (DistServe's chatbot
SLOs for OPT-13B).

  python -m pdserve_jax.cli.plan --config=configs/plan_opt13b.py
  ... --config.latency=roofline --config.tp_options=1,2,4,8
"""

import dataclasses

import ml_collections

from pdserve_jax.serving.share import PartitionerConfig


def get_config():
  c = ml_collections.ConfigDict()
  c.model = "opt-13b"
  c.hardware = "a100-80gb"
  c.latency = "distserve"  # "roofline", or a fitted polynomial JSON
  c.page_size = 16
  c.memory_utilization = 0.9
  # Workload: trace lengths with Poisson arrivals at each rate the search tries.
  c.workload = "trace"  # or "synthetic" (prompt_len / output_len below)
  c.trace = "../shared/data/traces/splitwise_conv.csv"
  c.max_total_tokens = 0  # 0: the model's context window
  c.prompt_len = 512
  c.output_len = 64
  c.num_requests = 500
  c.arrival = "poisson"
  c.cv = 1.0
  c.seed = 0
  c.ttft_slo = 0.25
  c.tpot_slo = 0.1
  # Search.
  c.num_nodes = 1
  c.tp_options = (1, 2, 4)  # DistServe's OPT-13B figures cover tp 1, 2 and 4
  c.pp_options = (1, 2, 4, 8)
  c.max_batch = 256
  c.max_prefill_tokens = 4096
  c.chunk_tokens = 512
  c.target = 0.9
  c.tol = 0.03
  c.target_rate = 0.0  # 0: the best goodput per device within the cluster
  c.modes = ("disaggregated", "semi_pd", "colocated")
  c.semi_pd_shares = (0.5, 0.6, 0.7, 0.8, 0.9)
  c.semi_pd_concurrent = False
  c.partitioner = ml_collections.ConfigDict(  # PartitionerConfig's defaults
      dict(dataclasses.asdict(PartitionerConfig())))
  return c
