"""Workloads: arrival processes, length distributions and trace files, as Requests.

Everything is seeded. Arrivals at a rate are drawn at unit rate and scaled, so one
seed gives the same request sequence at every rate, only compressed or stretched in
time; that keeps attainment-versus-rate curves smooth for the goodput bisection.

Traces are CSV files with `num_prefill_tokens,num_decode_tokens` and an optional
`arrived_at` column (seconds), or ShareGPT-style JSON conversations measured with a
caller's tokenizer. Nothing here knows about devices or models.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
from typing import Callable, Optional, Sequence

import numpy as np

from pdserve_jax.serving.request import Request

ARRIVAL_PROCESSES = ("poisson", "gamma")


def arrival_times(n: int, rate: float, process: str = "poisson", cv: float = 1.0,
                  seed: int = 0) -> np.ndarray:
  """`n` arrival times (s) at mean `rate` requests/s, the first after one gap.

  "poisson" has exponential gaps; "gamma" has gamma gaps with coefficient of
  variation `cv` (cv > 1 is burstier than Poisson, cv = 1 is Poisson).
  """
  if n < 0:
    raise ValueError(f"n must be >= 0, got {n}")
  if not rate > 0:
    raise ValueError(f"arrival rate must be positive, got {rate}")
  rng = np.random.default_rng(seed)
  if process == "poisson":
    gaps = rng.exponential(1.0, size=n)
  elif process == "gamma":
    if not cv > 0:
      raise ValueError(f"cv must be positive, got {cv}")
    shape = 1.0 / cv**2
    gaps = rng.gamma(shape, 1.0 / shape, size=n)  # mean 1, std cv
  else:
    raise ValueError(f"unknown arrival process {process!r}; known: {ARRIVAL_PROCESSES}")
  return np.cumsum(gaps) / rate


@dataclasses.dataclass(frozen=True)
class Fixed:
  """Every length equals `value`."""
  value: int

  def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
    _check_positive("length", self.value)
    return np.full(n, self.value, dtype=np.int64)


@dataclasses.dataclass(frozen=True)
class Uniform:
  """Lengths uniform on [low, high], both included."""
  low: int
  high: int

  def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
    _check_positive("low", self.low)
    if self.high < self.low:
      raise ValueError(f"high={self.high} < low={self.low}")
    return rng.integers(self.low, self.high + 1, size=n)


@dataclasses.dataclass(frozen=True)
class Lognormal:
  """Lognormal lengths with the given mean and spread (coefficient of variation,
  std / mean), rounded and clipped to [low, high]."""
  mean: float
  spread: float
  low: int = 1
  high: Optional[int] = None

  def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
    if not self.mean > 0 or not self.spread >= 0:
      raise ValueError(f"need mean > 0 and spread >= 0, got {self.mean}, {self.spread}")
    _check_positive("low", self.low)
    sigma2 = math.log1p(self.spread**2)
    mu = math.log(self.mean) - sigma2 / 2
    x = np.rint(rng.lognormal(mu, math.sqrt(sigma2), size=n)).astype(np.int64)
    return np.clip(x, self.low, self.high)


def _check_positive(name, value):
  if value < 1:
    raise ValueError(f"{name} must be >= 1, got {value}")


def make_requests(prompt_lens: Sequence[int], output_lens: Sequence[int],
                  arrivals: Sequence[float], first_id: int = 0) -> list[Request]:
  """Requests from aligned arrays, ids counting up from `first_id`."""
  if not len(prompt_lens) == len(output_lens) == len(arrivals):
    raise ValueError("prompt_lens, output_lens and arrivals differ in length")
  return [Request(first_id + i, int(p), int(o), float(t))
          for i, (p, o, t) in enumerate(zip(prompt_lens, output_lens, arrivals))]


def synthetic(n: int, rate: float, prompt, output, process: str = "poisson",
              cv: float = 1.0, seed: int = 0) -> list[Request]:
  """`n` requests with lengths from the `prompt` and `output` distributions."""
  rng = np.random.default_rng([seed, 1])
  return make_requests(prompt.sample(n, rng), output.sample(n, rng),
                       arrival_times(n, rate, process, cv, seed))


@dataclasses.dataclass(frozen=True)
class Trace:
  """Request lengths, with recorded arrival times (s, starting at 0) when known."""
  name: str
  prompt_lens: np.ndarray
  output_lens: np.ndarray
  arrivals: Optional[np.ndarray] = None

  def __len__(self) -> int:
    return len(self.prompt_lens)

  def filter(self, max_total_tokens: int) -> Trace:
    """The requests whose prompt + output fit `max_total_tokens` (a model's context
    window); recorded arrivals are kept as they were."""
    keep = self.prompt_lens + self.output_lens <= max_total_tokens
    if not keep.any():
      raise ValueError(f"no request of trace {self.name} fits {max_total_tokens} tokens")
    arr = None if self.arrivals is None else self.arrivals[keep]
    return Trace(self.name, self.prompt_lens[keep], self.output_lens[keep], arr)

  def requests(self, n: Optional[int] = None, rate: Optional[float] = None,
               process: str = "poisson", cv: float = 1.0, seed: int = 0,
               sample: bool = False) -> list[Request]:
    """Requests from this trace.

    Args:
      n: how many (default: all, or as many as the trace has when not sampling).
      rate: requests/s of generated arrivals; None replays recorded arrivals.
      process, cv: arrival process for a given rate (see `arrival_times`).
      seed: seeds sampling and arrivals.
      sample: draw lengths at random with replacement instead of in order.
    """
    total = len(self)
    n = total if n is None else n
    if sample:
      idx = np.random.default_rng([seed, 2]).integers(0, total, size=n)
    else:
      if n > total:
        raise ValueError(f"trace {self.name} has {total} requests, {n} asked "
                         "(pass sample=True to resample)")
      idx = np.arange(n)
    if rate is None:
      if self.arrivals is None:
        raise ValueError(f"trace {self.name} records no arrival times; give a rate")
      if sample:
        raise ValueError("recorded arrivals cannot be resampled; give a rate")
      arr = self.arrivals[idx] - self.arrivals[0]
    else:
      arr = arrival_times(n, rate, process, cv, seed)
    return make_requests(self.prompt_lens[idx], self.output_lens[idx], arr)


def _validated(name, prompts, outputs, arrivals, rows) -> Trace:
  if not prompts:
    raise ValueError(f"trace {name} has no requests")
  p = np.asarray(prompts, dtype=np.int64)
  o = np.asarray(outputs, dtype=np.int64)
  for what, a in (("num_prefill_tokens", p), ("num_decode_tokens", o)):
    bad = np.flatnonzero(a < 1)
    if bad.size:
      raise ValueError(f"trace {name}: {what} must be >= 1; row {rows[bad[0]]} has "
                       f"{a[bad[0]]}")
  arr = None
  if arrivals is not None:
    arr = np.asarray(arrivals, dtype=np.float64)
    if np.any(np.diff(arr) < 0):
      order = np.argsort(arr, kind="stable")
      p, o, arr = p[order], o[order], arr[order]
    arr = arr - arr[0]
  return Trace(name, p, o, arr)


def load_csv_trace(path: str) -> Trace:
  """Reads a CSV trace (header `num_prefill_tokens,num_decode_tokens[,arrived_at]`);
  rows are sorted by arrival when arrivals are recorded."""
  with open(path, newline="") as f:
    reader = csv.DictReader(f)
    cols = reader.fieldnames or []
    missing = [c for c in ("num_prefill_tokens", "num_decode_tokens") if c not in cols]
    if missing:
      raise ValueError(f"trace {path} lacks column(s) {missing}; found {cols}")
    timed = "arrived_at" in cols
    prompts, outputs, arrivals, rows = [], [], [], []
    for line, row in enumerate(reader, start=2):
      try:
        prompts.append(int(float(row["num_prefill_tokens"])))
        outputs.append(int(float(row["num_decode_tokens"])))
        if timed:
          arrivals.append(float(row["arrived_at"]))
      except (TypeError, ValueError) as e:
        raise ValueError(f"trace {path}, line {line}: {e}") from None
      rows.append(line)
  return _validated(path, prompts, outputs, arrivals if timed else None, rows)


def load_sharegpt(path: str, tokenizer: Callable[[str], Sequence[int]],
                  max_conversations: Optional[int] = None) -> Trace:
  """Reads ShareGPT-style JSON: a list of {"conversations": [{"from", "value"}...]}.

  Each conversation gives one request: its first human turn is the prompt and the
  reply that follows is the output, both measured in `tokenizer` tokens.
  Conversations without such a pair, or with an empty side, are skipped.
  """
  with open(path) as f:
    data = json.load(f)
  if not isinstance(data, list):
    raise ValueError(f"{path}: expected a JSON list of conversations")
  prompts, outputs, rows = [], [], []
  for i, conv in enumerate(data):
    if max_conversations is not None and len(prompts) >= max_conversations:
      break
    turns = conv.get("conversations", []) if isinstance(conv, dict) else []
    for a, b in zip(turns, turns[1:]):
      if a.get("from") == "human" and b.get("from") == "gpt":
        p, o = len(tokenizer(a.get("value", ""))), len(tokenizer(b.get("value", "")))
        if p and o:
          prompts.append(p)
          outputs.append(o)
          rows.append(i)
        break
  return _validated(path, prompts, outputs, None, rows)


def workload_from_config(cfg, context_window: int, base_dir: str = ".") -> Callable:
  """rate -> requests, from a config's workload fields (see `configs/`).

  `cfg.workload` is "synthetic" (fixed `prompt_len` and `output_len`) or "trace"
  (the CSV `cfg.trace`, relative to `base_dir`, its lengths filtered to
  `cfg.max_total_tokens` or else `context_window`). Either draws `cfg.num_requests`
  arrivals at the rate (`cfg.arrival`, `cfg.cv`, `cfg.seed`); a trace given rate 0
  replays its own arrivals instead.
  """
  n, seed = cfg.num_requests, cfg.seed
  if cfg.workload == "synthetic":
    prompt, output = Fixed(cfg.prompt_len), Fixed(cfg.output_len)
    return lambda rate: synthetic(n, rate, prompt, output, cfg.arrival, cfg.cv, seed)
  if cfg.workload != "trace":
    raise ValueError(f"workload must be 'synthetic' or 'trace', got {cfg.workload!r}")
  path = os.path.join(base_dir, cfg.trace)
  if not os.path.exists(path):
    raise FileNotFoundError(f"trace not found: {path}")
  trace = load_csv_trace(path).filter(cfg.max_total_tokens or context_window)

  def make(rate):
    if not rate:
      return trace.requests(n=min(n, len(trace)))
    return trace.requests(n=n, rate=rate, process=cfg.arrival, cv=cfg.cv, seed=seed,
                          sample=True)
  return make
