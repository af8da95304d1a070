"""The planner's answer at scale, runnable from any directory (`plan`'s default, the
second half of `make demo`): DistServe's Figure 1 scenario (arXiv 2401.09670):
OPT-13B, 512-token prompts and 64 output tokens, SLOs TTFT 0.4 s and TPOT 0.04 s, on
one node of 8 A100-80GB with DistServe's latency figures and the per-step costs its
simulator adds. The planner searches every mode's placements (tp, pp, instance
counts, semi-PD shares) and prints each mode's best with its goodput per GPU, and
the winner. One workload seed: a quick ranking (on seeds 0, 1 and 2 the winner and
its margin over the next mode, 1.4-1.6x, held; `--config.max_spread=0.05` measures
the kept placements over seeds).

  python -m pdserve_jax.cli.plan                          # this config
  python -m pdserve_jax.cli.plan --config.print_candidates=True --plots_dir=plan_plots
"""

import ml_collections

from pdserve_jax import workloads
from pdserve_jax.cli import deployments


def get_config():
  c = ml_collections.ConfigDict()
  c.model = "opt-13b"
  c.hardware = "a100-80gb"
  c.latency = "distserve"
  c.overheads = "distserve"  # its simulator's per-step costs, as in simulate_distserve_fig1
  c.page_size = 16
  c.memory_utilization = 0.9
  c.ttft_slo = 0.4
  c.tpot_slo = 0.04
  c.modes = ("disaggregated", "semi_pd", "colocated_prefill_first", "colocated_chunked")
  blocks = deployments.blocks()
  c.instance = blocks["instance"]
  c.semi_pd = blocks["semi_pd"]
  c.workload = workloads.config(num_requests=200, prompt_mean=512, output_mean=64)
  c.num_nodes = 1
  c.tp_options = (1, 2, 4)  # DistServe's OPT-13B figures cover tp 1, 2 and 4
  c.pp_options = (1, 2, 4, 8)
  c.semi_pd_shares = (0.5, 0.6, 0.7, 0.8, 0.9)
  c.target = 0.9
  c.tol = 0.03
  c.target_rate = 0.0
  c.max_spread = 0.0  # one seed
  c.min_seeds = 3
  c.max_seeds = 24
  c.print_candidates = False  # each mode's best placement only
  return c
