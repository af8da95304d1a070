"""DistServe (arXiv 2401.09670) Figure 8, chatbot, OPT-175B: SLOs TTFT 4.0 s and TPOT
0.2 s at 90% (DistServe's artifact, evaluation/ae-scripts/e2e/_plot.py: DistServe on
21 GPUs, vLLM on 8). DistServe published no OPT-175B coefficients, so both systems
run on the roofline model (A100-80GB): the baseline then differs from DistServe only
in how it serves, not in a slower engine. Lengths from the Azure conversation trace.
DistServe's placement is our planner's pick on three 8-GPU nodes.
"""

from pdserve_jax.cli.reproduce import distserve_panel, trace_workload


def get_config():
  return distserve_panel(
      "opt-175b", vllm_tp=8, paper=(2.0, 4.6), roofline=True, figure="Figure 8 (chatbot)",
      title="DistServe Figure 8, chatbot, OPT-175B (roofline)", ttft_slo=4.0, tpot_slo=0.2,
      workload=trace_workload("splitwise_conv"), num_nodes=3, tp_options=(4, 8),
      pp_options=(1, 2, 3),
      notes="Roofline latencies: no published OPT-175B coefficients. Conversation-trace "
            "lengths stand in for ShareGPT.")
