"""Attainment vs rate, engine and simulator: the `small` model (2.6M params), one
device per instance, a few rates, on this machine's CPU. The simulator's latency
model is profiled from each engine's own runners. A few minutes on 2 cores.

  python -m pdserve_jax.cli.sweep --config=sweep_demo
  ... --config.modes=semi_pd --config.rates=10,40 --plots_dir=/tmp/sweep
"""

import ml_collections

from pdserve_jax import workloads
from pdserve_jax.cli import deployments


def get_config():
  c = ml_collections.ConfigDict()
  c.model = "small"  # preset name; or set hf_path / checkpoint ("demo": the demo model)
  c.hf_path = ""
  c.checkpoint = ""
  c.dtype = "float32"
  c.init_std = 0.1
  c.seed = 0
  c.run_engine = True
  # "profile": time each engine's runners; or "distserve", "roofline", a JSON path
  # (then `hardware`, `page_size` and `memory_utilization` size the simulator).
  c.latency = "profile"
  c.profile_reps = 5
  c.hardware = "a100-80gb"
  c.page_size = 16
  c.memory_utilization = 0.9
  c.modes = ("colocated_prefill_first", "colocated_chunked", "disaggregated", "semi_pd")
  c.rates = (10.0, 20.0, 40.0, 80.0)  # requests/s, each served in every mode
  # True: instead of `rates`, each mode's goodput by bisection on the engine and in
  # the simulator, over goodput_seeds workload seeds, to goodput_tol (the knee).
  c.goodput = False
  c.goodput_seeds = 3
  c.goodput_tol = 0.1
  c.target = 0.9  # the attainment goal drawn on the plot
  c.ttft_slo = 0.1
  c.tpot_slo = 0.02
  c.update(deployments.blocks(
      instance=dict(tp=1, max_batch=8, max_step_tokens=128, chunked_max_step_tokens=64),
      semi_pd=dict(dynamic=True, partitioner=dict(window=8))))
  # Few shape buckets (each compiles in seconds on a CPU): packed calls pad to 128
  # tokens.
  c.engine = ml_collections.ConfigDict(dict(
      page_size=16, num_pages=128, max_seq_len=256, warmup=True,
      min_token_bucket=128, attn_impl="auto"))
  c.workload = workloads.config(
      num_requests=30, lengths="uniform", prompt_mean=72, prompt_spread=0.35,
      output_mean=28, output_spread=0.35)
  return c
