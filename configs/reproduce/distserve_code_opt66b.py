"""DistServe (arXiv 2401.09670) Figure 9, code completion, OPT-66B: SLOs TTFT 0.125 s
and TPOT 0.2 s at 90% (DistServe's artifact, evaluation/ae-scripts/e2e/_plot.py:
DistServe on 8 GPUs, vLLM on 4). HumanEval is not on this machine: the lengths come
from the Azure code-completion trace, filtered to OPT's 2048-token context, whose
prompts are far longer than HumanEval's. Section 6.2 reports 5.7x DistServe's rate
over vLLM's (our reading of the paper; the issue quotes only the chatbot range).
"""

from pdserve_jax.cli.reproduce import distserve_panel, trace_workload


def get_config():
  return distserve_panel(
      "opt-66b", vllm_tp=4, paper=(5.7, 5.7), figure="Figure 9 (code completion)",
      title="DistServe Figure 9, code completion, OPT-66B", ttft_slo=0.125, tpot_slo=0.2,
      workload=trace_workload("splitwise_code"), tp_options=(2, 4, 8), pp_options=(1, 2, 4),
      notes="Code-trace lengths stand in for HumanEval, with much longer prompts.")
