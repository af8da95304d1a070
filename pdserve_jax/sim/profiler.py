"""Profiles this library's real prefill and decode programs and fits a latency model.

Runs an `InstanceRunner`'s programs on the current backend over a grid of batch
sizes and lengths, timing each call end to end (host padding, dispatch, the program,
reading tokens back: what a serving step costs), and fits DistServe's polynomial
form to the medians. The result is the latency model the simulator uses to predict
this machine's engine. Timings inherit the runner's shape buckets: a prompt of 40
tokens costs what its bucket costs, which the fit averages over.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from typing import Sequence, Tuple

import numpy as np

from pdserve_jax.kv.allocator import PageAllocator
from pdserve_jax.runtime.programs import InstanceRunner, SamplingRows
from pdserve_jax.sim.latency import PolynomialLatencyModel, fit_polynomial


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
    t = median_time(lambda: np.asarray(runner.prefill(prompts, [0] * batch, tables, rows)), reps)
    prefill.append(([length] * batch, t))
    for i in range(batch):
      alloc.free(i)
  for batch, context in decode_grid:
    tables = [alloc.ensure(i, context) for i in range(batch)]
    rows = SamplingRows.greedy(batch)
    t = median_time(lambda: np.asarray(
        runner.decode([1] * batch, [context - 1] * batch, tables, rows)), reps)
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
  prefill_lens = [l for l in prefill_lens if l <= runner.shape.max_prefill_len]
  pre, dec = profile_runner(runner, grid(prefill_batches, prefill_lens, max_tokens),
                            grid(decode_batches, decode_contexts, (runner.shape.num_pages - 1)
                                 * runner.shape.page_size), reps)
  return fit(pre, dec), pre, dec
