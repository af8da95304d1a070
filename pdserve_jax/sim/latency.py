"""Latency models: how long one instance takes for one scheduler step.

Three families behind one interface (`LatencyModel`):
  * `RooflineLatencyModel`: analytic, from a `ModelConfig` and a `HardwareSpec`
    (FLOPs and HBM bytes of weights, KV and activations, tensor-parallel
    all-reduces), with named efficiency factors. Good for any model and hardware,
    only as right as its efficiencies.
  * `PolynomialLatencyModel`: DistServe's fitted form (arXiv 2401.09670, section
    4.1 and its simulator): prefill a + b*S + c*S2 with S the batch's prompt tokens
    and S2 the sum of squared prompt lengths; decode a + b*C + c*B with C the
    batch's context tokens and B its size, one coefficient set below a batch-size
    threshold and one at or above it. Loadable from DistServe's JSON, fitted by
    `fit_polynomial` from profiles, saved as JSON.
  * `ShapeTableLatencyModel`: this library's engine as measured, one time per
    compiled program shape, a step costing the calls the runner makes for it
    (same groups, same buckets). Exact for the instance it was profiled on, and
    for nothing else: it knows no other model, tp or pp.
  * `ShareScaling`: semi-PD's slowdown of a phase given a share s of the device's
    compute, t_100 * (alpha / s + beta).

Pipeline parallelism follows DistServe's convention: an instance with `pp` stages
is a full pipeline, so an iteration costs one stage's time (the whole time / pp).
This models throughput, not the extra latency of a request crossing every stage.
Times are seconds. Knows nothing of arrays; reads `Step` shapes only.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Callable, Iterable, Optional, Sequence

import numpy as np

from pdserve_jax.kv.allocator import pages_for
from pdserve_jax.model.config import ModelConfig
from pdserve_jax.runtime.buckets import RunnerShape, groups
from pdserve_jax.serving.share import ShareScaling  # noqa: F401  (re-exported)
from pdserve_jax.serving.step import Step
from pdserve_jax.sim.hardware import HardwareSpec


def transfer_time(num_bytes: float, bandwidth: float, latency_s: float = 0.0) -> float:
  """Seconds to move `num_bytes` over a link of `bandwidth` bytes/s."""
  if bandwidth <= 0:
    raise ValueError(f"link bandwidth must be positive, got {bandwidth}")
  return latency_s + num_bytes / bandwidth


class LatencyModel:
  """Step times of one instance. Subclasses define the three `*_totals` methods,
  which see only batch totals, so the simulator never walks a batch twice."""

  def prefill_totals(self, num_seqs: int, tokens: int, sq_tokens: int) -> float:
    """Seconds for `num_seqs` prompt chunks of `tokens` tokens in all; `sq_tokens`
    sums end**2 - start**2 over the chunks (a whole prompt of length l gives l**2),
    the count of causal attention pairs times two."""
    raise NotImplementedError

  def decode_totals(self, batch: int, context: int) -> float:
    """Seconds for one decode step of `batch` requests attending over `context`
    tokens in all."""
    raise NotImplementedError

  def mixed_totals(self, num_seqs: int, tokens: int, sq_tokens: int, batch: int,
                   context: int) -> float:
    """Seconds for a step with prompt chunks and decodes together (chunked prefill)."""
    raise NotImplementedError

  def prefill_time(self, prompt_lens: Sequence[int],
                   cached_lens: Optional[Sequence[int]] = None) -> float:
    """Seconds to prefill these prompts; with `cached_lens`, only the tokens after
    each cached prefix are computed (a chunk of a chunked prefill)."""
    if cached_lens is None:
      return self.prefill_totals(len(prompt_lens), sum(prompt_lens),
                                 sum(l * l for l in prompt_lens))
    if len(cached_lens) != len(prompt_lens):
      raise ValueError("cached_lens and prompt_lens differ in length")
    return self.prefill_totals(len(prompt_lens),
                               sum(l - c for l, c in zip(prompt_lens, cached_lens)),
                               sum(l * l - c * c for l, c in zip(prompt_lens, cached_lens)))

  def decode_time(self, context_lens: Sequence[int]) -> float:
    """Seconds for one decode step; `context_lens` are the tokens each request
    attends over (its cached KV plus the token being fed)."""
    return self.decode_totals(len(context_lens), sum(context_lens))

  def save(self, path: str) -> None:
    """Writes `to_json()` (the fitted and measured models have one)."""
    with open(path, "w") as f:
      f.write(self.to_json())

  def step_time(self, step: Step, pages=None) -> float:
    """Seconds for a scheduler `Step`. `pages(request)` lists a request's KV pages
    (its allocator's `pages`), for models that see page-table widths."""
    if not step.prefills:
      return self.decode_totals(len(step.decodes), step.decode_context)
    s = s2 = 0
    for c in step.prefills:
      s += c.end - c.start
      s2 += c.end * c.end - c.start * c.start
    if not step.decodes:
      return self.prefill_totals(len(step.prefills), s, s2)
    return self.mixed_totals(len(step.prefills), s, s2, len(step.decodes),
                             step.decode_context)


def _latency_json(text: str, kind: str) -> dict:
  """A latency model's JSON, checked to be of `kind` and in seconds."""
  d = json.loads(text)
  if d.get("kind") != kind or d.get("unit") != "s":
    raise ValueError(f"not a {kind} latency model in seconds: kind={d.get('kind')!r}, "
                     f"unit={d.get('unit')!r}")
  return d


@dataclasses.dataclass(frozen=True)
class ShapeTableLatencyModel(LatencyModel):
  """Measured seconds per compiled program shape of one engine instance.

  A step costs the program calls `serving.executor` makes for it: prompt chunks in
  groups of `max_prefill_batch`, decodes in groups of `max_decode_batch`, each call
  at the (batch, length, page-table width) bucket the runner pads it to. Page-table
  widths count the pages a request holds (`pages` in `step_time`), which with
  lifetime reservation exceed what its context needs; without `pages`, and in the
  `*_totals` methods (equal rows assumed), only the context's pages are counted.
  `step_overhead_s` is the serving loop's host work between one step and the next
  (finishing the last, scheduling this one), added once per step.
  """
  shape: RunnerShape
  prefill: dict  # (batch, chunk length, table width) -> s
  decode: dict  # (batch, table width) -> s
  step_overhead_s: float = 0.0

  def _lookup(self, table, key, what):
    try:
      return table[key]
    except KeyError:
      raise ValueError(f"no measured {what} program of shape {key}; measured: "
                       f"{sorted(table)}") from None

  def calls_time(self, prefill_calls=(), decode_calls=()) -> float:
    """Seconds for these program calls, given by shape (as `StepRecord`s hold them)."""
    return (sum(self._lookup(self.prefill, tuple(k), "prefill") for k in prefill_calls)
            + sum(self._lookup(self.decode, tuple(k), "decode") for k in decode_calls))

  def _prefill_calls(self, chunk_lens, page_counts) -> float:
    n = self.shape.max_prefill_batch
    return self.calls_time(prefill_calls=[
        self.shape.prefill_shape(l, w) for l, w in zip(groups(chunk_lens, n),
                                                        groups(page_counts, n))])

  def _decode_calls(self, page_counts) -> float:
    return self.calls_time(decode_calls=[
        self.shape.decode_shape(w) for w in groups(page_counts, self.shape.max_decode_batch)])

  def step_time(self, step: Step, pages=None) -> float:
    size = self.shape.page_size
    count = (lambda r, tokens: len(pages(r))) if pages else (
        lambda r, tokens: pages_for(tokens, size))
    t = self.step_overhead_s
    if step.prefills:
      t += self._prefill_calls([c.end - c.start for c in step.prefills],
                               [count(c.request, c.end) for c in step.prefills])
    if step.decodes:
      t += self._decode_calls([count(r, r.context_len) for r in step.decodes])
    return t

  def prefill_totals(self, num_seqs, tokens, sq_tokens):
    # Equal chunks starting at 0 (sq_tokens is implied by them).
    l = max(1, tokens // num_seqs)
    return self.step_overhead_s + self._prefill_calls(
        [l] * num_seqs, [pages_for(l, self.shape.page_size)] * num_seqs)

  def decode_totals(self, batch, context):
    w = pages_for(max(1, context // batch), self.shape.page_size)
    return self.step_overhead_s + self._decode_calls([w] * batch)

  def mixed_totals(self, num_seqs, tokens, sq_tokens, batch, context):
    return (self.prefill_totals(num_seqs, tokens, sq_tokens)
            + self.decode_totals(batch, context) - self.step_overhead_s)

  def to_json(self) -> str:
    return json.dumps({"kind": "shape_table", "unit": "s",
                       "shape": dataclasses.asdict(self.shape),
                       "prefill": [[*k, v] for k, v in sorted(self.prefill.items())],
                       "decode": [[*k, v] for k, v in sorted(self.decode.items())],
                       "step_overhead_s": self.step_overhead_s}, indent=1)

  @classmethod
  def from_json(cls, text: str) -> ShapeTableLatencyModel:
    d = _latency_json(text, "shape_table")
    return cls(RunnerShape(**d["shape"]), {tuple(r[:3]): float(r[3]) for r in d["prefill"]},
               {tuple(r[:2]): float(r[2]) for r in d["decode"]},
               float(d.get("step_overhead_s", 0.0)))


def _triple(x) -> tuple[float, float, float]:
  t = tuple(float(v) for v in x)
  if len(t) != 3:
    raise ValueError(f"expected three coefficients (a, b, c), got {x}")
  return t


@dataclasses.dataclass(frozen=True)
class PolynomialLatencyModel(LatencyModel):
  """DistServe's polynomial latency form; coefficients in seconds.

  Attributes:
    prefill: (a, b, c): a + b*S + c*S2.
    decode_small: (a, b, c): a + b*C + c*B for B < large_batch_threshold.
    decode_large: the same for B >= large_batch_threshold.
    large_batch_threshold: batch size where decode_large takes over.
    pp: pipeline stages; every time is divided by it.
  """
  prefill: tuple[float, float, float]
  decode_small: tuple[float, float, float]
  decode_large: tuple[float, float, float]
  large_batch_threshold: int = 1 << 30
  pp: int = 1
  # True when a mixed step runs the decodes as a program of their own (this
  # library's engine), paying decode's fixed cost too; False when they ride in the
  # prefill's forward pass (Sarathi-Serve).
  separate_mixed: bool = False

  def __post_init__(self):
    for f in ("prefill", "decode_small", "decode_large"):
      object.__setattr__(self, f, _triple(getattr(self, f)))
    if self.pp < 1:
      raise ValueError(f"pp must be >= 1, got {self.pp}")

  def prefill_totals(self, num_seqs, tokens, sq_tokens):
    a, b, c = self.prefill
    return (a + b * tokens + c * sq_tokens) / self.pp

  def decode_totals(self, batch, context):
    a, b, c = self.decode_small if batch < self.large_batch_threshold else self.decode_large
    return (a + b * context + c * batch) / self.pp

  def mixed_totals(self, num_seqs, tokens, sq_tokens, batch, context):
    # The decodes ride on the prefill's pass over the weights: add only their
    # per-token and per-context terms, not a second fixed cost.
    a, b, c = self.decode_small if batch < self.large_batch_threshold else self.decode_large
    fixed = a if self.separate_mixed else 0.0
    return (self.prefill_totals(num_seqs, tokens, sq_tokens)
            + (fixed + b * context + c * batch) / self.pp)

  def with_pp(self, pp: int) -> PolynomialLatencyModel:
    return dataclasses.replace(self, pp=pp)

  def to_json(self) -> str:
    return json.dumps({"kind": "polynomial", "unit": "s", "prefill": list(self.prefill),
                       "decode_small": list(self.decode_small),
                       "decode_large": list(self.decode_large),
                       "large_batch_threshold": self.large_batch_threshold,
                       "pp": self.pp, "separate_mixed": self.separate_mixed}, indent=1)

  @classmethod
  def from_json(cls, text: str) -> PolynomialLatencyModel:
    d = _latency_json(text, "polynomial")
    return cls(d["prefill"], d["decode_small"], d["decode_large"],
               int(d["large_batch_threshold"]), int(d.get("pp", 1)),
               bool(d.get("separate_mixed", False)))

  @classmethod
  def load(cls, path: str) -> PolynomialLatencyModel:
    with open(path) as f:
      return cls.from_json(f.read())

  @classmethod
  def from_distserve(cls, entry: dict, pp: int = 1) -> PolynomialLatencyModel:
    """From one (model, tp) entry of DistServe's profile JSON (milliseconds)."""
    try:
      ms = [_triple(entry[k]) for k in ("prefill", "decoding_smallbs", "decoding_largebs")]
      thr = int(entry["decoding_large_small_bs_threshold"])
    except KeyError as e:
      raise ValueError(f"DistServe profile entry lacks {e}") from None
    p, s, l = ([v * 1e-3 for v in t] for t in ms)
    return cls(p, s, l, thr, pp)


def load_distserve_json(path: str, model: str, tp: int, pp: int = 1) -> PolynomialLatencyModel:
  """Reads DistServe's profile JSON ({model: {tp: entry}}, ms) for `model`, which
  may be given with or without its "facebook/" prefix."""
  with open(path) as f:
    data = json.load(f)
  key = model if model in data else next(
      (k for k in data if k.split("/")[-1] == model), None)
  if key is None:
    raise ValueError(f"{path} has no model {model!r}; it has {sorted(data)}")
  if str(tp) not in data[key]:
    raise ValueError(f"{path} has no tp={tp} for {key}; it has tp {sorted(data[key])}")
  return PolynomialLatencyModel.from_distserve(data[key][str(tp)], pp)


# DistServe's fitted coefficients for A100-80GB (ms; threshold 95 for all), from
# LLMServe/DistServe, simdistserve/estimators/profile_data, profiler-a100-80g
# (Apache-2.0): {(model, tp): (prefill, decode_small, decode_large)}.
_DISTSERVE_A100_80G_MS = {
    ("opt-13b", 1): ((18.10254647486372, 0.1019122572698738, 7.122264314252114e-06),
                     (19.934702624895458, 0.0006269356524350583, 0.03850697740828398),
                     (7.1661889468253595, 0.0005798000403396046, 0.15831096191764046)),
    ("opt-13b", 2): ((14.742973695171262, 0.06857720739764, 2.4495727400243586e-06),
                     (13.294796350285385, 0.00034109219700723494, 0.06296393225243659),
                     (10.638741913126715, 0.00031183369638295723, 0.08562913604102729)),
    ("opt-13b", 4): ((12.062297033449054, 0.03808140082550695, 5.226249731787869e-07),
                     (10.256231678259395, 0.00018786702316166354, 0.03269273629225551),
                     (10.483514938375274, 0.00017120888562939117, 0.04566648525887034)),
    ("opt-66b", 2): ((43.05881348288936, 0.2742292870458432, 2.2478042467169447e-05),
                     (48.288015489286245, 0.0009424343535737985, 0.12755020094383188),
                     (28.727693993711597, 0.00047448475459061987, 0.29617792360743994)),
    ("opt-66b", 3): ((32.998230028437035, 0.19568256864690514, 1.2205248980953765e-05),
                     (35.8015439512012, 0.0005845004786127403, 0.0952669764890301),
                     (22.653861586978355, 0.0005358489190129727, 0.208514444037787)),
    ("opt-66b", 4): ((29.441636037717455, 0.151352180625198, 8.317450765979451e-06),
                     (30.760284619429587, 0.000451947603788462, 0.063284195750671),
                     (27.47082137429487, 0.0004046845541646486, 0.12480667738300383)),
    ("opt-66b", 8): ((25.490662375045222, 0.10659177664763161, 3.3910502518615973e-06),
                     (23.15511135047022, 0.00022691488497826264, 0.04800638397272423),
                     (21.71772781576609, 0.0003758089655762475, 0.08978614175851013)),
}


def distserve_a100(model: str, tp: int = 1, pp: int = 1) -> PolynomialLatencyModel:
  """DistServe's A100-80GB latency model for OPT-13B (tp 1, 2, 4) or OPT-66B
  (tp 2, 3, 4, 8); `model` as "opt-13b" or "facebook/opt-13b"."""
  key = (model.split("/")[-1], tp)
  if key not in _DISTSERVE_A100_80G_MS:
    raise ValueError(f"no DistServe A100 profile for {model} at tp={tp}; known: "
                     f"{sorted(_DISTSERVE_A100_80G_MS)}")
  p, s, l = _DISTSERVE_A100_80G_MS[key]
  return PolynomialLatencyModel.from_distserve(
      {"prefill": p, "decoding_smallbs": s, "decoding_largebs": l,
       "decoding_large_small_bs_threshold": 95}, pp)


def _relative_lstsq(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
  # Dividing each row by its target turns squared error into squared relative
  # error, so short steps weigh as much as long ones.
  if len(y) < x.shape[1]:
    raise ValueError(f"need at least {x.shape[1]} samples to fit, got {len(y)}")
  if np.any(y <= 0):
    raise ValueError("sample times must be positive")
  coef, *_ = np.linalg.lstsq(x / y[:, None], np.ones_like(y), rcond=None)
  return tuple(float(c) for c in coef)


def fit_polynomial(prefill_samples: Iterable[tuple[Sequence[int], float]],
                   decode_samples: Iterable[tuple[Sequence[int], float]],
                   large_batch_threshold: Optional[int] = None,
                   pp: int = 1) -> PolynomialLatencyModel:
  """Fits DistServe's form to profiles by least squares on relative error.

  Args:
    prefill_samples: (prompt lengths of a batch, seconds) pairs.
    decode_samples: (context lengths of a batch, seconds) pairs; a context length
      counts the tokens a request attends over in that step.
    large_batch_threshold: fit separate decode coefficients below and at or above
      this batch size; None fits one set for all sizes.
    pp: pipeline stages of the profiled instance; the samples are per-iteration
      times, so the fitted coefficients are multiplied back by `pp`.
  """
  pre = [(list(l), float(t)) for l, t in prefill_samples]
  dec = [(list(l), float(t)) for l, t in decode_samples]
  if not pre or not dec:
    raise ValueError("need both prefill and decode samples")
  if any(not l for l, _ in pre + dec):
    raise ValueError("a sample has an empty batch")
  xp = np.array([[1.0, sum(l), sum(v * v for v in l)] for l, _ in pre])
  prefill = _relative_lstsq(xp, np.array([t for _, t in pre]))

  def fit_decode(rows):
    x = np.array([[1.0, sum(l), len(l)] for l, _ in rows])
    return _relative_lstsq(x, np.array([t for _, t in rows]))

  if large_batch_threshold is None:
    small = large = fit_decode(dec)
    thr = 1 << 30
  else:
    lo = [s for s in dec if len(s[0]) < large_batch_threshold]
    hi = [s for s in dec if len(s[0]) >= large_batch_threshold]
    small, large, thr = fit_decode(lo), fit_decode(hi), large_batch_threshold
  scale = lambda t: tuple(v * pp for v in t)
  return PolynomialLatencyModel(scale(prefill), scale(small), scale(large), thr, pp)


@dataclasses.dataclass(frozen=True)
class RooflineLatencyModel(LatencyModel):
  """Analytic step time of one instance of `tp` x `pp` devices.

  A step costs max(compute, memory) + tensor-parallel all-reduces + a fixed
  overhead, where compute is its matmul and attention FLOPs at
  `flops_efficiency` of peak, and memory is its HBM traffic (weights once, KV
  read and written, activations) at `bandwidth_efficiency` of peak. Megatron-style
  tensor parallelism all-reduces the hidden state twice a layer, over the node's
  link when the `tp` group fits in one node. Attention over a cached prefix in a
  chunked prefill is counted in FLOPs but not in KV bytes.
  """
  model: ModelConfig
  hardware: HardwareSpec
  tp: int = 1
  pp: int = 1
  dtype_bytes: int = 2
  flops_efficiency: float = 0.6
  bandwidth_efficiency: float = 0.8
  link_efficiency: float = 0.7
  collective_latency_s: float = 10e-6
  step_overhead_s: float = 2e-3
  # Hidden-size and ffn-size vectors each layer reads or writes per token.
  activation_hidden_rw: int = 6
  activation_ffn_rw: int = 2

  def __post_init__(self):
    if self.tp < 1 or self.pp < 1:
      raise ValueError(f"tp and pp must be >= 1, got tp={self.tp}, pp={self.pp}")
    for f in ("flops_efficiency", "bandwidth_efficiency", "link_efficiency"):
      if not 0 < getattr(self, f) <= 1:
        raise ValueError(f"{f} must lie in (0, 1], got {getattr(self, f)}")
    m, n = self.model, self.tp * self.pp
    lm = 2 * m.hidden_size * m.vocab_size
    link = self.hardware.link_bandwidth(self.tp <= self.hardware.devices_per_node)
    layer_bytes = m.hidden_size * self.dtype_bytes
    ring = 2 * (self.tp - 1) / self.tp
    consts = {
        "_body_flops": m.flops_per_token() - lm,  # per token, everything but lm head
        "_lm_flops": lm,
        # QK^T and PV: 2 FLOPs per multiply-add, 2 matmuls, per (query, key) pair.
        "_attn_flops": 4 * m.num_layers * m.num_heads * m.head_dim,
        "_weight_bytes": m.num_params() * self.dtype_bytes,
        "_kv_bytes": m.kv_bytes_per_token(self.dtype_bytes),
        "_act_bytes": m.num_layers * self.dtype_bytes * (
            self.activation_hidden_rw * m.hidden_size
            + self.activation_ffn_rw * m.intermediate_size),
        "_flops_rate": n * self.hardware.peak_flops * self.flops_efficiency,
        "_bytes_rate": n * self.hardware.hbm_bandwidth * self.bandwidth_efficiency,
        # All-reduce seconds per token and per call, over all layers, divided by pp.
        "_ar_per_token": (0.0 if self.tp == 1 else
                          2 * m.num_layers * ring * layer_bytes
                          / (link * self.link_efficiency) / self.pp),
        "_ar_fixed": (0.0 if self.tp == 1 else
                      2 * m.num_layers * self.collective_latency_s / self.pp),
        # Activations handed between stages, over the link.
        "_pp_per_token": ((self.pp - 1) * layer_bytes / (link * self.link_efficiency)
                          / self.pp),
    }
    for k, v in consts.items():
      object.__setattr__(self, k, v)

  def _time(self, flops, bytes_, tokens):
    return (max(flops / self._flops_rate, bytes_ / self._bytes_rate)
            + tokens * (self._ar_per_token + self._pp_per_token) + self._ar_fixed
            + self.step_overhead_s)

  def prefill_totals(self, num_seqs, tokens, sq_tokens):
    flops = self._body_flops * tokens + self._lm_flops * num_seqs + self._attn_flops * sq_tokens / 2
    bytes_ = self._weight_bytes + (self._kv_bytes + self._act_bytes) * tokens
    return self._time(flops, bytes_, tokens)

  def decode_totals(self, batch, context):
    flops = (self._body_flops + self._lm_flops) * batch + self._attn_flops * context
    bytes_ = self._weight_bytes + self._kv_bytes * (context + batch) + self._act_bytes * batch
    return self._time(flops, bytes_, batch)

  def mixed_totals(self, num_seqs, tokens, sq_tokens, batch, context):
    flops = (self._body_flops * (tokens + batch) + self._lm_flops * (num_seqs + batch)
             + self._attn_flops * (sq_tokens / 2 + context))
    bytes_ = (self._weight_bytes + self._kv_bytes * (tokens + context + batch)
              + self._act_bytes * (tokens + batch))
    return self._time(flops, bytes_, tokens + batch)


def latency_source(kind: str, model: ModelConfig, hardware: HardwareSpec,
                   **roofline_kw) -> Callable[[int, int], LatencyModel]:
  """A (tp, pp) -> LatencyModel factory, as the simulator and planner take.

  Args:
    kind: "distserve" (DistServe's A100-80GB figures, OPT-13B/66B only),
      "roofline" (analytic, any model and hardware), or the path of a profiled
      JSON: a polynomial (`PolynomialLatencyModel.save`), which describes the tp it
      was profiled at and is returned for every tp (so plan with that tp alone), pp
      dividing its times DistServe's way; or a shape table
      (`ShapeTableLatencyModel.save`), for the one instance it measured (pp = 1).
    model, hardware: what runs.
    roofline_kw: efficiency factors of `RooflineLatencyModel`.
  """
  if kind == "distserve":
    known = sorted({m for m, _ in _DISTSERVE_A100_80G_MS})
    if model.name not in known or hardware.name != "a100-80gb":
      raise ValueError(f"DistServe's figures cover {known} on a100-80gb, not "
                       f"{model.name} on {hardware.name}; use 'roofline' or a fitted JSON")
    return lambda tp, pp: distserve_a100(model.name, tp, pp)
  if kind == "roofline":
    return lambda tp, pp: RooflineLatencyModel(model, hardware, tp, pp, **roofline_kw)
  with open(kind) as f:
    text = f.read()
  if json.loads(text).get("kind") == "shape_table":
    table = ShapeTableLatencyModel.from_json(text)

    def measured(tp, pp):
      if pp != 1:
        raise ValueError(f"{kind} measured one instance without pipeline stages; pp={pp}")
      return table
    return measured
  fitted = PolynomialLatencyModel.from_json(text)
  return lambda tp, pp: fitted.with_pp(pp)
