"""Placement planner: goodput per device for each serving mode under SLOs.

Goodput is the highest arrival rate whose SLO attainment (both P90-style SLOs met by
`target` of requests) stays at or above the target, found by bisection on simulated
runs, divided by the devices used. The planner searches:

  * disaggregated, DistServe's Algorithm 1 (high node affinity): each phase alone
    over tensor x pipeline configs that fit in memory, the best goodput per device
    for each, then replicas of each in the ratio that balances them (or to a
    target rate), checked end to end;
  * disaggregated, DistServe's Algorithm 2 (low node affinity): a prefill and a
    decode instance whose matching pipeline stages share a node (KV moves over the
    node link), pipeline stages across nodes, checked end to end;
  * with `layer_groups` set, the best disaggregated placement of each algorithm
    again with its KV streamed layer by layer in that many groups (the copy
    overlapping the prefill, each group paying the link's latency); with `elastic`
    set, the best disaggregated placement with instances that change role online;
  * semi-PD: the best fixed prefill share on a grid, then the online partitioner
    starting from it;
  * colocated, prefill-first and chunked prefill: the baseline;
  * conditional disaggregation: the best disaggregated placement with each of
    `conditional_thresholds` (prompts with at most that many uncached tokens are
    prefilled on their decode instance, in chunked steps).

With `setup.prefix_cache` and requests that carry prefix blocks, every simulated
run reuses cached prefixes, and the capacity estimates count only the prompt
tokens an infinite cache would not hold (`core.prefix.reuse_bound`).

Each mode's search keeps only what can win. Configs go in order of a capacity
estimated from the latency model at mean lengths (prompt batches at the token
budget; the largest decode batch whose step meets the TPOT SLO). Each config's
capacity is then measured, as its throughput with the whole sample queued at once,
and a config is simulated at the best goodput per device found so far and bisected
only if it meets the SLOs there. Bisection never goes above the measured capacity:
a finite sample can meet the SLOs at rates no steady state sustains (TPOT in
particular hides queueing for a decode slot, spread over every output token).
With `max_spread` set, every candidate that kept a goodput is measured again over
workload seeds (`goodput.over_seeds`, until the 95% interval of the mean is within
`max_spread` of it); the ranking is then by the mean. When other candidates'
intervals overlap the top one's, the top and those get more seeds, one round at a
time, until the overlaps clear or each has `max_tie_seeds`; a candidate still
overlapping is marked `overlaps_best` and `Plan.tied` names them: these seeds do
not rank them. A pruned candidate keeps the reason in `note`. The search itself
runs on the workload's own seed.
Limits: the workload is a fixed-size sample; the ranking gives exact goodput only
for configs that were the best of their mode when tried.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np

from pdserve_jax.core import deploy
from pdserve_jax.core.elastic import ElasticConfig
from pdserve_jax.core.metrics import check_slos
from pdserve_jax.core.prefix import reuse_bound
from pdserve_jax.core.request import Request
from pdserve_jax.core.share import PartitionerConfig, ShareScaling
from pdserve_jax.sim import goodput as search
from pdserve_jax.sim import simulator as sim

Workload = Callable[[float], Sequence[Request]]
# Estimates use mean lengths and ideal batches; measured capacities have come within
# 0.3x to 1.1x of them, so only candidates estimated far below the best are dropped.
_ESTIMATE_SLACK = 1.5


@dataclasses.dataclass(frozen=True)
class PlanSpec:
  """What to plan for.

  Attributes:
    setup: model, hardware and latency source.
    workload: rate (requests/s) -> requests, the same lengths at every rate (and the
      same requests for the same rate: the planner simulates each rate once).
    ttft_slo, tpot_slo: seconds.
    num_nodes: nodes of `setup.hardware.devices_per_node` devices.
    tp_options, pp_options: parallel degrees to try; tp stays within a node.
    max_batch: batch cap of every instance.
    max_step_tokens: prompt-token budget of prefill steps.
    chunked_max_step_tokens: token budget of chunked-prefill steps.
    target: attainment to keep.
    tol: relative precision of each goodput.
    target_rate: if set, Algorithm 1 replicates each phase to carry it; otherwise
      to the ratio that maximises goodput per device within the cluster.
    semi_pd_shares: fixed prefill shares to try.
    semi_pd_concurrent: model semi-PD as SM partitioning instead of time slicing.
    semi_pd_scaling: (prefill, decode) `ShareScaling` of SM partitioning.
    partitioner: SloPartitioner settings for the dynamic semi-PD candidate.
    page_policy: every instance's page policy ("on_demand" or "reserve").
    max_spread: if set, measure each kept candidate over seeds (see the module
      docstring); `workload` must then take `(rate, seed)`.
    layer_groups: if > 0, also try the best disaggregated placements with layer-wise
      KV streaming in this many groups.
    elastic: if set, also try the best disaggregated placement with elastic roles
      steered by these `RoleController` knobs.
    min_seeds, max_seeds: the seed counts of those measurements.
    max_tie_seeds: the seeds a candidate tied with the best may get (None: twice
      `max_seeds`).
    conditional_thresholds: uncached-token thresholds of conditional
      disaggregation to try on the best disaggregated placement (none: not tried).
  """
  setup: sim.Setup
  workload: Workload
  ttft_slo: float
  tpot_slo: float
  num_nodes: int = 1
  tp_options: tuple[int, ...] = (1, 2, 4, 8)
  pp_options: tuple[int, ...] = (1, 2, 4, 8)
  max_batch: int = 256
  max_step_tokens: int = 4096
  chunked_max_step_tokens: int = 512
  target: float = 0.9
  tol: float = 0.03
  target_rate: Optional[float] = None
  semi_pd_shares: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6, 0.7)
  semi_pd_concurrent: bool = False
  semi_pd_scaling: tuple[ShareScaling, ShareScaling] = (ShareScaling(), ShareScaling())
  partitioner: PartitionerConfig = PartitionerConfig()
  page_policy: str = "on_demand"
  max_spread: Optional[float] = None
  min_seeds: int = search.MIN_SEEDS
  max_seeds: int = search.MAX_SEEDS
  layer_groups: int = 0
  elastic: Optional[ElasticConfig] = None
  max_tie_seeds: Optional[int] = None
  conditional_thresholds: tuple[int, ...] = ()

  @property
  def devices_per_node(self) -> int:
    return self.setup.hardware.devices_per_node

  @property
  def num_devices(self) -> int:
    return self.num_nodes * self.devices_per_node


@dataclasses.dataclass
class Candidate:
  """One placement and its goodput (requests/s, whole placement). `goodput` is None
  when the search showed it cannot beat the best of its mode (see `note`).
  `capacity` is its throughput at saturation when `measured`, else an estimate.
  `estimate` is its goodput over seeds when the plan measured one (`goodput` is
  then its mean), and `overlaps_best` whether that interval overlaps the top
  candidate's (per device)."""
  mode: str
  algorithm: str
  deployment: Any
  num_devices: int
  goodput: Optional[float]
  capacity: float
  note: str = ""
  measured: bool = False
  estimate: Optional[search.Estimate] = None
  overlaps_best: bool = False

  @property
  def per_device(self) -> Optional[float]:
    return None if self.goodput is None else self.goodput / self.num_devices

  def describe(self) -> str:
    return self.deployment.describe()

  def to_dict(self) -> dict:
    return {"mode": self.mode, "algorithm": self.algorithm, "placement": self.describe(),
            "num_devices": self.num_devices, "goodput_rps": self.goodput,
            "goodput_per_device": self.per_device, "capacity_rps": self.capacity,
            "capacity_measured": self.measured, "note": self.note,
            "estimate": None if self.estimate is None else self.estimate.to_dict(),
            "overlaps_best": self.overlaps_best}


@dataclasses.dataclass
class Plan:
  candidates: list[Candidate]  # ranked: evaluated by goodput per device, then pruned
  phase_goodput: dict          # {"prefill"|"decode": {"tpXppY": req/s}}
  skipped: dict                # {"tpXppY": reason}
  config_devices: dict         # {"tpXppY": devices}
  tied: list = dataclasses.field(default_factory=list)  # overlapping the best, with it

  def tie_message(self) -> str:
    """"" or a line naming the placements these seeds cannot rank."""
    if not self.tied:
      return ""
    seeds = max(len(c.estimate.seeds) for c in self.tied)
    return (f"tied: {len(self.tied)} placements' 95% intervals overlap the best's after up "
            f"to {seeds} seeds, so these seeds do not rank them: "
            + "; ".join(f"{c.mode} {c.describe()} {c.estimate.scaled(1 / c.num_devices).describe()}"
                        for c in self.tied))

  def phase_per_device(self, phase: str) -> dict:
    """{"tpXppY": req/s per device} of `phase` alone."""
    return {k: g / self.config_devices[k] for k, g in self.phase_goodput[phase].items()}

  def best(self, mode: Union[str, Sequence[str], None] = None) -> Optional[Candidate]:
    """The best candidate of `mode` (a name of `deploy.MODES`, or several, such as
    `deploy.COLOCATED`), or of all modes; its `deployment` is what
    `Engine(model, deployment)` serves."""
    modes = (mode,) if isinstance(mode, str) else mode
    return next((c for c in self.candidates if c.goodput is not None
                 and (modes is None or c.mode in modes)), None)

  def to_dict(self) -> dict:
    return {"candidates": [c.to_dict() for c in self.candidates],
            "best": {m: (c.to_dict() if (c := self.best(m)) else None)
                     for m in deploy.MODES},
            "phase_goodput_rps": self.phase_goodput, "skipped_configs": self.skipped,
            "tied": [c.describe() for c in self.tied]}

  def table(self) -> str:
    rows = [f"{'mode':<24}{'algorithm':<20}{'placement':<46}{'devices':>8}"
            f"{'goodput':>10}{'per device':>12}{'± (95%)':>10}{'seeds':>6}"]
    for c in self.candidates:
      g = "pruned" if c.goodput is None else f"{c.goodput:.2f}"
      p = "-" if c.goodput is None else f"{c.per_device:.2f}"
      e = c.estimate
      spread = "" if e is None else f"{e.half_width / c.num_devices:.2f}"
      seeds = "" if e is None else f"{len(e.seeds)}" + ("*" if c.overlaps_best else "")
      rows.append(f"{c.mode:<24}{c.algorithm:<20}{c.describe():<46}{c.num_devices:>8}"
                  f"{g:>10}{p:>12}{spread:>10}{seeds:>6}" + pruned_reason(c))
    if any(c.overlaps_best for c in self.candidates):
      rows.append("* its 95% interval overlaps the best's: these seeds do not rank them")
    if self.tied:
      rows.append(self.tie_message())
    return "\n".join(rows)


def pruned_reason(c: Candidate) -> str:
  """Why `c` kept no goodput, with the capacity bound the search used ("" when it
  kept one)."""
  if c.goodput is not None:
    return ""
  what = "measured" if c.measured else "estimated"
  return f"  ({c.note}; {what} capacity {c.capacity / c.num_devices:.2f}/device)"


class _Planner:

  def __init__(self, spec: PlanSpec, progress: Optional[Callable[[Candidate], None]] = None):
    check_slos(spec.ttft_slo, spec.tpot_slo)
    self.progress = progress or (lambda c: None)
    if spec.num_nodes < 1:
      raise ValueError(f"num_nodes must be >= 1, got {spec.num_nodes}")
    self.spec = spec
    sample = list(spec.workload(1.0))
    if not sample:
      raise ValueError("the workload produced no requests")
    p = np.array([r.prompt_len for r in sample], dtype=np.float64)
    o = np.array([r.max_tokens for r in sample], dtype=np.float64)
    self.mean_prompt, self.mean_sq_prompt, self.mean_out = p.mean(), (p * p).mean(), o.mean()
    # Prompt tokens a prefill computes, when a prefix cache holds what repeats.
    self.computed_share = 1.0
    if spec.setup.prefix_cache and all(r.blocks is not None for r in sample):
      self.computed_share = 1.0 - reuse_bound([r.blocks for r in sample],
                                              [r.prompt_len for r in sample])
    self.longest = max(sample, key=lambda r: r.lifetime_tokens)
    self.skipped = {}
    self.configs = self._configs()
    self.phase = {"prefill": {}, "decode": {}}
    self._estimates = {}
    self._attained: dict = {}  # (deployment, rate) -> attainment (`_attainment`)

  # --- configs and estimates -----------------------------------------------------------

  def _configs(self) -> list[tuple[int, int]]:
    spec, model = self.spec, self.spec.setup.model
    out = []
    for tp in spec.tp_options:
      for pp in spec.pp_options:
        name = f"tp{tp}pp{pp}"
        if tp * pp > spec.num_devices or tp > spec.devices_per_node:
          continue
        if model.num_layers % pp or model.num_kv_heads % tp:
          self.skipped[name] = "does not divide the model's layers or heads"
          continue
        try:
          cap = sim.kv_capacity_tokens(spec.setup, tp, pp)
          spec.setup.latency(tp, pp)
        except ValueError as e:
          self.skipped[name] = str(e)
          continue
        if cap < self.longest.lifetime_tokens:
          self.skipped[name] = (f"KV capacity {cap} tokens < longest request "
                                f"{self.longest.lifetime_tokens}")
          continue
        out.append((tp, pp))
    if not out:
      raise sim.DoesNotFit(f"no tp x pp config of {spec.setup.model.name} fits "
                           f"{spec.num_devices} {spec.setup.hardware.name}: {self.skipped}")
    return out

  def _instance(self, tp, pp, chunked=False):
    s = self.spec
    budget = s.chunked_max_step_tokens if chunked else s.max_step_tokens
    return deploy.InstanceSpec(tp, pp, min(s.max_batch, budget - 1) if chunked else s.max_batch,
                               budget, s.page_policy)

  def _estimate(self, phase, tp, pp) -> float:
    """Capacity of one instance for `phase` alone (requests/s) at mean lengths. A
    pipeline completes a batch per stage time; pp batches are in flight, each
    over 1/pp of the KV pool."""
    key = (phase, tp, pp)
    if key in self._estimates:
      return self._estimates[key]
    model = self.spec.setup.latency(tp, pp)
    if phase == "prefill":
      prompt = max(1.0, self.mean_prompt * self.computed_share)
      k = max(1, int(self.spec.max_step_tokens // prompt))
      est = k / model.prefill_totals(k, k * prompt,
                                     k * self.mean_sq_prompt * self.computed_share)
    else:
      ctx = self.mean_prompt + self.mean_out / 2
      cap = sim.kv_capacity_tokens(self.spec.setup, tp, pp) / pp
      most = max(1, min(self.spec.max_batch, int(cap // (self.mean_prompt + self.mean_out))))
      best = 0.0
      for b in range(1, most + 1):
        stage = model.decode_totals(b, int(b * ctx))
        if stage * pp > self.spec.tpot_slo:  # a token crosses every stage
          break
        best = b / stage
      est = best / max(self.mean_out - 1, 1)
    self._estimates[key] = est
    return est

  def _attainment(self, deployment, rate) -> float:
    """SLO attainment of `deployment` at `rate`, simulated once: a candidate checked
    at the best rate so far starts its bisection at that same rate."""
    key = (repr(deployment), rate)  # a repr names every field of a frozen deployment
    if key not in self._attained:
      s = self.spec
      res = sim.simulate(s.workload(rate), s.setup, deployment, s.ttft_slo, s.tpot_slo)
      self._attained[key] = res.attainment(s.ttft_slo, s.tpot_slo)
    return self._attained[key]

  def _attains(self, deployment, rate) -> bool:
    return self._attainment(deployment, rate) >= self.spec.target

  def _capacity(self, deployment) -> float:
    s = self.spec
    return search.saturation_throughput(s.workload(search.BURST_RATE), s.setup, deployment,
                                        s.ttft_slo, s.tpot_slo)

  def _goodput(self, deployment, capacity, floor=0.0) -> float:
    return search.goodput(self.spec.workload, self.spec.setup, deployment, self.spec.ttft_slo,
                       self.spec.tpot_slo, self.spec.target, lo=floor, hi=capacity,
                       tol=self.spec.tol,
                       attainment=lambda rate: self._attainment(deployment, rate))

  def _search(self, cands: list[Candidate], best: float = 0.0) -> list[Candidate]:
    """Finds the candidate with the best goodput per device.

    Candidates go best estimate per device first. One whose estimate is well below
    the best found so far is dropped unsimulated; the others get their capacity
    measured, and one whose capacity cannot beat the best is dropped. The rest are
    simulated at the best goodput per device so far (scaled to their devices) and
    bisected, between that rate and their capacity, only if they meet the SLOs
    there; otherwise they cannot win and keep no goodput. `best` starts the search
    at a goodput per device already found.
    """
    cands.sort(key=lambda c: -c.capacity / c.num_devices)
    for c in cands:
      floor = best * c.num_devices
      if c.capacity * _ESTIMATE_SLACK <= floor:
        c.note = "estimated capacity below the best"
        self.progress(c)
        continue
      c.capacity = self._capacity(c.deployment)
      c.measured = True
      if c.capacity <= floor:
        c.note = "capacity below the best"
      elif floor > 0 and not self._attains(c.deployment, floor):
        c.note = "misses the SLOs at the best rate"
      else:
        c.goodput = self._goodput(c.deployment, c.capacity, floor)
        best = max(best, c.per_device)
      self.progress(c)
    return cands

  def _phase_winners(self, phase, max_devices) -> list[tuple[float, int, int]]:
    """(goodput, tp, pp) of each config of at most `max_devices` that improved on the
    best goodput per device of `phase` alone, best last."""
    cands = [Candidate(phase, "alone", deploy.PhaseOnly(phase, self._instance(tp, pp)), tp * pp,
                       None, self._estimate(phase, tp, pp))
             for tp, pp in self.configs if tp * pp <= max_devices]
    self._search(cands)
    wins = [c for c in cands if c.goodput is not None and c.goodput > 0]
    for c in wins:
      self.phase[phase][(c.deployment.instance.tp, c.deployment.instance.pp)] = c.goodput
    return [(c.goodput, c.deployment.instance.tp, c.deployment.instance.pp) for c in wins]

  def _replicas(self, gp, dp, gd, dd) -> Optional[tuple[int, int]]:
    """Prefill and decode instance counts: enough for the target rate, or else the
    ratio with the best goodput per device that fits the cluster (None if none)."""
    s = self.spec
    if s.target_rate is not None:
      return (max(1, math.ceil(s.target_rate / gp)), max(1, math.ceil(s.target_rate / gd)))
    best, pick = -1.0, None
    for n in range(1, s.num_devices // dp + 1):
      for m in range(1, (s.num_devices - n * dp) // dd + 1):
        v = min(n * gp, m * gd) / (n * dp + m * dd)
        if v > best + 1e-12:
          best, pick = v, (n, m)
    return pick

  # --- modes ---------------------------------------------------------------------------

  def disaggregated_alg1(self) -> list[Candidate]:
    s = self.spec
    cands = []
    # Each phase leaves at least one device to the other.
    decode_wins = self._phase_winners("decode", s.num_devices - 1)
    for gp, ptp, ppp in self._phase_winners("prefill", s.num_devices - 1):
      for gd, dtp, dpp in decode_wins:
        counts = self._replicas(gp, ptp * ppp, gd, dtp * dpp)
        if counts is None:
          continue
        n, m = counts
        devices = n * ptp * ppp + m * dtp * dpp
        dep = deploy.Disaggregated(self._instance(ptp, ppp), self._instance(dtp, dpp), n, m,
                                same_node=devices <= s.devices_per_node)
        cands.append(Candidate("disaggregated", "alg1-high-affinity", dep, devices, None,
                               min(n * gp, m * gd)))
    return self._search(cands)

  def disaggregated_alg2(self) -> list[Candidate]:
    s = self.spec
    cands = []
    for pp in s.pp_options:
      if pp > s.num_nodes:
        continue
      for ptp in s.tp_options:
        for dtp in s.tp_options:
          if (ptp + dtp > s.devices_per_node
              or (ptp, pp) not in self.configs or (dtp, pp) not in self.configs):
            continue
          est = min(self._estimate("prefill", ptp, pp), self._estimate("decode", dtp, pp))
          dep = deploy.Disaggregated(self._instance(ptp, pp), self._instance(dtp, pp), 1, 1,
                                  same_node=True)
          cands.append(Candidate("disaggregated", "alg2-low-affinity", dep,
                                 (ptp + dtp) * pp, None, est))
    return self._search(cands)

  def conditional(self, dis: list[Candidate]) -> list[Candidate]:
    """The best of `dis` (disaggregated candidates) with each conditional threshold;
    its decode instances then take chunked steps, as colocated chunked prefill."""
    thresholds = [t for t in self.spec.conditional_thresholds if t > 0]
    top = max((c for c in dis if c.goodput is not None), key=lambda c: c.per_device,
              default=None)
    if top is None or not thresholds:
      return []
    d = top.deployment
    decode = self._instance(d.decode.tp, d.decode.pp, chunked=True)
    cands = [Candidate("disaggregated", "conditional", dataclasses.replace(
        d, decode=decode, conditional_threshold=t), top.num_devices, None, top.capacity,
        f"prefill on decode at <= {t} uncached tokens") for t in thresholds]
    return self._search(cands)

  def disaggregated_variants(self, cands: list[Candidate]) -> list[Candidate]:
    """The best of `cands` of each algorithm with layer-wise KV streaming, and the
    best of all with elastic roles, as the spec asks; each must beat its original."""
    s, out = self.spec, []
    kept = [c for c in cands if c.goodput is not None]
    if s.layer_groups:
      for algorithm in dict.fromkeys(c.algorithm for c in kept):
        top = max((c for c in kept if c.algorithm == algorithm), key=lambda c: c.per_device)
        dep = dataclasses.replace(top.deployment, kv_transfer="layerwise",
                                  layer_groups=s.layer_groups)
        try:
          dep.check()
          dep.check_layers(s.setup.model.num_layers)
        except ValueError as e:
          self.skipped[f"{top.describe()}, layerwise"] = str(e)
          continue
        out.append(Candidate("disaggregated", f"{algorithm}+layerwise", dep,
                             top.num_devices, None, top.capacity))
    if s.elastic is not None and kept:
      top = max(kept, key=lambda c: c.per_device)
      dep = dataclasses.replace(top.deployment, elastic=s.elastic)
      try:
        dep.check()
        out.append(Candidate("disaggregated", "elastic", dep, top.num_devices, None,
                             top.capacity, "roles move online (RoleController)"))
      except ValueError as e:
        self.skipped[f"{top.describe()}, elastic"] = str(e)
    best = max((c.per_device for c in kept), default=0.0)
    # Each is tried from the best per device so far, as a candidate of its mode.
    return self._search(out, best * (1 - self.spec.tol)) if out else []

  def _combined(self, mode, algorithm, make, configs) -> list[Candidate]:
    # Both phases spend the same devices' time, so their capacities combine
    # harmonically: a request costs 1/prefill + 1/decode of a second.
    def shared(tp, pp):
      p, d = self._estimate("prefill", tp, pp), self._estimate("decode", tp, pp)
      return p * d / (p + d) if p > 0 and d > 0 else 0.0

    return [Candidate(mode, algorithm, make(tp, pp), tp * pp, None, shared(tp, pp))
            for tp, pp in configs]

  def colocated(self, policies: Sequence[str] = deploy.POLICIES) -> list[Candidate]:
    cands = []
    for policy in policies:
      cands += self._combined(f"colocated_{policy}", policy, lambda tp, pp: deploy.Colocated(
          self._instance(tp, pp, chunked=policy == "chunked"), 1, policy), self.configs)
    return self._search(cands)

  def semi_pd(self) -> list[Candidate]:
    """Configs at the grid's middle share, then every share on the best config,
    then the online partitioner from the best share."""
    s = self.spec
    configs = [(tp, pp) for tp, pp in self.configs if pp == 1]
    mid = s.semi_pd_shares[len(s.semi_pd_shares) // 2]
    make = lambda x: (lambda tp, pp: deploy.SemiPD(
        self._instance(tp, pp), 1, x, concurrent=s.semi_pd_concurrent,
        prefill_scaling=s.semi_pd_scaling[0], decode_scaling=s.semi_pd_scaling[1]))
    cands = self._search(self._combined("semi_pd", "fixed-share", make(mid), configs))
    top = max((c for c in cands if c.goodput is not None), key=lambda c: c.per_device,
              default=None)
    if top is None:
      return cands
    inst = top.deployment.instance
    shares = [Candidate("semi_pd", "fixed-share",
                        dataclasses.replace(top.deployment, prefill_share=x),
                        top.num_devices, None, top.capacity)
              for x in s.semi_pd_shares if x != mid]
    cands += self._search(shares, top.per_device)
    top = max((c for c in cands if c.goodput is not None), key=lambda c: c.per_device)
    dyn = dataclasses.replace(top.deployment, partitioner=s.partitioner)
    cands.append(Candidate("semi_pd", "dynamic", dyn, top.num_devices,
                           self._goodput(dyn, top.capacity, top.goodput / 2), top.capacity,
                           f"SloPartitioner online, {inst.tp}x tp"))
    self.progress(cands[-1])
    return cands


def plan(spec: PlanSpec, modes: Sequence[str] = deploy.MODES,
         progress: Optional[Callable[[Candidate], None]] = None) -> Plan:
  """Searches placements for `modes` (names of `deploy.MODES`); returns them ranked by
  goodput per device. `progress(candidate)` is called as each candidate is decided
  (simulated or pruned)."""
  bad = [m for m in modes if m not in deploy.MODES]
  if bad:
    raise ValueError(f"unknown mode(s) {bad}; known: {deploy.MODES}")
  policies = [p for p in deploy.POLICIES if f"colocated_{p}" in modes]
  p = _Planner(spec, progress)
  cands = []
  if "disaggregated" in modes:
    dis = p.disaggregated_alg1() + p.disaggregated_alg2()
    cands += dis + p.disaggregated_variants(dis) + p.conditional(dis)
  if "semi_pd" in modes:
    cands += p.semi_pd()
  for policy in policies:  # each its own search, so each policy has a best
    cands += p.colocated([policy])
  if spec.max_spread is not None:
    _over_seeds(spec, [c for c in cands if c.goodput is not None])
  tied = _rank(spec, cands)
  phase = {ph: {f"tp{tp}pp{pp}": g for (tp, pp), g in sorted(v.items())}
           for ph, v in p.phase.items()}
  devices = {f"tp{tp}pp{pp}": tp * pp for tp, pp in p.configs}
  return Plan(cands, phase, p.skipped, devices, tied)


def _rank(spec: PlanSpec, cands: list[Candidate]) -> list[Candidate]:
  """Sorts `cands` best first; while candidates measured over seeds overlap the
  top one's interval, gives the top and them one more seed each (up to
  `max_tie_seeds`) and sorts again. Returns the top and those still overlapping
  it (empty when none does)."""
  bound = spec.max_tie_seeds or 2 * spec.max_seeds
  while True:
    cands.sort(key=lambda c: (c.goodput is None, -(c.per_device or 0.0),
                              -c.capacity / c.num_devices))
    top = cands[0] if cands and cands[0].estimate is not None else None
    if top is None:
      return []
    best = top.estimate.scaled(1 / top.num_devices)
    for c in cands[1:]:
      c.overlaps_best = c.estimate is not None and c.estimate.scaled(
          1 / c.num_devices).overlaps(best)
    tied = [top] + [c for c in cands[1:] if c.overlaps_best]
    short = [c for c in tied if len(c.estimate.seeds) < bound]
    if len(tied) == 1 or not short:
      return tied if len(tied) > 1 else []
    for c in short:  # one more seed each, then rank again
      seed = c.estimate.seeds[-1] + 1
      more = search.goodput(lambda rate: spec.workload(rate, seed), spec.setup, c.deployment,
                            spec.ttft_slo, spec.tpot_slo, spec.target, tol=spec.tol)
      c.estimate = search.Estimate(c.estimate.values + (more,), c.estimate.seeds + (seed,))
      c.goodput = c.estimate.mean


def _over_seeds(spec: PlanSpec, cands: list[Candidate]) -> None:
  """Measures each candidate's goodput over workload seeds; its mean becomes the
  candidate's goodput."""
  for c in cands:
    c.estimate = search.goodput_over_seeds(
        spec.workload, spec.setup, c.deployment, spec.ttft_slo, spec.tpot_slo, spec.target,
        spec.tol, min_seeds=spec.min_seeds, max_seeds=spec.max_seeds,
        max_spread=spec.max_spread)
    c.goodput = c.estimate.mean
