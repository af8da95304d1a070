"""DistServe (arXiv 2401.09670) Figure 9, summarisation, OPT-66B: SLOs TTFT 15 s and
TPOT 0.15 s at 90% (DistServe's artifact, evaluation/ae-scripts/e2e/_plot.py:
DistServe on 8 GPUs, vLLM on 4). LongBench is not on this machine: long prompts are
drawn lognormal (mean 1,500 tokens, spread 0.3) with short outputs (mean 100), within
OPT's 2048-token context; these lengths are our choice, not LongBench's. Section 6.2
reports 4.3x DistServe's rate over vLLM's (our reading of the paper).
"""

from pdserve_jax import workloads
from pdserve_jax.cli.reproduce import distserve_panel


def get_config():
  return distserve_panel(
      "opt-66b", vllm_tp=4, paper=(4.3, 4.3), figure="Figure 9 (summarisation)",
      title="DistServe Figure 9, summarisation, OPT-66B", ttft_slo=15.0, tpot_slo=0.15,
      workload=workloads.config(num_requests=1000, lengths="lognormal", prompt_mean=1500,
                                prompt_spread=0.3, output_mean=100, output_spread=0.5),
      tp_options=(2, 4, 8), pp_options=(1, 2, 4),
      notes="Synthetic long prompts stand in for LongBench.")
