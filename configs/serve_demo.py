"""`make demo`: one Poisson workload served in the four modes on 2 devices each.

`instance` is every instance's batch limits and page policy; colocated and
semi-PD run one instance of `instance.tp` devices, disaggregated one prefill and
one decode instance of `disaggregated.prefill_tp` / `decode_tp` devices. The
chunked-prefill instance's per-step token budget is `instance.token_budget`
(its `InstanceSpec.max_tokens`); the others take `instance.max_tokens` prompt
tokens per prefill step. `engine` holds the runtime knobs (`pdj.EngineConfig`).
"""

import dataclasses

import ml_collections

from pdserve_jax.serving.share import PartitionerConfig


def get_config():
  c = ml_collections.ConfigDict()
  c.model = "small"  # preset name; or set hf_path / checkpoint
  c.hf_path = ""
  c.checkpoint = ""
  c.dtype = "float32"
  c.init_std = 0.1
  c.seed = 0
  # Served one after the other, each on its own engine.
  c.modes = "colocated_prefill_first,colocated_chunked,disaggregated,semi_pd"
  c.instance = ml_collections.ConfigDict(dict(
      tp=2, max_batch=16, max_tokens=256, token_budget=64, page_policy="on_demand"))
  c.disaggregated = ml_collections.ConfigDict(dict(
      num_prefill=1, prefill_tp=1, num_decode=1, decode_tp=1))
  c.semi_pd = ml_collections.ConfigDict(dict(
      prefill_share=0.5, dynamic=True,
      # SloPartitioner knobs: `PartitionerConfig`'s defaults, every 8 finished requests.
      partitioner=ml_collections.ConfigDict(
          dataclasses.asdict(PartitionerConfig(window=8)))))
  c.engine = ml_collections.ConfigDict(dict(
      page_size=16, num_pages=160, max_prefill_batch=4, max_seq_len=256,
      ttft_slo=0.5, tpot_slo=0.08, warmup=True, min_prefill_bucket=128,
      min_pages_bucket=16, attn_impl="auto"))
  c.workload = ml_collections.ConfigDict(dict(
      num_requests=40, rate=6.0, process="poisson", cv=1.0,
      prompt_mean=64, prompt_spread=0.5, output_mean=24, output_spread=0.5, seed=0))
  return c
