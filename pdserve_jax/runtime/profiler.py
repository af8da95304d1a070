"""Profiles this library's real prefill and decode programs into latency models.

Times an `InstanceRunner`'s calls on the current backend end to end (host padding,
dispatch, the program, reading tokens back: what a serving step costs), two ways:

  * `profile`: over a grid of batch sizes and lengths, fitting DistServe's
    polynomial form to the medians. Portable across batch shapes and, with pp,
    across pipelines, but it averages the runner's bucket padding away.
  * `profile_shapes`: every compiled program shape once, into a
    `ShapeTableLatencyModel` that reproduces the runner's padding exactly. This is
    what predicts this machine's engine (`benchmarks/sim_vs_engine.py`).

`profile_transfers` times KV copies between two pools (a disaggregated engine's
hand-off) and fits a fixed cost and a bandwidth; from one layer group's pool it
measures the per-group copy of layer-wise streaming, which the simulator charges
per group (each pays the fixed cost). `profile_overlap` measures how
much one instance slows another beside it on shared host cores (virtual CPU
devices; 1 on separate accelerators). `step_overhead` reads the host
time between back-to-back steps from an engine's step log (`StepRecord`s).
`setup_from_engine` puts them together: a simulator `Setup` of one engine.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
import time
from typing import Sequence, Tuple

import jax
import numpy as np

from pdserve_jax.core.pages import PageAllocator
from pdserve_jax.kv.pool import PagePool, transfer_pages
from pdserve_jax.runtime.programs import InstanceRunner, SamplingRows
from pdserve_jax.sim.latency import (PolynomialLatencyModel, ShapeTableLatencyModel,
                                     fit_polynomial)


def median_time(fn, reps: int, warm: int = 3) -> float:
  """Median seconds of `reps` calls of `fn`, after `warm` untimed ones."""
  # The first calls of a shape (its compilation, then cold caches and allocations)
  # run slower than the steady state a serving loop sees: keep them out.
  for _ in range(warm):
    fn()
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return float(np.median(times))


def profile_runner(runner: InstanceRunner, prefill_grid: Sequence[Tuple[int, int]],
                   decode_grid: Sequence[Tuple[int, int]], reps: int = 5, seed: int = 0):
  """Times prefill at (batch, prompt length) and decode at (batch, context) points.

  Returns (prefill_samples, decode_samples) as `fit_polynomial` takes them.
  """
  shape, vocab = runner.shape, runner.cfg.vocab_size
  rng = np.random.default_rng(seed)
  alloc = PageAllocator(shape.num_pages, shape.page_size, reserved=1)
  prefill, decode = [], []
  for batch, length in prefill_grid:
    tables = [alloc.ensure(i, length) for i in range(batch)]
    prompts = [rng.integers(0, vocab, length).tolist() for _ in range(batch)]
    rows = SamplingRows.greedy(batch)
    t = median_time(lambda: np.asarray(
        runner.packed(prompts, [0] * batch, tables, rows).tokens), reps)
    prefill.append(([length] * batch, t))
    for i in range(batch):
      alloc.free(i)
  for batch, context in decode_grid:
    tables = [alloc.ensure(i, context) for i in range(batch)]
    rows = SamplingRows.greedy(batch)
    t = median_time(lambda: np.asarray(
        runner.decode([1] * batch, [context - 1] * batch, tables, rows).tokens), reps)
    decode.append(([context] * batch, t))
    for i in range(batch):
      alloc.free(i)
  alloc.check()
  return prefill, decode


def grid(batches: Sequence[int], lengths: Sequence[int], max_tokens: int):
  """Every (batch, length) pair whose batch * length stays within `max_tokens`."""
  return [(b, l) for b, l in itertools.product(batches, lengths) if b * l <= max_tokens]


def fit(prefill_samples, decode_samples) -> PolynomialLatencyModel:
  """DistServe's form fitted to profiles of this engine, whose chunked steps run
  their decodes as a program of their own."""
  return dataclasses.replace(fit_polynomial(prefill_samples, decode_samples),
                             separate_mixed=True)


def profile(runner: InstanceRunner, prefill_batches, prefill_lens, decode_batches,
            decode_contexts, max_tokens: int, reps: int = 5):
  """Profiles `runner` over the grids (points that do not fit its shapes are left
  out); returns the fitted model and the prefill and decode samples."""
  max_tokens = min(max_tokens, runner.shape.max_step_tokens)
  pre, dec = profile_runner(runner, grid(prefill_batches, prefill_lens, max_tokens),
                            grid(decode_batches, decode_contexts, (runner.shape.num_pages - 1)
                                 * runner.shape.page_size), reps)
  return fit(pre, dec), pre, dec


def profile_shapes(runner: InstanceRunner, reps: int = 5, packed: bool = True,
                   decode: bool = True) -> ShapeTableLatencyModel:
  """Times every compiled packed and decode shape of `runner` (either may be left
  out, as for one side of a disaggregated pair)."""
  shape = runner.shape
  pre = {key: median_time(_packed_call(runner, *key), reps)
         for key in (shape.compiled_packed_shapes() if packed else [])}
  dec = {key: median_time(_decode_call(runner, *key), reps)
         for key in (shape.compiled_decode_shapes() if decode else [])}
  return ShapeTableLatencyModel(shape, pre, dec)


def _tables(runner: InstanceRunner, rows: int, width: int):
  usable = runner.shape.num_pages - 1
  return [[1 + (r * width + j) % usable for j in range(width)] for r in range(rows)]


def _packed_call(runner: InstanceRunner, T: int):
  """A packed call filling bucket T (whole prompts as long as a row's pages allow),
  read back to the host."""
  longest = runner.shape.max_seq_len
  lens = [longest] * (T // longest) + ([T % longest] if T % longest else [])
  chunks = [[1] * n for n in lens]
  tables = _tables(runner, len(lens), runner.shape.table_width)
  rows = SamplingRows.greedy(len(lens))
  return lambda: np.asarray(runner.packed(chunks, [0] * len(lens), tables, rows).tokens)


def _decode_call(runner: InstanceRunner, B: int):
  """A decode call of batch B at the longest context, read back to the host."""
  W = runner.shape.table_width
  tables, rows = _tables(runner, B, W), SamplingRows.greedy(B)
  last = W * runner.shape.page_size - 1  # attends over every page of its table
  return lambda: np.asarray(runner.decode([1] * B, [last] * B, tables, rows).tokens)


def profile_transfers(src: PagePool, dst, page_counts: Sequence[int],
                      reps: int = 5) -> Tuple[float, float]:
  """Times `transfer_pages` from `src` to `dst` (a pool, or a pipeline's stage pools)
  for each page count (copies land in the scratch page); returns (fixed seconds,
  bytes/s) fitted by least squares. With `src` one layer group's pool, this is the
  copy of one group of a layer-wise stream."""
  page_bytes = src.bytes / src.num_pages
  xs, ts = [], []
  for n in page_counts:
    pages = np.zeros(n, np.int32)
    ts.append(median_time(lambda: jax.block_until_ready(transfer_pages(src, pages, dst, pages)),
                          reps))
    xs.append(n * page_bytes)
  slope, fixed = np.polyfit(xs, ts, 1) if len(set(xs)) > 1 else (0.0, ts[0])
  # A flat or negative slope means the bytes cost nothing measurable here.
  return max(float(fixed), 0.0), (1.0 / slope if slope > 0 else float("inf"))


def step_overhead(records, device=lambda r: r.instance) -> float:
  """Median seconds between one step's end and the next one's start on a device,
  from a step log of back-to-back work (a closed batch): the serving loop's host
  time per step. `device(record)` names the device a step ran on (semi-PD's two
  phases share one)."""
  runs = {}
  for r in sorted(records, key=lambda r: r.started):
    runs.setdefault(device(r), []).append(r)
  gaps = [b.started - a.finished for rs in runs.values() for a, b in zip(rs, rs[1:])]
  if not gaps:
    raise ValueError("no consecutive steps in the log to measure")
  return float(np.median(gaps))


def profile_overlap(busy: InstanceRunner, timed: InstanceRunner, reps: int = 9) -> float:
  """How many times slower a mid-sized decode call of `timed` runs while `busy`
  runs its largest prefill back to back beside it (>= 1)."""
  prefill = _packed_call(busy, *max(busy.shape.compiled_packed_shapes()))
  shapes = timed.shape.compiled_decode_shapes()
  decode = _decode_call(timed, *shapes[len(shapes) // 2])
  alone = median_time(decode, reps)
  # Prefills back to back from a thread of their own: a backend may run a cheap
  # program inline in the dispatching thread, so queueing them here would not
  # keep `busy` running.
  stop = threading.Event()
  prefill()  # compiled and warm before the clock starts

  def keep_busy():
    while not stop.is_set():
      prefill()

  worker = threading.Thread(target=keep_busy, daemon=True)
  worker.start()
  try:
    beside = median_time(decode, reps)
  finally:
    stop.set()
    worker.join()
  return max(1.0, beside / alone)


def setup_from_engine(engine, reps: int = 5):
  """A simulator `Setup` whose latency model is `engine`'s own runners, timed now:
  every compiled program shape (`profile_shapes`), the loop's host time per step
  from a closed batch, and in disaggregated mode the KV hand-off and how much the
  two meshes slow each other on shared cores. The pool is the engine's. Needs an
  engine built with `log_steps=True`; clears its step log."""
  from pdserve_jax.core import deploy
  from pdserve_jax.core.sampling import SamplingParams
  from pdserve_jax.sim import hardware
  from pdserve_jax.sim import simulator as sim

  ec, dep = engine.config, engine.deployment
  instances = engine.coordinator.instances
  copy_s, copy_bw, overlap = 0.0, float("inf"), 1.0
  if isinstance(dep, deploy.Disaggregated):
    # One table from both sides, each timed on its own mesh.
    runner = lambda phase: engine.executor.runner(next(i for i in instances
                                                       if i.phase == phase)).runner
    pre, dec = runner("prefill"), runner("decode")
    latency = dataclasses.replace(profile_shapes(pre, reps, decode=False),
                                  decode=profile_shapes(dec, reps, packed=False).decode)
    # Streaming moves one layer group at a time: time that; a whole copy, the pool.
    src = pre.pools[0] if dep.streams_kv else pre.pool
    copy_s, copy_bw = profile_transfers(src, dec.pools, engine.executor.page_buckets, reps)
    overlap = profile_overlap(pre, dec)
  else:
    latency = profile_shapes(engine.executor.runner(instances[0]).runner, reps)
  # The loop's host time between steps, from a closed batch; a device is an
  # instance's group (semi-PD's two phases share one).
  out_len = min(24, ec.max_seq_len // 4)
  longest = min(engine.max_prompt_len, ec.max_seq_len - out_len)
  prompts = [[7] * n for n in range(min(16, longest), longest + 1, max(1, longest // 12))]
  engine.step_log.clear()
  engine.generate(prompts, SamplingParams(max_tokens=out_len, ignore_eos=True))
  group = {i.name: i.group for i in instances}
  latency = dataclasses.replace(latency, step_overhead_s=step_overhead(
      engine.step_log, lambda r: group[r.instance]))
  engine.step_log.clear()
  # The host is no accelerator: the simulator reads only its link (the profiled
  # hand-off between two virtual devices) and is given the engine's pool size.
  host = hardware.HardwareSpec("host-cpu", 1e12, 1e10, 1e10, copy_bw, copy_bw, 8, copy_s)
  return sim.Setup(engine.model.config, host, lambda tp, pp: latency,
                   page_size=ec.page_size, kv_tokens=(ec.num_pages - 1) * ec.page_size,
                   overlap_slowdown=overlap)
