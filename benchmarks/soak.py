"""Soak: many requests above capacity through every serving mode, every one accounted for.

For each mode, `--requests` requests with Poisson arrivals at `--rate` (above what
the engine serves, so its queue fills) go to one engine on the `--model` preset
with a small KV pool (`--num_pages`), so that on-demand paging preempts. Requests
are submitted with `engine.submit`; those refused with `EngineOverloaded` (beyond
`--max_queued` unfinished) are counted as rejected. A `--abort_fraction` of the
accepted ones is cancelled (`handle.cancel()`) a random time within
`--abort_within` seconds after its submission, mid-way or not at all if it has
already ended. At the end every request is accounted for:

  finished + aborted + failed + rejected == submitted

(the engine's counts, with `EngineOverloaded` refusals added to its own
rejections, and the same split read back from the handles), the engine holds no
KV page (`engine.pages_in_use() == 0`) and no unfinished request. The process's
resident memory (VmRSS, and the peak VmHWM) is printed at each quarter of the
submissions. One row per mode; exits 1 if any mode fails a check.

  python benchmarks/soak.py [--requests=2000] [--modes=semi_pd,disaggregated] \
      [--rate=600] [--model=tiny]

`run_mode` is importable (tests/test_soak.py runs a short version in-process).
"""

from __future__ import annotations

import dataclasses
import heapq
import os
import resource
import sys
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import numpy as np  # noqa: E402

import pdserve_jax as pdj  # noqa: E402
from pdserve_jax import workloads  # noqa: E402

MODES = ("colocated_prefill_first", "colocated_chunked", "disaggregated", "semi_pd")


@dataclasses.dataclass(frozen=True)
class SoakConfig:
  """One soak run's workload and engine sizes (one device per instance)."""
  requests: int = 2000
  rate: float = 600.0  # req/s; about twice what `tiny` is served at on 2 CPU cores
  abort_fraction: float = 0.1
  abort_within: float = 0.05  # s after submission
  seed: int = 0
  # Lengths: prompt + output <= max_seq_len.
  min_prompt: int = 4
  max_prompt: int = 40
  min_output: int = 1
  max_output: int = 24
  # Engine: a pool of a few long requests' worth of pages, so on-demand paging preempts.
  page_size: int = 8
  num_pages: int = 24
  max_seq_len: int = 64
  max_batch: int = 8
  max_step_tokens: int = 64  # prompt tokens per prefill step
  chunked_max_step_tokens: int = 32  # chunked prefill: tokens per step
  max_queued: int = 64
  page_policy: str = "on_demand"
  result_timeout: float = 600.0  # s to wait for the last request of a mode


def deployment(mode: str, c: SoakConfig):
  inst = pdj.InstanceSpec(tp=1, max_batch=c.max_batch, max_step_tokens=c.max_step_tokens,
                          page_policy=c.page_policy)
  if mode == "colocated_prefill_first":
    return pdj.Colocated(inst, policy="prefill_first")
  if mode == "colocated_chunked":
    return pdj.Colocated(dataclasses.replace(inst, max_step_tokens=c.chunked_max_step_tokens),
                         policy="chunked")
  if mode == "disaggregated":
    return pdj.Disaggregated(inst, inst, num_prefill=1, num_decode=1)
  if mode == "semi_pd":
    return pdj.SemiPD(inst, prefill_share=0.5, partitioner=pdj.PartitionerConfig(window=16))
  raise ValueError(f"unknown mode {mode!r}; known: {MODES}")


def engine_config(c: SoakConfig) -> "pdj.EngineConfig":
  # Few token buckets: few programs to compile.
  return pdj.EngineConfig(page_size=c.page_size, num_pages=c.num_pages,
                          max_seq_len=c.max_seq_len,
                          min_token_bucket=c.max_seq_len,
                          max_queued=c.max_queued, warmup=True)


def memory_mb() -> tuple[float, float]:
  """(resident MB now, peak resident MB) of this process."""
  now = peak = None
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmRSS:"):
          now = int(line.split()[1]) / 1024
        elif line.startswith("VmHWM:"):
          peak = int(line.split()[1]) / 1024
  except OSError:
    pass
  if peak is None:  # ru_maxrss: KiB on Linux, bytes on macOS
    ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak = ru / (1024 * 1024 if sys.platform == "darwin" else 1024)
  return (peak if now is None else now), peak


@dataclasses.dataclass
class SoakResult:
  mode: str
  submitted: int
  overloaded: int  # refused by `submit` with EngineOverloaded
  cancels: int  # handle.cancel() calls (some land after the request ended)
  stats: dict  # engine.stats() once closed
  from_handles: dict  # finished / aborted / failed, read back from the handles
  pages_in_use: int
  memory: list  # (submitted so far, RSS MB, peak RSS MB) at each quarter
  wall_s: float
  stuck: int = 0  # handles with no result after `result_timeout`

  @property
  def rejected(self) -> int:
    return self.overloaded + self.stats["rejected"]

  @property
  def accounted(self) -> int:
    s = self.stats
    return s["finished"] + s["aborted"] + s["failed"] + self.rejected

  def problems(self) -> list[str]:
    """What is wrong; empty when every request is accounted for and nothing leaked."""
    s, h, out = self.stats, self.from_handles, []
    if self.accounted != self.submitted:
      out.append(f"finished {s['finished']} + aborted {s['aborted']} + failed "
                 f"{s['failed']} + rejected {self.rejected} = {self.accounted} != "
                 f"submitted {self.submitted}")
    engine_side = {k: s[k] for k in ("finished", "aborted", "failed")}
    engine_side["failed"] += s["rejected"]  # rejected in the engine: a handle that raises
    if h != engine_side:
      out.append(f"handles say {h}, the engine {engine_side}")
    if self.pages_in_use:
      out.append(f"{self.pages_in_use} KV pages still in use")
    if s["pages_in_use"]:
      out.append(f"stats report {s['pages_in_use']} KV pages in use")
    if s["unfinished"]:
      out.append(f"{s['unfinished']} requests unfinished")
    if self.stuck:
      out.append(f"{self.stuck} requests never ended")
    return out


def run_mode(model, mode: str, c: SoakConfig = SoakConfig(), log=None) -> SoakResult:
  """Serves `c.requests` Poisson arrivals at `c.rate` through `mode` on `model`,
  cancelling some; returns the accounting once the engine is closed. `log(text)`
  is called at each quarter of the submissions."""
  rng = np.random.default_rng([c.seed, 7])
  vocab = model.config.vocab_size
  reqs = workloads.synthetic(c.requests, c.rate,
                             workloads.Uniform(c.min_prompt, c.max_prompt),
                             workloads.Uniform(c.min_output, c.max_output), seed=c.seed)
  prompts = [rng.integers(0, vocab, r.prompt_len).tolist() for r in reqs]
  cancel = rng.random(len(reqs)) < c.abort_fraction
  delays = rng.uniform(0.0, c.abort_within, len(reqs))
  quarters = {max(1, (c.requests * q) // 4): q for q in (1, 2, 3, 4)}
  handles, memory, pending = [], [], []  # pending: (when, seq, handle) to cancel
  overloaded = cancels = 0

  def cancel_due(now):
    nonlocal cancels
    while pending and pending[0][0] <= now:
      heapq.heappop(pending)[2].cancel()
      cancels += 1

  engine = pdj.Engine(model, deployment(mode, c), engine_config(c))
  try:
    start = time.perf_counter()
    for i, (r, prompt) in enumerate(zip(reqs, prompts)):
      while True:  # sleep to the arrival, cancelling on the way
        now = time.perf_counter() - start
        cancel_due(now)
        wait = r.arrival_time - now
        if wait <= 0:
          break
        time.sleep(min(wait, pending[0][0] - now) if pending else wait)
      params = pdj.SamplingParams(max_tokens=r.max_tokens, temperature=0.7, seed=i,
                                  stop_token_ids=(0,))
      try:
        h = engine.submit(prompt, params)
      except pdj.EngineOverloaded:
        overloaded += 1
      else:
        handles.append(h)
        if cancel[i]:
          heapq.heappush(pending, (time.perf_counter() - start + delays[i], i, h))
      if i + 1 in quarters:
        now_mb, peak_mb = memory_mb()
        memory.append((i + 1, now_mb, peak_mb))
        if log:
          s = engine.stats()
          log(f"  {mode}: {i + 1}/{c.requests} submitted ({quarters[i + 1] * 25}%), "
              f"RSS {now_mb:.0f} MB (peak {peak_mb:.0f} MB), overloaded {overloaded}, "
              f"finished {s['finished']}, aborted {s['aborted']}, "
              f"preemptions {s['preemptions']}, unfinished {s['unfinished']}")
    while pending:
      now = time.perf_counter() - start
      cancel_due(now)
      if pending:
        time.sleep(max(0.0, pending[0][0] - now))
    from_handles = {"finished": 0, "aborted": 0, "failed": 0}
    stuck = 0
    deadline = time.perf_counter() + c.result_timeout
    for h in handles:
      try:
        res = h.result(max(0.0, deadline - time.perf_counter()))
      except TimeoutError:
        stuck += 1
        continue
      except Exception:  # noqa: BLE001 - a failed or rejected request raises its error
        from_handles["failed"] += 1
        continue
      from_handles["aborted" if res.finish_reason == "aborted" else "finished"] += 1
    wall = time.perf_counter() - start
  finally:
    engine.close(timeout=1.0)  # aborts anything stuck, so the close returns
  return SoakResult(mode, len(reqs), overloaded, cancels, engine.stats(), from_handles,
                    engine.pages_in_use(), memory, wall, stuck)


HEADER = (f"{'mode':<24}{'submitted':>10}{'finished':>9}{'aborted':>8}{'failed':>7}"
          f"{'rejected':>9}{'preempt':>8}{'pages':>6}{'req/s':>7}   RSS MB at 25/50/75/100%"
          " (peak)   check")


def format_row(r: SoakResult) -> str:
  s = r.stats
  rss = "/".join(f"{m:.0f}" for _, m, _ in r.memory)
  peak = max((p for _, _, p in r.memory), default=0.0)
  served = (s["finished"] + s["aborted"]) / r.wall_s if r.wall_s > 0 else 0.0
  problems = r.problems()
  return (f"{r.mode:<24}{r.submitted:>10}{s['finished']:>9}{s['aborted']:>8}{s['failed']:>7}"
          f"{r.rejected:>9}{s['preemptions']:>8}{r.pages_in_use:>6}{served:>7.1f}   "
          f"{rss + f' ({peak:.0f})':<29}{'ok' if not problems else '; '.join(problems)}")


def define_flags() -> None:
  """The command line's flags (not defined on import, so tests can import this)."""
  from absl import flags

  flags.DEFINE_integer("requests", 2000, "requests per mode")
  flags.DEFINE_list("modes", list(MODES), f"modes, of {MODES}")
  flags.DEFINE_float("rate", SoakConfig.rate, "Poisson arrival rate (req/s), above capacity")
  flags.DEFINE_string("model", "tiny", "model preset")
  flags.DEFINE_float("abort_fraction", SoakConfig.abort_fraction,
                     "share of accepted requests cancelled")
  flags.DEFINE_integer("num_pages", SoakConfig.num_pages, "KV pages per instance")
  flags.DEFINE_integer("max_queued", SoakConfig.max_queued,
                       "unfinished requests before submit raises EngineOverloaded")
  flags.DEFINE_string("page_policy", SoakConfig.page_policy, "on_demand or reserve")
  flags.DEFINE_integer("seed", 0, "workload seed")


def main(argv) -> int:
  from absl import app, flags

  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  FLAGS = flags.FLAGS
  bad = [m for m in FLAGS.modes if m not in MODES]
  if bad:
    raise app.UsageError(f"unknown mode(s) {bad}; known: {MODES}")
  c = SoakConfig(requests=FLAGS.requests, rate=FLAGS.rate, abort_fraction=FLAGS.abort_fraction,
                 num_pages=FLAGS.num_pages, max_queued=FLAGS.max_queued,
                 page_policy=FLAGS.page_policy, seed=FLAGS.seed)
  model = pdj.random_model(pdj.get_preset(FLAGS.model), seed=0, std=0.1)
  print(f"model={FLAGS.model} requests={c.requests} Poisson {c.rate}/s, {c.num_pages} pages "
        f"of {c.page_size} per instance ({c.page_policy}), max_queued={c.max_queued}, "
        f"cancelling {c.abort_fraction:.0%}", flush=True)
  results = []
  for mode in FLAGS.modes:
    results.append(run_mode(model, mode, c, log=lambda t: print(t, flush=True)))
  print(HEADER)
  for r in results:
    print(format_row(r))
  return 1 if any(r.problems() for r in results) else 0


if __name__ == "__main__":
  from absl import app

  define_flags()
  app.run(main)
