"""DistServe's Figure 1 scenario: OPT-13B, 512-token prompts, 64 output tokens, on
A100-80GB with DistServe's latency figures, served by 2 prefill + 1 decode GPUs.

  python -m pdserve_jax.cli.simulate --config=configs/simulate_distserve_fig1.py
  ... --config.mode=colocated --config.rate=1.6
"""

import dataclasses

import ml_collections

from pdserve_jax.serving.share import PartitionerConfig


def _instance(tp=1, pp=1):
  return ml_collections.ConfigDict(dict(tp=tp, pp=pp, max_batch=256, max_tokens=4096))


def get_config():
  c = ml_collections.ConfigDict()
  c.model = "opt-13b"
  c.hardware = "a100-80gb"
  c.latency = "distserve"  # "roofline", or a fitted polynomial JSON
  c.page_size = 16
  c.memory_utilization = 0.9
  # Workload.
  c.workload = "synthetic"
  c.prompt_len = 512
  c.output_len = 64
  c.trace = "../shared/data/traces/splitwise_conv.csv"
  c.max_total_tokens = 0  # 0: the model's context window
  c.num_requests = 1000
  c.rate = 9.9  # requests/s; 0 replays a trace's own arrivals
  c.arrival = "poisson"
  c.cv = 1.0
  c.seed = 0
  c.ttft_slo = 0.4
  c.tpot_slo = 0.04
  # Deployment.
  c.mode = "disaggregated"  # "colocated", "semi_pd"
  c.instance = _instance()
  c.replicas = 1
  c.policy = "prefill_first"  # or "chunked" (then instance.max_tokens is the budget)
  c.prefill = _instance()
  c.decode = _instance()
  c.num_prefill = 2
  c.num_decode = 1
  c.same_node = True
  c.prefill_share = 0.5
  c.concurrent = False
  c.prefill_scaling = (1.0, 0.0)  # semi-PD ShareScaling (alpha, beta)
  c.decode_scaling = (1.0, 0.0)
  c.dynamic = False
  c.partitioner = ml_collections.ConfigDict(  # PartitionerConfig's defaults
      dict(dataclasses.asdict(PartitionerConfig())))
  return c
