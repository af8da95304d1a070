"""Attainment vs rate from the simulator alone, on DistServe's OPT-13B figures for
A100-80GB (Figure 8's axes; Figure 1's lengths and SLOs): colocated and semi-PD on
one GPU, disaggregated on one prefill and one decode GPU. Seconds to run.

  python -m pdserve_jax.cli.sweep --config=sweep_opt13b
  ... --config.rates=1,2,3,4,5,6 --config.workload.source=trace \
      --config.workload.trace=../shared/data/traces/splitwise_conv.csv
"""

import ml_collections

from pdserve_jax import workloads
from pdserve_jax.cli import deployments


def get_config():
  c = ml_collections.ConfigDict()
  c.model = "opt-13b"
  c.hf_path = ""  # the engine's model keys, unused without it
  c.checkpoint = ""
  c.dtype = "float32"
  c.init_std = 0.1
  c.seed = 0
  c.run_engine = False
  c.latency = "distserve"  # or "roofline", or a profiled JSON (cli.profile)
  c.overheads = "none"  # or "distserve": its per-step costs, as in its paper
  c.profile_reps = 5
  c.hardware = "a100-80gb"
  c.page_size = 16
  c.memory_utilization = 0.9
  c.modes = ("colocated_prefill_first", "colocated_chunked", "disaggregated", "semi_pd")
  c.rates = (1.0, 2.0, 4.0, 6.0, 8.0, 10.0, 12.0, 14.0, 16.0)
  c.target = 0.9
  c.ttft_slo = 0.4
  c.tpot_slo = 0.04
  c.update(deployments.blocks(semi_pd=dict(dynamic=True)))
  c.engine = ml_collections.ConfigDict(dict(page_size=16))  # unused without the engine
  c.workload = workloads.config(num_requests=400, prompt_mean=512, output_mean=64)
  c.num_seeds = 3  # per rate; the curves draw the mean
  return c
