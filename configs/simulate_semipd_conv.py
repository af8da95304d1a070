"""semi-PD on the conversation trace: OPT-13B on one A100-80GB (DistServe's latency
figures), prefill and decode time-sliced from a 0.7 prefill share, moved online by
the SLO-aware partitioner; the trace's lengths (filtered to OPT's 2048-token
context) with Poisson arrivals. Run from the repository root (the trace path is
relative to the current directory).

  python -m pdserve_jax.cli.simulate --config=simulate_semipd_conv
  ... --config.semi_pd.concurrent=True --config.semi_pd.decode_scaling=0.3,0.7  # SM partitioning
"""

import ml_collections

from pdserve_jax import workloads
from pdserve_jax.cli import deployments


def get_config():
  c = ml_collections.ConfigDict()
  c.model = "opt-13b"
  c.hardware = "a100-80gb"
  c.latency = "distserve"
  c.overheads = "none"  # or "distserve": its per-step costs, as in its paper
  c.page_size = 16
  c.memory_utilization = 0.9
  c.ttft_slo = 0.25
  c.tpot_slo = 0.1
  c.modes = ("semi_pd",)
  c.update(deployments.blocks(semi_pd=dict(prefill_share=0.7, dynamic=True,
                                     partitioner=dict(window=64))))
  # rate 0 replays the trace's own arrivals (4.7/s, too many for one GPU).
  c.workload = workloads.config(source="trace", trace="../shared/data/traces/splitwise_conv.csv",
                                num_requests=2000, rate=2.5)
  return c
