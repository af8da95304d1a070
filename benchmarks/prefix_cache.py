"""What the prefix cache does, measured side by side in one run.

(a) Mooncake's conversation trace (12,031 requests, one hour of Kimi's service,
    recorded arrivals) through the simulator: the share of prompt tokens found
    cached at each pool size, in pages of the trace's 512-token blocks, beside the
    trace's infinite-cache bound (every block an earlier prompt had). One prefill
    instance alone holds the cache, so nothing but its size limits it. For scale:
    one H100 with Llama 3.1 8B's weights holds about 0.43M tokens of KV.
(b) The engine (a random `llama-30m` on this machine's CPU, 8 virtual devices) on a
    prefix-heavy synthetic workload: 32 requests of two-turn sessions at 2/s, 90% on
    one 192-token system prompt. Prompt tokens computed and TTFT P50, cache on over
    cache off, colocated and disaggregated (whose hand-offs then skip what the decode
    side holds). Sized for a 2-core CPU: on CPU the attention is the reference
    kernel, whose prompt steps cost each token a pass over a whole page table
    (`max_seq_len`), so the pool is 512 tokens a sequence; and the cache-on engine of
    each mode loads the programs its cache-off twin compiled (JAX's persistent
    compilation cache, in a fresh temporary folder). Compiling is never timed (engines
    warm up before the workload starts).
(c) Decode-side caches in disaggregation (simulator, Llama 3.1 8B on H100s): KV pages
    a hand-off moves, with and without a decode cache, and what that does to the
    time between the first and second token (the copy sits there), on the
    synthetic workload and on Mooncake's trace.

Usage: python benchmarks/prefix_cache.py [--skip_engine | --engine_only]
"""

import importlib.util
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if importlib.util.find_spec("pdserve_jax") is None:
  sys.path.insert(0, ROOT)
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import numpy as np  # noqa: E402

from pdserve_jax import workloads as W  # noqa: E402
from pdserve_jax.model.config import get_preset  # noqa: E402
from pdserve_jax.sim import hardware as H  # noqa: E402
from pdserve_jax.sim import latency as L  # noqa: E402
from pdserve_jax.sim import simulator as sim  # noqa: E402

TRACE = os.path.join(ROOT, "..", "shared", "data", "traces", "mooncake",
                     "conversation_trace.jsonl")
MODEL, HW = get_preset("llama3.1-8b"), H.get_hardware("h100-sxm")


def _setup(page_size=512, **kw):
  return sim.Setup(MODEL, HW, L.latency_source("roofline", MODEL, HW), page_size=page_size,
                   **kw)


def _synthetic(n, rate, seed=0, system_prompt_len=384, max_total_tokens=1024):
  return W.shared_prefix(n, rate, W.Uniform(16, 96), W.Uniform(8, 24),
                         system_prompt_len=system_prompt_len, system_prompt_share=0.9,
                         turns=2, think_time=1.0, block_size=16,
                         max_total_tokens=max_total_tokens, seed=seed)


def mooncake_hit_rates():
  if not os.path.exists(TRACE):
    print(f"(a) trace not found at {TRACE}; skipped")
    return None
  trace = W.load_mooncake(TRACE)
  reqs = trace.requests()
  print(f"(a) Mooncake conversation trace, {len(reqs):,} requests, recorded arrivals; "
        f"infinite-cache bound {trace.hit_bound():.1%} of prompt tokens")
  print(f"    {'pool (tokens)':>14} {'hit rate':>9} {'of bound':>9} {'evicted pages':>14}")
  bound = trace.hit_bound()
  for tokens in (2**19, 2**20, 2**21, 2**22, 2**23, 2**24, 2**25, 2**27):
    res = sim.simulate(reqs, _setup(kv_tokens=tokens), sim.PhaseOnly("prefill",
                                                                    sim.InstanceSpec(tp=8)))
    hit = res.prefix["hit_rate"]
    print(f"    {tokens / 2**20:>12.1f}Mi {hit:>9.1%} {hit / bound:>9.0%} "
          f"{res.prefix['evictions']:>14,}")
  return trace


def engine_on_off():
  import tempfile

  from pdserve_jax.cli.common import use_compilation_cache

  # The cache-off and cache-on engines of a mode run the same programs: the second
  # loads them from here instead of compiling them again.
  use_compilation_cache(tempfile.mkdtemp(prefix="pdserve-prefix-bench-"))
  import pdserve_jax as pdj

  model = pdj.random_model(get_preset("llama-30m"), seed=0)
  reqs = _synthetic(32, 2.0, system_prompt_len=192, max_total_tokens=512)
  print(f"(b) engine, llama-30m (random weights) on {os.cpu_count()} CPU cores (load "
        f"average {os.getloadavg()[0]:.1f}), {len(reqs)} requests of two-turn sessions "
        f"at 2/s, 90% on one 192-token system prompt, {sum(r.prompt_len for r in reqs):,} "
        "prompt tokens")
  deps = {"colocated chunked": pdj.Colocated(pdj.InstanceSpec(max_batch=16,
                                                               max_step_tokens=256),
                                              policy="chunked"),
          "disaggregated": pdj.Disaggregated(pdj.InstanceSpec(max_batch=16,
                                                              max_step_tokens=512),
                                             pdj.InstanceSpec(max_batch=16))}
  for name, dep in deps.items():
    rows, began = {}, time.perf_counter()
    for cache in (False, True):
      cfg = pdj.EngineConfig(page_size=16, num_pages=256, max_seq_len=512,
                             prefix_cache=cache)
      with pdj.Engine(model, dep, cfg) as engine:
        report = engine.run_workload([r.fresh() for r in reqs], timeout=900)
        stats = engine.stats()
      rows[cache] = (sum(r.num_computed for r in report.requests),
                     report.summary["ttft_s"]["p50"], stats)
    (off_tok, off_ttft, _), (on_tok, on_ttft, st) = rows[False], rows[True]
    print(f"    {name}: prompt tokens computed {on_tok:,} on / {off_tok:,} off "
          f"({on_tok / off_tok:.2f}x); TTFT P50 {on_ttft * 1e3:.0f} ms on / "
          f"{off_ttft * 1e3:.0f} ms off ({on_ttft / off_ttft:.2f}x); hit rate "
          f"{st['prefix_hit_rate']:.1%}" + (
              f"; KV pages copied {st['prefix_kv_copy_pages']}, found in the decode cache "
              f"{st['prefix_kv_copy_pages_saved']}" if name == "disaggregated" else "")
          + f" ({time.perf_counter() - began:.0f} s, both engines)")


def decode_cache(trace):
  print("(c) disaggregated 1 prefill + 1 decode instance, tp2 each, Llama 3.1 8B on H100s "
        "(roofline): with and without a decode-side cache")
  cases = [("synthetic, 2,000 requests at 20/s", _synthetic(2000, 20.0), _setup(16))]
  if trace is not None:
    cases.append(("Mooncake, 3,000 requests, recorded arrivals", trace.requests(n=3000),
                  _setup(512)))
  spec = sim.InstanceSpec(tp=2)
  for what, reqs, setup in cases:
    for keep in (False, True):
      res = sim.simulate(reqs, setup, sim.Disaggregated(spec, spec, decode_cache=keep))
      gap = np.median([r.token_times[1] - r.token_times[0] for r in res.requests
                       if len(r.token_times) > 1])
      p = res.prefix
      print(f"    {what}, decode cache {'on ' if keep else 'off'}: pages moved "
            f"{p['kv_copy_pages']:,}, skipped {p['kv_copy_pages_saved']:,} of "
            f"{p['kv_copy_pages'] + p['kv_copy_pages_saved']:,}; first-to-second token "
            f"P50 {gap * 1e3:.2f} ms; TTFT P50 {res.summary()['ttft_s']['p50'] * 1e3:.1f} ms")


def main():
  start = time.perf_counter()
  if "--engine_only" not in sys.argv:
    trace = mooncake_hit_rates()
    decode_cache(trace)
  if "--skip_engine" not in sys.argv:
    engine_on_off()
  print(f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
  main()
