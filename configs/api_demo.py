"""`python -m pdserve_jax.cli.api`: the committed demo model behind an OpenAI-compatible
HTTP API, colocated on 2 devices (`--config.mode=disaggregated` etc. for the others).
"""

import ml_collections

from pdserve_jax.cli import deployments


def get_config():
  c = ml_collections.ConfigDict()
  c.model = "small"  # a preset with random weights, when hf_path and checkpoint are ""
  c.hf_path = ""
  c.checkpoint = "demo"  # the committed demo model; or a `Model.save` folder
  c.model_name = ""  # the name /v1/models reports; "" derives it from the above
  c.dtype = "float32"
  c.init_std = 0.1
  c.seed = 0
  c.mode = "colocated_prefill_first"
  c.ttft_slo = 0.5
  c.tpot_slo = 0.08
  c.update(deployments.blocks(
      instance=dict(tp=2, max_batch=16, max_step_tokens=256, chunked_max_step_tokens=64),
      semi_pd=dict(dynamic=True, partitioner=dict(window=8))))
  c.engine = ml_collections.ConfigDict(dict(
      page_size=16, num_pages=160, max_seq_len=256, warmup=True,
      min_token_bucket=128, attn_impl="auto", max_queued=256))
  c.drain_seconds = 10.0  # on shutdown: serve in-flight requests this long, then abort
  # HTTP limits (`api.app.ApiConfig`): a larger body gets 413 before it is read, one
  # not arrived within body_timeout_s gets 408; Retry-After seconds of 429 and 503.
  c.api = ml_collections.ConfigDict(dict(
      max_body_bytes=4 << 20, body_timeout_s=30.0, retry_after_s=1.0,
      unavailable_retry_after_s=5.0))
  return c
