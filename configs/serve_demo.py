"""`make demo`: one Poisson workload served in the three modes on 2 devices each."""

import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.model = "small"  # preset name; or set hf_path / checkpoint
  c.hf_path = ""
  c.checkpoint = ""
  c.dtype = "float32"
  c.init_std = 0.1
  c.seed = 0
  # "all" serves the three modes below one after the other.
  c.modes = "colocated_prefill_first,colocated_chunked,disaggregated,semi_pd"
  c.engine = ml_collections.ConfigDict(dict(
      tp=2, num_prefill=1, prefill_tp=1, num_decode=1, decode_tp=1,
      page_size=16, num_pages=160, max_batch=16, max_prefill_batch=4,
      max_prefill_tokens=256, token_budget=64, max_seq_len=256,
      prefill_share=0.5, ttft_slo=0.5, tpot_slo=0.08, partition_window=8,
      warmup=True, min_prefill_bucket=128, min_pages_bucket=16, attn_impl="auto"))
  c.workload = ml_collections.ConfigDict(dict(
      num_requests=40, rate=6.0, process="poisson", cv=1.0,
      prompt_mean=64, prompt_spread=0.5, output_mean=24, output_spread=0.5, seed=0))
  return c
