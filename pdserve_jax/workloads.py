"""Workloads: arrival processes, length distributions and trace files, as Requests.

Everything is seeded. Arrivals at a rate are drawn at unit rate and scaled, so one
seed gives the same request sequence at every rate, only compressed or stretched in
time; that keeps attainment-versus-rate curves smooth for the goodput bisection.

Traces are CSV files with `num_prefill_tokens,num_decode_tokens` and an optional
`arrived_at` column (seconds), Mooncake's JSON lines (`timestamp` ms,
`input_length`, `output_length`, `hash_ids`: one id per 512-token prompt block), or
ShareGPT-style JSON conversations measured with a caller's tokenizer.

Prefix structure travels as `Request.blocks` (`core.prefix.Blocks`): block ids,
equal ids meaning equal tokens with equal prefixes. Mooncake's traces carry them;
`shared_prefix` makes them for a system prompt shared by a fraction of sessions and
multi-turn sessions whose next prompt is the previous prompt, its answer and a new
message. The simulator turns blocks into page keys; the engine makes real prompts
from them (`core.prefix.block_tokens`), so shared blocks share real tokens.

Every app's config holds one workload block (`DEFAULTS`, built by `config`, read by
`from_config`). Nothing here knows about devices or models.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
from typing import Callable, Optional, Sequence

import numpy as np

from pdserve_jax.core.prefix import MOONCAKE_BLOCK, Blocks, reuse_bound
from pdserve_jax.core.request import Request

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


def shared_prefix(n: int, rate: float, message, output, system_prompt_len: int = 0,
                  system_prompt_share: float = 0.0, turns: int = 1, think_time: float = 0.0,
                  block_size: int = 16, max_total_tokens: Optional[int] = None,
                  process: str = "poisson", cv: float = 1.0, seed: int = 0) -> list[Request]:
  """`n` requests with prefix structure (`Request.blocks` of `block_size` tokens).

  Sessions start at `rate / turns` per second (`process`, `cv`). A session uses the
  shared system prompt of `system_prompt_len` tokens with probability
  `system_prompt_share`; its first prompt is that system prompt (or nothing) plus a
  message of `message` tokens, and each later turn's prompt is the previous prompt,
  its answer (`output` tokens) and a new message. Turns follow each other after
  think times drawn exponentially with mean `think_time` s (open loop: a turn does
  not wait for the previous answer). A session ends after `turns` turns, or before
  a turn whose prompt + output would exceed `max_total_tokens`. Requests are
  numbered in arrival order.
  """
  if not 0 <= system_prompt_share <= 1:
    raise ValueError(f"system_prompt_share must lie in [0, 1], got {system_prompt_share}")
  for name, v in (("system_prompt_len", system_prompt_len), ("think_time", think_time)):
    if not v >= 0:
      raise ValueError(f"{name} must be >= 0, got {v}")
  _check_positive("turns", turns)
  _check_positive("block_size", block_size)
  rng = np.random.default_rng([seed, 3])
  starts = arrival_times(n, rate / turns, process, cv, seed)
  system = list(range(system_prompt_len // block_size))  # its full blocks' ids
  next_id = len(system)
  out = []  # (arrival, prompt_len, max_tokens, block ids)
  for start in starts:
    shared = system_prompt_len > 0 and rng.random() < system_prompt_share
    length, ids, t, answer = (system_prompt_len if shared else 0), [], float(start), 0
    for k in range(turns):
      new = length + answer + int(message.sample(1, rng)[0])
      out_len = int(output.sample(1, rng)[0])
      if max_total_tokens is not None and new + out_len > max_total_tokens:
        break
      keep = length // block_size if k else (len(system) if shared else 0)
      fresh = -(-new // block_size) - keep
      ids = (ids[:keep] if k else system[:keep]) + list(range(next_id, next_id + fresh))
      next_id += fresh
      out.append((t, new, out_len, tuple(ids)))
      length, answer = new, out_len
      t += float(rng.exponential(think_time)) if think_time else 0.0
      if len(out) == n:
        break
    if len(out) == n:
      break
  out.sort(key=lambda x: x[0])
  return [Request(i, p, o, a, blocks=Blocks(ids, block_size))
          for i, (a, p, o, ids) in enumerate(out)]


@dataclasses.dataclass(frozen=True)
class Phase:
  """`num_requests` requests at `rate` requests/s with lengths from the `prompt` and
  `output` distributions: one stretch of a `shifting` workload."""
  num_requests: int
  rate: float
  prompt: object  # a length distribution (`Fixed`, `Uniform`, `Lognormal`)
  output: object


def shifting(phases: Sequence[Phase], rate_scale: float = 1.0, process: str = "poisson",
             cv: float = 1.0, seed: int = 0) -> list[Request]:
  """Requests whose prompt/output mix shifts over time: each phase's arrivals start
  where the previous phase's ended, at its rate times `rate_scale` (so one seed gives
  the same requests at every scale, compressed or stretched in time). Ids count up
  across phases."""
  if not phases:
    raise ValueError("a shifting workload needs at least one phase")
  out: list[Request] = []
  start = 0.0
  for k, ph in enumerate(phases):
    if not ph.rate > 0:
      raise ValueError(f"phase {k}: rate must be positive, got {ph.rate}")
    reqs = synthetic(ph.num_requests, ph.rate * rate_scale, ph.prompt, ph.output, process,
                     cv, seed=seed * 1000 + k)
    for r in reqs:
      r.request_id += len(out)
      r.arrival_time += start
    if reqs:
      start = reqs[-1].arrival_time
    out += reqs
  return out


def long_prompt_burst(context: int, num_requests: int = 120, rate: float = 1.0,
                      seed: int = 0) -> list[Request]:
  """A chat-like mix (short prompts, long outputs: decode-heavy), then a burst of
  long prompts with short outputs at twice the rate (prefill-heavy, say a batch of
  documents to summarise), then chat again; lengths scaled to `context` tokens
  (prompt + output). The shift a fixed prefill:decode split cannot follow."""
  if context < 16:
    raise ValueError(f"context must be >= 16 tokens, got {context}")
  c, third = context, num_requests // 3
  chat = lambda n: Phase(n, rate, Uniform(max(1, c // 32), c // 8),
                         Uniform(c // 4, c // 2))
  burst = Phase(num_requests - 2 * third, 2 * rate, Uniform(c // 2, 3 * c // 4),
                Uniform(2, max(2, c // 32)))
  return shifting([chat(third), burst, chat(third)], seed=seed)


@dataclasses.dataclass(frozen=True)
class Trace:
  """Request lengths, with recorded arrival times (s, starting at 0) when known,
  and prompt block hashes (`core.prefix.Blocks`, an object array) when recorded."""
  name: str
  prompt_lens: np.ndarray
  output_lens: np.ndarray
  arrivals: Optional[np.ndarray] = None
  blocks: Optional[np.ndarray] = None

  def __len__(self) -> int:
    return len(self.prompt_lens)

  def filter(self, max_total_tokens: int, max_prompt_len: Optional[int] = None) -> Trace:
    """The requests whose prompt + output fit `max_total_tokens` (a model's context
    window) and whose prompt fits `max_prompt_len`; recorded arrivals are kept as
    they were."""
    keep = self.prompt_lens + self.output_lens <= max_total_tokens
    if max_prompt_len is not None:
      keep &= self.prompt_lens <= max_prompt_len
    if not keep.any():
      raise ValueError(f"no request of trace {self.name} fits {max_total_tokens} tokens"
                       + ("" if max_prompt_len is None else
                          f" with a prompt of at most {max_prompt_len}"))
    arr = None if self.arrivals is None else self.arrivals[keep]
    blocks = None if self.blocks is None else self.blocks[keep]
    return Trace(self.name, self.prompt_lens[keep], self.output_lens[keep], arr, blocks)

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
    reqs = make_requests(self.prompt_lens[idx], self.output_lens[idx], arr)
    if self.blocks is not None:
      for r, b in zip(reqs, self.blocks[idx]):
        r.blocks = b
    return reqs

  def hit_bound(self, n: Optional[int] = None) -> float:
    """The share of prompt tokens of the first `n` requests (all by default) in
    blocks that an earlier request had: what an infinite cache of whole blocks could
    reuse (Mooncake's "repeated blocks", weighted by tokens; a partial last block
    counts its tokens)."""
    if self.blocks is None:
      raise ValueError(f"trace {self.name} records no prompt blocks")
    return reuse_bound(self.blocks[:n], self.prompt_lens[:n])


def _validated(name, prompts, outputs, arrivals, rows, blocks=None) -> Trace:
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
  if blocks is not None:
    bl = np.empty(len(blocks), dtype=object)
    bl[:] = blocks
    blocks = bl
  if arrivals is not None:
    arr = np.asarray(arrivals, dtype=np.float64)
    if np.any(np.diff(arr) < 0):
      order = np.argsort(arr, kind="stable")
      p, o, arr = p[order], o[order], arr[order]
      blocks = None if blocks is None else blocks[order]
    arr = arr - arr[0]
  return Trace(name, p, o, arr, blocks)


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


def load_mooncake(path: str) -> Trace:
  """Reads a Mooncake trace (kvcache-ai/Mooncake, FAST25-release/traces): JSON lines
  of `timestamp` (ms), `input_length`, `output_length` and `hash_ids`, one id per
  512-token prompt block. Rows are sorted by arrival."""
  prompts, outputs, arrivals, rows, blocks = [], [], [], [], []
  with open(path) as f:
    for line_no, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
        p, ids = int(row["input_length"]), tuple(int(h) for h in row["hash_ids"])
        prompts.append(p)
        outputs.append(int(row["output_length"]))
        arrivals.append(float(row["timestamp"]) / 1000.0)
      except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"trace {path}, line {line_no}: {e!r}") from None
      if len(ids) != -(-p // MOONCAKE_BLOCK):
        raise ValueError(f"trace {path}, line {line_no}: {len(ids)} hash_ids for "
                         f"{p} tokens (one per {MOONCAKE_BLOCK}-token block)")
      blocks.append(Blocks(ids, MOONCAKE_BLOCK))
      rows.append(line_no)
  return _validated(path, prompts, outputs, arrivals, rows, blocks)


def load_trace(path: str) -> Trace:
  """A Mooncake trace (`.jsonl`) or a CSV trace, by the file's extension."""
  return load_mooncake(path) if path.endswith(".jsonl") else load_csv_trace(path)


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


# The one workload block every app's config holds (`config.workload`), with its
# defaults; `config(**overrides)` builds it, `from_config` reads it.
DEFAULTS = dict(
    source="synthetic",  # "synthetic" or "trace"
    trace="",  # CSV trace (see `load_csv_trace`), relative to the current directory
    num_requests=100,
    rate=1.0,  # requests/s; 0 with a trace replays its recorded arrivals
    arrival="poisson",  # or "gamma", with coefficient of variation `cv`
    cv=1.0,
    lengths="fixed",  # synthetic lengths: "fixed", "uniform" or "lognormal"
    prompt_mean=512,
    prompt_spread=0.0,  # std / mean (uniform and lognormal)
    output_mean=64,
    output_spread=0.0,
    max_total_tokens=0,  # prompt + output cap; 0: the app's context (model or engine)
    max_prompt_tokens=0,  # prompt cap (LongBench truncates prompts so); 0: none
    too_long="drop",  # trace rows beyond the caps: "drop" them, or "clip" (prompt first)
    allow_dropping_most=False,  # go on when over half of a trace's rows are dropped
    seed=0,
    # Prefix structure of synthetic requests (`shared_prefix`): a system prompt of
    # `system_prompt_len` tokens shared by `system_prompt_share` of the sessions,
    # `turns` per session `think_time` s apart (prompt_mean / lengths then give each
    # message's length), in blocks of `block_size` tokens. Off at 0 / 1.
    system_prompt_len=0,
    system_prompt_share=0.0,
    turns=1,
    think_time=0.0,
    block_size=16,
)
TOO_LONG = ("drop", "clip")
SOURCES = ("synthetic", "trace")
LENGTHS = ("fixed", "uniform", "lognormal")


def config(**overrides):
  """The workload block: `DEFAULTS` with `overrides`, each of its default's type (so
  `rate=6` stays a float a command line may set to 2.5)."""
  import ml_collections  # only config files and apps need it

  unknown = sorted(set(overrides) - set(DEFAULTS))
  if unknown:
    raise ValueError(f"unknown workload key(s) {unknown}; known: {sorted(DEFAULTS)}")
  return ml_collections.ConfigDict(
      {k: type(v)(overrides.get(k, v)) for k, v in DEFAULTS.items()})


def _bad(key, what, value):
  return ValueError(f"workload.{key}: {what}, got {value!r}")


def check_config(w) -> None:
  """Raises ValueError naming the first bad key of a workload block."""
  unknown = sorted(set(w.keys()) - set(DEFAULTS))
  if unknown:
    raise ValueError(f"unknown config key workload.{unknown[0]}")
  missing = sorted(set(DEFAULTS) - set(w.keys()))
  if missing:
    raise ValueError(f"config key workload.{missing[0]} is missing")
  choices = {"source": SOURCES, "arrival": ARRIVAL_PROCESSES, "lengths": LENGTHS,
             "too_long": TOO_LONG}
  for key, known in choices.items():
    if w[key] not in known:
      raise _bad(key, f"must be one of {', '.join(known)}", w[key])
  for key in ("num_requests", "prompt_mean", "output_mean", "turns", "block_size"):
    if not w[key] >= 1:
      raise _bad(key, "must be >= 1", w[key])
  if not 0 <= w.system_prompt_share <= 1:
    raise _bad("system_prompt_share", "must lie in [0, 1]", w.system_prompt_share)
  for key in ("prompt_spread", "output_spread", "max_total_tokens", "max_prompt_tokens",
              "seed", "system_prompt_len", "think_time"):
    if not w[key] >= 0:
      raise _bad(key, "must be >= 0", w[key])
  if not w.cv > 0 or not math.isfinite(w.cv):
    raise _bad("cv", "must be > 0", w.cv)
  replay = w.source == "trace" and w.rate == 0
  if not (replay or w.rate > 0) or not math.isfinite(w.rate):
    raise _bad("rate", "must be > 0" + (" (or 0 to replay the trace's arrivals)"
                                        if w.source == "trace" else ""), w.rate)
  if w.source == "trace" and not w.trace:
    raise _bad("trace", "a trace source needs a CSV or Mooncake .jsonl path", w.trace)


def _lengths(kind: str, mean: float, spread: float, high: int):
  """A length distribution of `kind` with this mean and spread (std / mean), capped
  at `high`; uniform spans mean +- sqrt(3) * spread * mean."""
  if kind == "fixed":
    return Fixed(min(int(round(mean)), high))
  if kind == "uniform":
    half = math.sqrt(3) * spread * mean
    low = max(1, min(int(round(mean - half)), high))
    return Uniform(low, max(low, min(int(round(mean + half)), high)))
  return Lognormal(mean, spread, 1, high)


@dataclasses.dataclass(frozen=True)
class Fit:
  """What a workload block's caps did to its lengths: of `rows` (trace rows, or a
  seed's synthetic draws) `kept` fitted as they were, `clipped` were shortened
  and `dropped` left out; mean prompt and output lengths before and after."""
  source: str
  cap: int  # prompt + output tokens allowed
  prompt_cap: int
  rows: int
  kept: int
  clipped: int
  dropped: int
  mean_prompt_before: float
  mean_output_before: float
  mean_prompt: float
  mean_output: float

  @property
  def dropped_share(self) -> float:
    return self.dropped / self.rows if self.rows else 0.0

  def describe(self) -> str:
    return (f"workload: {self.source}: {self.rows:,} rows; {self.kept:,} kept, "
            f"{self.clipped:,} clipped, {self.dropped:,} dropped by the {self.cap:,}-token "
            f"context" + (f" and {self.prompt_cap:,}-token prompt cap"
                          if self.prompt_cap < self.cap - 1 else "")
            + f"; mean prompt {self.mean_prompt:,.0f} tokens (before "
            f"{self.mean_prompt_before:,.0f}), mean output {self.mean_output:,.0f} (before "
            f"{self.mean_output_before:,.0f})")

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


def _fit_lengths(p: np.ndarray, o: np.ndarray, total: int, max_prompt: int,
                 too_long: str):
  """(prompts, outputs, keep mask, clipped mask) under the caps: rows beyond them are
  dropped, or clipped prompt first (then the output into what is left)."""
  over = (p > max_prompt) | (p + o > total)
  if too_long == "drop":
    return p, o, ~over, np.zeros_like(over)
  pc = np.minimum(p, max_prompt)
  oc = np.maximum(np.minimum(o, total - pc), 1)
  return pc, oc, np.ones_like(over), over


def from_config(w, context: int, max_prompt_len: Optional[int] = None) -> Callable:
  """(rate, seed=None) -> requests, from a workload block (`DEFAULTS`); every app
  reads its workload through this. `seed` (default: the block's) seeds lengths and
  arrivals, for estimates over seeds (`sim.goodput.over_seeds`). The callable's
  `fit` (a `Fit`) says what the caps did to the lengths.

  A synthetic source draws `num_requests` prompt and output lengths from
  `lengths`, with prefix structure (`shared_prefix`: the prompt lengths are then
  each message's) when `system_prompt_len` > 0 or `turns` > 1; a trace source
  (`trace`, a CSV or Mooncake `.jsonl` path relative to the current directory)
  samples its rows with replacement, or at rate 0 replays its first
  `num_requests` rows at their recorded times; a Mooncake trace at a rate keeps
  its rows in order (sessions stay in order) under generated arrivals. Prompt +
  output stay within `max_total_tokens` (0: `context`) and prompts within
  `max_prompt_tokens` and `max_prompt_len`: synthetic lengths are clipped; trace
  rows beyond them are dropped, or clipped with `too_long="clip"`. A trace that
  loses more than half its rows is refused (ValueError naming the fixes) unless
  `allow_dropping_most`. Arrivals follow `arrival` at the rate, seeded by `seed`:
  one seed gives the same requests at every rate, compressed or stretched in time.
  Raises ValueError naming a bad key and FileNotFoundError for a missing trace.
  """
  check_config(w)
  total = w.max_total_tokens or context
  max_prompt = min(total - 1, max_prompt_len or total, w.max_prompt_tokens or total)
  if max_prompt < 1:
    raise _bad("max_total_tokens", "leaves no room for a prompt and an output", total)
  n, seed = w.num_requests, w.seed
  if w.source == "synthetic":
    prompt = _lengths(w.lengths, w.prompt_mean, w.prompt_spread, max_prompt)
    output = _lengths(w.lengths, w.output_mean, w.output_spread, total - 1)
    if w.system_prompt_len > 0 or w.turns > 1:
      def make_prefixed(rate, seed=seed):
        return shared_prefix(n, rate, prompt, output, w.system_prompt_len,
                             w.system_prompt_share, w.turns, w.think_time, w.block_size,
                             total, w.arrival, w.cv, seed)
      return make_prefixed

    def make(rate, seed=seed):
      reqs = synthetic(n, rate, prompt, output, w.arrival, w.cv, seed)
      for r in reqs:  # the prompt first, the output in what is left
        r.max_tokens = min(r.max_tokens, total - r.prompt_len)
      return reqs
    make.fit = _synthetic_fit(w, make, total, max_prompt)
    return make
  path = os.path.abspath(w.trace)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"workload.trace: no such file {w.trace!r} (relative to "
                            f"{os.getcwd()})")
  full = load_trace(path)
  p, o, keep, clipped = _fit_lengths(full.prompt_lens, full.output_lens, total, max_prompt,
                                     w.too_long)
  fit = Fit(w.trace, total, max_prompt, len(full), int((keep & ~clipped).sum()),
            int(clipped.sum()), int((~keep).sum()), float(full.prompt_lens.mean()),
            float(full.output_lens.mean()), float(p[keep].mean()) if keep.any() else 0.0,
            float(o[keep].mean()) if keep.any() else 0.0)
  if not keep.any():
    raise ValueError(f"workload.trace: no row of {w.trace} fits {total} tokens with a "
                     f"prompt of at most {max_prompt}; set workload.too_long=clip")
  if fit.dropped_share > 0.5 and not w.allow_dropping_most:
    raise ValueError(
        f"workload.trace: {fit.dropped:,} of {fit.rows:,} rows of {w.trace} "
        f"({fit.dropped_share:.0%}) do not fit the {total:,}-token context (prompt cap "
        f"{max_prompt:,}), and the kept rows are not the trace: mean prompt "
        f"{fit.mean_prompt:,.0f} tokens against {fit.mean_prompt_before:,.0f}. Set "
        "workload.too_long=clip to truncate them, use a model with a longer context, or "
        "set workload.allow_dropping_most=True to go on with the rows that fit")
  arr = None if full.arrivals is None else full.arrivals[keep]
  trace = Trace(full.name, p[keep], o[keep], arr,
                None if full.blocks is None else full.blocks[keep])
  ordered = trace.blocks is not None  # resampling rows would break their sessions

  def make(rate, seed=seed):
    if not rate:
      return trace.requests(n=min(n, len(trace)))
    return trace.requests(n=min(n, len(trace)) if ordered else n, rate=rate,
                          process=w.arrival, cv=w.cv, seed=seed, sample=not ordered)
  make.fit = fit
  return make


def _synthetic_fit(w, make, total: int, max_prompt: int) -> Fit:
  """The caps' effect on the block seed's synthetic draws."""
  raw = synthetic(w.num_requests, 1.0, _lengths(w.lengths, w.prompt_mean, w.prompt_spread,
                                                1 << 40),
                  _lengths(w.lengths, w.output_mean, w.output_spread, 1 << 40), w.arrival,
                  w.cv, w.seed)
  got = make(1.0)
  p0 = np.array([r.prompt_len for r in raw])
  o0 = np.array([r.max_tokens for r in raw])
  p1 = np.array([r.prompt_len for r in got])
  o1 = np.array([r.max_tokens for r in got])
  clipped = int(((p0 > max_prompt) | (p0 + o0 > total)).sum())
  return Fit(f"synthetic {w.lengths}", total, max_prompt, len(raw), len(raw) - clipped,
             clipped, 0, float(p0.mean()), float(o0.mean()), float(p1.mean()),
             float(o1.mean()))
