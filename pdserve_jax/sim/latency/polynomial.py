"""`PolynomialLatencyModel`: DistServe's fitted form (arXiv 2401.09670, section 4.1
and its simulator), prefill a + b*S + c*S2 and decode a + b*C + c*B, loadable from
DistServe's JSON, fitted by `fit_polynomial` from profiles, saved as JSON."""

from __future__ import annotations

import dataclasses
import json
from typing import Iterable, Optional, Sequence

import numpy as np

from pdserve_jax.sim.latency.base import LatencyModel, _latency_json


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
# LLMServe/DistServe, simdistserve/estimators/profile_data (Apache-2.0):
# {(model, tp): (prefill, decode_small, decode_large)}. "distserve" is DistServe's own
# engine (profiler-a100-80g.distserve.json); "vllm" is vLLM as DistServe fitted it
# (profiler-a100-80g.vllm.json), the colocated baseline of the paper's Figures 1 and 8.
_A100_80G_MS = {"distserve": {
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
}, "vllm": {
    ("opt-13b", 1): ((22.052204789310185, 0.14050923870128956, 8.076584822611088e-06),
                     (23.475041008414784, 0.000592934466077393, 0.060726861260369455),
                     (20.206356173691958, 0.0004907727036234946, 0.1200031385587413)),
    ("opt-13b", 2): ((27.440806247810684, 0.0905453268062731, 8.452054313246025e-06),
                     (24.54058424191086, 0.00022440145424035404, 0.08715787269447899),
                     (17.947769467112806, 0.0004570851465217072, 0.11179075830699213)),
    ("opt-13b", 4): ((30.536322590049405, 0.05150644936810146, 4.232473132942393e-07),
                     (25.90114444283343, 7.753634454230709e-05, 0.05528087160867803),
                     (23.88388468859458, 0.00028400164093310935, 0.06276523831046728)),
    ("opt-66b", 2): ((58.3822026348141, 0.3826408030281867, -7.1141486747694485e-06),
                     (57.07344137197128, 0.0036461138777547255, 0.2249373634499222),
                     (26.983759428854572, 0.006200132376379982, 0.4482569479277445)),
    ("opt-66b", 3): ((45.74453423698261, 0.2778127747865773, 3.64624693008797e-05),
                     (44.93958620555262, 0.0008096152552620141, 0.21287979591036174),
                     (43.69602916834496, 0.0008402567346080152, 0.24006467608312998)),
    ("opt-66b", 4): ((42.965489361973944, 0.2128658422785494, 4.601017396226869e-05),
                     (39.58178936012414, 0.0006945721692406896, 0.13580868185596764),
                     (40.859718006896806, 0.0004264871259058686, 0.19508372547790553)),
    ("opt-66b", 8): ((38.931193445523604, 0.1573682229779579, 4.531676245669589e-06),
                     (31.176041922273107, 0.00027556543631760213, 0.0679770397053775),
                     (29.087774405517447, 0.0006027720257746419, 0.1389608688300688)),
}}
A100_SYSTEMS = tuple(_A100_80G_MS)
DISTSERVE_MODELS = sorted({m for m, _ in _A100_80G_MS["distserve"]})


def distserve_a100(model: str, tp: int = 1, pp: int = 1,
                   system: str = "distserve") -> PolynomialLatencyModel:
  """DistServe's A100-80GB latency model for OPT-13B (tp 1, 2, 4) or OPT-66B
  (tp 2, 3, 4, 8); `model` as "opt-13b" or "facebook/opt-13b". `system` is
  "distserve" (its own engine) or "vllm" (vLLM, as DistServe fitted it)."""
  if system not in _A100_80G_MS:
    raise ValueError(f"system must be one of {A100_SYSTEMS}, got {system!r}")
  key = (model.split("/")[-1], tp)
  table = _A100_80G_MS[system]
  if key not in table:
    raise ValueError(f"no {system} A100 profile for {model} at tp={tp}; known: "
                     f"{sorted(table)}")
  p, s, l = table[key]
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
