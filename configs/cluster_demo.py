"""The demo model as worker processes behind a router (`cli.api --role=...`).

One prefill worker at tp=1 and one decode worker at tp=2 by default; the router
makes one instance per worker address it is given. With `--config.mode=semi_pd` or
a colocated mode the workers are `--role=replica` and the router takes them with
`--replicas=...`. Every process reads this same
file: the workers take the model from it, the router the engine knobs (which it
sends to each worker) and the instance limits.
"""

import ml_collections

from pdserve_jax.cli import deployments


def get_config():
  c = ml_collections.ConfigDict()
  c.model = "small"  # a preset with random weights, when hf_path and checkpoint are ""
  c.hf_path = ""
  c.checkpoint = "demo"
  c.model_name = ""
  c.dtype = "float32"
  c.init_std = 0.1
  c.seed = 0
  c.mode = "disaggregated"
  c.ttft_slo = 0.5
  c.tpot_slo = 0.08
  c.update(deployments.blocks(instance=dict(max_batch=16, max_step_tokens=256),
                        disaggregated=dict(prefill_tp=1, decode_tp=2)))
  c.engine = ml_collections.ConfigDict(dict(
      page_size=16, num_pages=160, max_seq_len=256, warmup=True,
      min_token_bucket=64, attn_impl="auto", max_queued=256))
  c.drain_seconds = 10.0
  # The router's timeouts (seconds; `cluster.router.ClusterSettings`): a worker silent
  # for timeout_s is lost; raise it on a loaded machine, where a busy worker may be
  # slow to answer a ping.
  c.cluster = ml_collections.ConfigDict(dict(
      heartbeat_s=0.5, timeout_s=5.0, command_timeout_s=600.0, copy_timeout_s=60.0,
      connect_timeout_s=120.0))
  return c
