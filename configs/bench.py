"""`python -m pdserve_jax.cli.bench`: a workload against an OpenAI-compatible endpoint
(`python -m pdserve_jax.cli.api` serves one), one run per rate, in the result schema
every app writes.

  python -m pdserve_jax.cli.bench --config.url=http://127.0.0.1:8000 --config.rates=2,4
"""

import ml_collections

from pdserve_jax import workloads


def get_config():
  c = ml_collections.ConfigDict()
  c.url = "http://127.0.0.1:8000"
  c.model_name = ""  # sent as `model` when set (vLLM's servers want it)
  c.mode = ""  # the endpoint's serving mode for the record, when known ("" : unknown)
  c.num_devices = 1  # devices behind the endpoint, for per-device figures
  c.vocab_size = 256  # prompt ids are drawn below this
  c.max_total_tokens = 256  # prompt + output cap (the server's context)
  c.rates = (2.0, 4.0)
  c.ttft_slo = 0.5
  c.tpot_slo = 0.08
  c.target = 0.9
  c.concurrency = 256  # requests in flight at most
  c.timeout = 120.0  # seconds per request
  c.workload = workloads.config(num_requests=40, lengths="lognormal", prompt_mean=64,
                                prompt_spread=0.5, output_mean=24, output_spread=0.5)
  return c
