"""semi-PD on the conversation trace: OPT-13B on one A100-80GB (DistServe's latency
figures), prefill and decode time-sliced from a 0.7 prefill share, moved online by
the SLO-aware partitioner; the trace's lengths (filtered to OPT's 2048-token
context) with Poisson arrivals.

  python -m pdserve_jax.cli.simulate --config=configs/simulate_semipd_conv.py
  ... --config.concurrent=True --config.decode_scaling=0.3,0.7  # SM partitioning
"""

import dataclasses

import ml_collections

from pdserve_jax.serving.share import PartitionerConfig


def get_config():
  c = ml_collections.ConfigDict()
  c.model = "opt-13b"
  c.hardware = "a100-80gb"
  c.latency = "distserve"
  c.page_size = 16
  c.memory_utilization = 0.9
  c.workload = "trace"
  c.trace = "../shared/data/traces/splitwise_conv.csv"
  c.max_total_tokens = 0  # 0: the model's context window
  c.prompt_len = 512  # synthetic workloads only
  c.output_len = 64
  c.num_requests = 2000
  c.rate = 2.5  # requests/s; 0 replays the trace's arrivals (4.7/s, too many for one GPU)
  c.arrival = "poisson"
  c.cv = 1.0
  c.seed = 0
  c.ttft_slo = 0.25
  c.tpot_slo = 0.1
  c.mode = "semi_pd"
  c.instance = ml_collections.ConfigDict(dict(tp=1, pp=1, max_batch=256, max_tokens=4096))
  c.replicas = 1
  c.prefill_share = 0.7
  c.concurrent = False  # True: both phases at once on partitioned SMs
  c.prefill_scaling = (1.0, 0.0)  # ShareScaling (alpha, beta) under SM partitioning
  c.decode_scaling = (1.0, 0.0)
  c.dynamic = True
  c.partitioner = ml_collections.ConfigDict(  # PartitionerConfig's defaults but the window
      dict(dataclasses.asdict(PartitionerConfig()), window=64))
  return c
