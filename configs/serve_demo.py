"""`make demo`, first half (`serve`'s default): the committed demo model (a byte-level
Llama, `pdj.load_demo`) in the four modes, each on the same 2 of the 8 virtual CPU
devices, serving one Poisson workload at a load where they differ; it ends by naming
the mode with the best SLO attainment. Each engine first prints its greedy
continuations of `prompts` (one line when they equal the first mode's).

Every instance is one device (tp 1): colocated and semi-PD run 2 replicas,
disaggregated 1 prefill + 1 decode instance, so the first engine compiles the
programs and the others load them from the persistent compilation cache
(deployment blocks: `pdserve_jax.cli.deployments`; workload block:
`pdserve_jax.workloads.DEFAULTS`). `engine` holds the runtime knobs
(`pdj.EngineConfig`) but the SLOs, which are top-level.

The rate and SLOs were chosen on this project's 2-core machine, at 10-50 req/s: at
10-20 req/s every mode met both SLOs for 95-100% of requests; at 40 req/s the
colocated modes' decode steps wait behind prompts (TPOT P90 30-45 ms) while the
disaggregated decode instance kept TPOT P90 near 7 ms, and it alone met both SLOs for
nearly all requests. A busy machine slows every mode: when none serves half the
requests, compare them at a lower rate.

  python -m pdserve_jax.cli.serve --config=serve_demo \
      --config.modes=semi_pd,disaggregated --config.workload.rate=20
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
  c.ttft_slo = 0.2
  c.tpot_slo = 0.02
  c.update(deployments.blocks(
      # A chunked step's budget is the smallest packed bucket: no padding.
      instance=dict(tp=1, replicas=2, max_batch=16, max_step_tokens=256,
                    chunked_max_step_tokens=128),
      # The SloPartitioner every 8 finished requests.
      semi_pd=dict(dynamic=True, partitioner=dict(window=8))))
  c.engine = ml_collections.ConfigDict(dict(
      page_size=16, num_pages=160, max_seq_len=256, warmup=True,
      min_token_bucket=128, attn_impl="auto"))
  c.workload = workloads.config(
      num_requests=80, rate=40.0, lengths="lognormal", prompt_mean=64, prompt_spread=0.5,
      output_mean=24, output_spread=0.5)
  return c
