"""DistServe (arXiv 2401.09670) Figure 9, code completion, OPT-66B, with short prompts:
the same SLOs (TTFT 0.125 s, TPOT 0.2 s at 90%) and GPUs as `distserve_code_opt66b`,
but HumanEval-sized requests instead of the Azure code trace, whose prompts (831
tokens on average within OPT's context) make a 0.125 s TTFT unreachable for most
requests even on an idle DistServe instance. HumanEval is not on this machine: the
lengths are lognormal, prompts mean 150 tokens (spread 0.4), outputs mean 100 (0.5),
our stand-in for its short function signatures and completions.
"""

from pdserve_jax import workloads
from pdserve_jax.cli.reproduce import distserve_panel


def get_config():
  return distserve_panel(
      "opt-66b", vllm_tp=4, paper=(5.7, 5.7), figure="Figure 9 (code completion)",
      title="DistServe Figure 9, code completion, OPT-66B, HumanEval-sized requests",
      ttft_slo=0.125, tpot_slo=0.2,
      workload=workloads.config(num_requests=1000, lengths="lognormal", prompt_mean=150,
                                prompt_spread=0.4, output_mean=100, output_spread=0.5),
      tp_options=(2, 4, 8), pp_options=(1, 2, 4),
      notes="Synthetic HumanEval-sized lengths (our choice); see distserve_code_opt66b for "
            "the code trace.")
