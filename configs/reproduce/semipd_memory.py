"""semi-PD (arXiv 2504.19867) Figure 4: a disaggregated decode instance runs out of
KV memory (Llama-3-8B on A100-40GB, ShareGPT-like lengths) and its P90 TPOT
explodes; beside it the same placement with unbounded memory, and semi-PD's
unified pool on one card, with preemptions and recomputed tokens counted
(`pdserve_jax.cli.repro_semipd.memory`)."""

from pdserve_jax.cli.repro_semipd import memory


def get_config():
  return memory()
