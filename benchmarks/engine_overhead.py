"""Engine overhead: engine decode tokens/s vs the bare jitted decode loop, and
compilations after warm-up, for each serving mode on 8 virtual CPU devices.

For each mode, a closed batch of `--batch` prompts decodes `--tokens` tokens through
`engine.generate`; its decode rate is batch / median TPOT. The bare loop runs the
same compiled decode program of the same instance (same mesh, same batch, a host
sync per step as serving needs to see stop tokens) with no scheduler. The two
alternate for `--rounds` rounds; the ratio of their medians is engine / bare (goal
>= 0.9). Then a fresh warmed-up engine serves a 200-request
Poisson workload under a compile counter (goal: 0 compilations).

  python benchmarks/engine_overhead.py [--model=small] [--batch=16] [--tokens=64]
"""

import dataclasses
import os
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

from absl import app, flags  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

import pdserve_jax as pdj  # noqa: E402
from pdserve_jax import workloads  # noqa: E402
from pdserve_jax.runtime.programs import CompileCounter, SamplingRows  # noqa: E402

flags.DEFINE_string("model", "small", "model preset")
flags.DEFINE_integer("batch", 16, "closed batch size")
flags.DEFINE_integer("tokens", 96, "output tokens per request")
flags.DEFINE_integer("rounds", 3, "engine / bare-loop rounds per mode (medians reported)")
flags.DEFINE_integer("poisson_requests", 200, "requests in the compile-count run")
flags.DEFINE_float("rate", 20.0, "Poisson arrival rate of the compile-count run")
flags.DEFINE_list("modes", ["colocated_prefill_first", "colocated_chunked",
                            "disaggregated_1p2_1d2", "semi_pd_tp2"], "modes to measure")
FLAGS = flags.FLAGS

# Runtime knobs shared by every mode; batch limits and parallelism are the deployments'.
COMMON = dict(page_size=16, num_pages=192, max_seq_len=128,
              min_token_bucket=32)
TP2 = pdj.InstanceSpec(tp=2, max_batch=16, max_step_tokens=256)
MODES = {
    "colocated_prefill_first": pdj.Colocated(TP2, policy="prefill_first"),
    "colocated_chunked": pdj.Colocated(dataclasses.replace(TP2, max_step_tokens=64),
                                       policy="chunked"),
    "disaggregated_1p2_1d2": pdj.Disaggregated(TP2, TP2, num_prefill=1, num_decode=1),
    "semi_pd_tp2": pdj.SemiPD(TP2, prefill_share=0.5,
                              partitioner=pdj.PartitionerConfig(window=16, step=0.1)),
}


def decode_runner(engine):
  """The `InstanceRunner` of the engine's first instance that decodes."""
  inst = next(i for i in engine.coordinator.instances if i.phase in (None, "decode"))
  return engine.executor.runner(inst).runner


def bare_decode_rate(runner, batch, steps, prompt_len):
  per = -(-(prompt_len + steps + 1) // 16)
  tables = [list(range(1 + i * per, 1 + (i + 1) * per)) for i in range(batch)]
  rows = SamplingRows.greedy(batch)
  tokens = [1] * batch

  def run(n):
    nonlocal tokens
    for s in range(n):
      out = runner.decode(tokens, [prompt_len + s] * batch, tables, rows)
      tokens = np.asarray(out.tokens)[:batch].tolist()

  run(2)
  t = time.perf_counter()
  run(steps)
  return batch * steps / (time.perf_counter() - t)


def main(_):
  model = pdj.random_model(pdj.get_preset(FLAGS.model), seed=0, std=0.1)
  b, n, prompt_len = FLAGS.batch, FLAGS.tokens, 32
  rng = np.random.default_rng(0)
  prompts = [rng.integers(0, model.config.vocab_size, prompt_len).tolist() for _ in range(b)]
  reqs = workloads.synthetic(FLAGS.poisson_requests, FLAGS.rate, workloads.Uniform(4, 96),
                             workloads.Uniform(1, 31), seed=1)
  print(f"backend={jax.default_backend()} model={FLAGS.model} batch={b} tokens={n} "
        f"rounds={FLAGS.rounds}")
  print(f"{'mode':<24} {'engine tok/s':>12} {'bare tok/s':>11} {'ratio':>6} "
        f"{f'compiles after warm-up ({FLAGS.poisson_requests} Poisson reqs)':>42}")
  unknown = [m for m in FLAGS.modes if m not in MODES]
  if unknown:
    raise app.UsageError(f"unknown mode(s) {unknown}; known: {list(MODES)}")
  for name in FLAGS.modes:
    cfg = pdj.EngineConfig(**COMMON, warmup=True)
    engine_rates, bare_rates = [], []
    with pdj.Engine(model, MODES[name], cfg) as engine:
      runner = decode_runner(engine)
      # Alternate the two, so that a noisy neighbour hits both alike.
      for _ in range(FLAGS.rounds):
        results = engine.generate(prompts, pdj.SamplingParams(max_tokens=n))
        engine_rates.append(b / float(np.median([r.tpot for r in results])))
        bare_rates.append(bare_decode_rate(runner, b, n - 1, prompt_len))
      with CompileCounter() as counter:
        engine.run_workload([r.fresh() for r in reqs], timeout=900)
    e, r = float(np.median(engine_rates)), float(np.median(bare_rates))
    print(f"{name:<24} {e:>12.0f} {r:>11.0f} {e / r:>6.2f} {counter.count:>42d}", flush=True)


if __name__ == "__main__":
  app.run(main)
