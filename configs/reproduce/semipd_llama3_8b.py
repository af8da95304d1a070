"""semi-PD (arXiv 2504.19867): unified storage, disaggregated compute, on a Llama model.

The paper serves 1.55-1.72x more requests within latency SLOs than the best of the
state-of-the-art systems on Llama models (its abstract). Its GPUs' measured SM-share
curves, SLOs and traces are not on this machine, so here: Llama-3-8B on A100-80GB
on the roofline model (no published coefficients), the Azure conversation trace,
and DistServe's OPT-13B chatbot SLOs (TTFT 0.25 s, TPOT 0.1 s at 90%) as a
same-size stand-in. Each system's placement is our planner's pick on one 8-GPU
node: colocated (prefill-first), disaggregated, semi-PD time-shared (the engine's
variant: best fixed share, then the SLO partitioner) and semi-PD with SM
partitioning (phases concurrent). SM partitioning's slowdowns are our assumption:
prefill compute-bound, t/s; decode mostly memory-bound, t * (0.3 / s + 0.7).
"""

from pdserve_jax.cli.reproduce import experiment, system, trace_workload


def get_config():
  return experiment(
      title="semi-PD vs colocated and disaggregated, Llama-3-8B (roofline)",
      source="semi-PD (arXiv 2504.19867), abstract and evaluation",
      model="llama3-8b", ttft_slo=0.25, tpot_slo=0.1, overheads="none",
      workload=trace_workload("splitwise_conv"),
      tp_options=(1, 2, 4), pp_options=(1,),
      systems=dict(
          colocated=system("colocated, prefill-first", "roofline", "colocated_prefill_first",
                           plan=True),
          disaggregated=system("disaggregated", "roofline", "disaggregated", plan=True),
          semi_pd_time=system("semi-PD, time-shared", "roofline", "semi_pd", plan=True),
          semi_pd_sm=system("semi-PD, SM partitions", "roofline", "semi_pd", plan=True,
                            concurrent=True, decode_scaling=(0.3, 0.7))),
      ratios=dict(
          sm_over_colocated=("semi_pd_sm", "colocated", 1.55, 1.72),
          sm_over_disaggregated=("semi_pd_sm", "disaggregated", 1.55, 1.72),
          time_over_colocated=("semi_pd_time", "colocated", 1.55, 1.72),
          time_over_disaggregated=("semi_pd_time", "disaggregated", 1.55, 1.72)),
      notes="Roofline latencies, a stand-in trace and SLOs, and assumed SM-share "
            "slowdowns: the paper's 1.55-1.72x is against the best prior system on its "
            "own GPUs and workloads.")
