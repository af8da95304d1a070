"""semi-PD (arXiv 2504.19867) Figure 15(c), tight SLOs: Llama-3-70B on four A100-80GB
per instance (TP=4), sharegpt-like lengths, Table 2's SLOs, every baseline as the
paper ran it (vLLM-D, vLLM-S with chunk 1,024, DistServe 1P1D, semi-PD at SM caps
(100, 100) and with the paper's partitioner); see `pdserve_jax.cli.repro_semipd`."""

from pdserve_jax.cli.repro_semipd import panel


def get_config():
  return panel("llama3-70b", "sharegpt", "tight")
