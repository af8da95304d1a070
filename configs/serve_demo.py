"""`make demo`: the committed demo model (a byte-level Llama, `pdj.load_demo`) in the
four modes on 2 devices each: each engine prints its continuations of `prompts`,
then serves one Poisson workload; a table compares the deployments.

Colocated and semi-PD run one instance of `instance.tp` devices, disaggregated one
prefill and one decode instance of `disaggregated.prefill_tp` / `decode_tp`
devices (deployment blocks: `pdserve_jax.cli.deployments`; workload block:
`pdserve_jax.workloads.DEFAULTS`). `engine` holds the runtime knobs
(`pdj.EngineConfig`) but the SLOs, which are top-level.

  python -m pdserve_jax.cli.serve --config=configs/serve_demo.py \
      --config.modes=semi_pd,disaggregated --config.workload.rate=4
"""

import ml_collections

from pdserve_jax import workloads
from pdserve_jax.cli import deployments


def get_config():
  c = ml_collections.ConfigDict()
  c.model = "small"  # a preset with random weights, when hf_path and checkpoint are ""
  c.hf_path = ""
  c.checkpoint = "demo"  # the committed demo model; or a `Model.save` folder
  c.dtype = "float32"
  c.init_std = 0.1
  c.seed = 0
  # Printed with their continuations by each mode's engine, when the model has a
  # tokenizer: --config.prompts="('Once upon a time', 'The cat')".
  c.prompts = ("Once upon a time", "And the king said", "In the beginning")
  c.generation = ml_collections.ConfigDict(  # seed -1: a fresh seed each run
      dict(max_tokens=48, temperature=0.0, seed=0))
  # Served one after the other, each on its own engine.
  c.modes = ("colocated_prefill_first", "colocated_chunked", "disaggregated", "semi_pd")
  c.ttft_slo = 0.5
  c.tpot_slo = 0.08
  c.update(deployments.blocks(
      instance=dict(tp=2, max_batch=16, max_step_tokens=256, chunked_max_step_tokens=64),
      # The SloPartitioner every 8 finished requests.
      semi_pd=dict(dynamic=True, partitioner=dict(window=8))))
  c.engine = ml_collections.ConfigDict(dict(
      page_size=16, num_pages=160, max_seq_len=256, warmup=True,
      min_token_bucket=128, attn_impl="auto"))
  c.workload = workloads.config(
      num_requests=40, rate=6.0, lengths="lognormal", prompt_mean=64, prompt_spread=0.5,
      output_mean=24, output_spread=0.5)
  return c
