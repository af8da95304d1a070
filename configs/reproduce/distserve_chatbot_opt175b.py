"""DistServe (arXiv 2401.09670) Figure 8, chatbot, OPT-175B: SLOs TTFT 4.0 s and TPOT
0.2 s at 90% (DistServe's artifact, evaluation/ae-scripts/e2e/_plot.py: DistServe on
21 GPUs, vLLM on 8). DistServe published no OPT-175B coefficients, so both systems
run on the roofline model (A100-80GB): the baseline then differs from DistServe only
in how it serves, not in a slower engine. Lengths from the Azure conversation trace.
DistServe's placement is our planner's pick on three 8-GPU nodes.
"""

from pdserve_jax import workloads
from pdserve_jax.cli.reproduce import experiment, system


def get_config():
  return experiment(
      title="DistServe Figure 8, chatbot, OPT-175B (roofline)",
      source="DistServe (arXiv 2401.09670), Figure 8 (chatbot), section 6.2",
      model="opt-175b", ttft_slo=4.0, tpot_slo=0.2,
      workload=workloads.config(source="trace",
                                trace="../shared/data/traces/splitwise_conv.csv",
                                num_requests=1000),
      num_nodes=3, tp_options=(4, 8), pp_options=(1, 2, 3),
      systems=dict(
          vllm=system("vLLM, colocated tp8 (roofline)", "roofline", "colocated_prefill_first",
                      tp=8),
          distserve=system("DistServe, planned (roofline)", "roofline", "disaggregated",
                           plan=True)),
      ratios=dict(distserve_over_vllm=("distserve", "vllm", 2.0, 4.6)),
      notes="Roofline latencies: no published OPT-175B coefficients. Conversation-trace "
            "lengths stand in for ShareGPT.")
