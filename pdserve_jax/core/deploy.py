"""Deployments: which instances serve, with what parallelism and batch limits.

One type per mode, shared by `Engine`, the simulator and the planner: the planner
ranks deployments, the simulator runs them on a latency model, and
`Engine(model, deployment)` serves the same one with real programs. Runtime-only
knobs (page size, pool size, shape buckets, attention kernels) live in the
engine's `EngineConfig`, and hardware and latency in the simulator's `Setup`.

No JAX here; whether the engine can run a deployment on the devices present is
`serving.config.check_servable`'s question (it refuses pipeline stages and SM partitioning).
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Union

from pdserve_jax.core.elastic import ElasticConfig
from pdserve_jax.core.policies import PAGE_POLICIES, check_page_policy
from pdserve_jax.core.share import (ModelPartitionerConfig, PartitionerConfig, ShareScaling,
                                   SmShares)

POLICIES = ("prefill_first", "chunked")
# How a coordinator places an arrival among instances of one kind (`core.coordinator`):
# "cache_aware" (the default) by the prefill backlog score when some instance holds
# part of the prompt in its prefix cache, else least loaded; "least_loaded" always
# by queued + running requests.
ROUTINGS = ("cache_aware", "least_loaded")
# The one mode vocabulary: every app, config, result file and the planner use these
# names, and `deployment.mode` gives a deployment's.
MODES = ("colocated_prefill_first", "colocated_chunked", "disaggregated", "semi_pd")
COLOCATED = MODES[:2]
# How a disaggregated prefill's KV reaches the decode side: copied whole once the
# prefill has finished, or streamed layer group by layer group while it runs.
KV_TRANSFERS = ("whole", "layerwise")


def _positive_int(name: str, value) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f"{name} must be an int >= 1, got {value!r}")


@dataclasses.dataclass(frozen=True)
class InstanceSpec:
  """One instance: `tp` x `pp` devices, a batch cap, a per-step token budget
  (prompt tokens for prefill-first and prefill instances, all tokens for chunked
  prefill), a page policy ("on_demand" or "reserve", see `core.policies`) and an
  optional cap on the tokens a decode step attends over (`max_decode_tokens`,
  prefill-first and decode schedulers; DistServe's simulator hard-codes 50,000).
  `layer_groups`: its layers run as this many programs in a row, equal groups on
  the pipeline stages' devices (1: one program per stage); a disaggregated
  deployment that streams KV layer by layer sets it on the instances that prefill
  (`Disaggregated.instance_specs`), so each group's KV can leave once written."""
  tp: int = 1
  pp: int = 1
  max_batch: int = 256
  max_step_tokens: int = 4096
  page_policy: str = "on_demand"
  layer_groups: int = 1
  max_decode_tokens: Optional[int] = None

  @property
  def num_devices(self) -> int:
    return self.tp * self.pp

  def check(self, what: str = "instance") -> None:
    for f in ("tp", "pp", "max_batch", "max_step_tokens", "layer_groups"):
      _positive_int(f"{what}.{f}", getattr(self, f))
    if self.max_decode_tokens is not None:
      _positive_int(f"{what}.max_decode_tokens", self.max_decode_tokens)
    check_page_policy(self.page_policy)
    if self.layer_groups > 1 and self.layer_groups % self.pp:
      raise ValueError(f"{what}.layer_groups={self.layer_groups} must be a multiple of "
                       f"pp={self.pp} (each pipeline stage runs an equal number of groups)")

  def check_layers(self, num_layers: int, what: str = "instance") -> None:
    """Raises ValueError when a model of `num_layers` layers does not split into this
    instance's pipeline stages and layer groups."""
    if num_layers % self.pp:
      raise ValueError(f"{what}: pp={self.pp} does not divide the model's {num_layers} "
                       "layers into equal pipeline stages")
    if num_layers % self.layer_groups:
      raise ValueError(f"{what}: layer_groups={self.layer_groups} does not divide the "
                       f"model's {num_layers} layers into equal groups")

  def describe(self) -> str:
    return f"tp{self.tp}pp{self.pp}"


def _check_routing(routing) -> None:
  if routing not in ROUTINGS:
    raise ValueError(f"routing must be one of {ROUTINGS}, got {routing!r}")


class _Replicas:
  """Shared by the deployments made of `replicas` copies of one `instance`."""
  instance: InstanceSpec
  replicas: int

  @property
  def num_devices(self) -> int:
    return self.replicas * self.instance.num_devices

  def _check_replicas(self) -> None:
    self.instance.check()
    _positive_int("replicas", self.replicas)
    _check_routing(getattr(self, "routing", ROUTINGS[0]))


@dataclasses.dataclass(frozen=True)
class Colocated(_Replicas):
  """`replicas` instances, each serving both phases with one `policy`; arrivals
  placed by `routing` (`ROUTINGS`)."""
  instance: InstanceSpec = InstanceSpec()
  replicas: int = 1
  policy: str = "prefill_first"
  routing: str = "cache_aware"

  @property
  def mode(self) -> str:
    return f"colocated_{self.policy}"

  def check(self) -> None:
    self._check_replicas()
    if self.policy not in POLICIES:
      raise ValueError(f"colocated policy must be one of {POLICIES}, got {self.policy!r}")
    if self.policy == "chunked" and self.instance.max_step_tokens < self.instance.max_batch + 1:
      raise ValueError(f"chunked prefill needs max_step_tokens "
                       f"({self.instance.max_step_tokens}) > "
                       f"max_batch ({self.instance.max_batch})")

  def describe(self) -> str:
    return f"{self.replicas}x {self.instance.describe()} {self.policy}"


@dataclasses.dataclass(frozen=True)
class Disaggregated:
  """`num_prefill` prefill instances and `num_decode` decode instances (DistServe).
  `same_node`: KV moves over the node link, else over the network.

  `kv_transfer`: "whole" copies a request's KV once its prefill finished and a
  decode instance has room; "layerwise" (Mooncake's, and vLLM's and LMCache's
  per-layer connectors') picks the decode instance when the prefill starts and
  streams each of `layer_groups` groups of layers as soon as the prefill wrote it,
  overlapping the copy with the later layers. It is a deployment's property, not an
  engine knob, because it changes what the simulator and planner must model (when
  the decode side's pages are taken, when the copy ends) and the planner chooses it.

  `elastic`: instances may change role at run time, driven by a `RoleController`
  with these knobs (`core.elastic`, `core.roles`); each then holds the programs of
  both phases. None: the prefill:decode split is fixed.

  Prefix caching: `routing` places arrivals among prefill instances (`ROUTINGS`).
  `decode_cache`: decode instances keep a prefix cache of the prompts handed to
  them, and a hand-off (whole, streamed or migrated) moves only the pages the
  decode side lacks; an elastic group keeps one pool and its cache in either role,
  so it needs `decode_cache`. `conditional_threshold` (conditional disaggregation,
  as Dynamo and llm-d do; 0: off): a request whose uncached prompt tokens on the
  decode instance it would join are at most this many is prefilled there, as chunks
  of that instance's steps (`decode.max_step_tokens` a step), with no prefill
  instance and no KV copy.

  The prefix-cache fields come last so that positional calls written before them
  keep their meaning.
  """
  prefill: InstanceSpec = InstanceSpec()
  decode: InstanceSpec = InstanceSpec()
  num_prefill: int = 1
  num_decode: int = 1
  same_node: bool = True
  kv_transfer: str = "whole"
  layer_groups: int = 2
  elastic: Optional[ElasticConfig] = None
  routing: str = "cache_aware"
  decode_cache: bool = True
  conditional_threshold: int = 0

  mode = "disaggregated"

  @property
  def streams_kv(self) -> bool:
    return self.kv_transfer == "layerwise"

  def instance_specs(self) -> tuple[InstanceSpec, InstanceSpec]:
    """The (prefill, decode) instances as built: with layer-wise streaming, every
    instance that may prefill (each one, when elastic) runs `layer_groups` programs."""
    if not self.streams_kv:
      return self.prefill, self.decode
    grouped = lambda s: dataclasses.replace(s, layer_groups=self.layer_groups)
    return grouped(self.prefill), grouped(self.decode) if self.elastic else self.decode

  @property
  def num_devices(self) -> int:
    return (self.num_prefill * self.prefill.num_devices
            + self.num_decode * self.decode.num_devices)

  def check(self) -> None:
    _positive_int("num_prefill", self.num_prefill)
    _positive_int("num_decode", self.num_decode)
    _check_routing(self.routing)
    t = self.conditional_threshold
    if isinstance(t, bool) or not isinstance(t, int) or t < 0:
      raise ValueError(f"conditional_threshold must be an int >= 0, got {t!r}")
    if t and self.decode.max_step_tokens < self.decode.max_batch + 1:
      raise ValueError(f"conditional disaggregation prefills on decode instances: "
                       f"decode.max_step_tokens ({self.decode.max_step_tokens}) must "
                       f"exceed decode.max_batch ({self.decode.max_batch})")
    if self.kv_transfer not in KV_TRANSFERS:
      raise ValueError(f"kv_transfer must be one of {KV_TRANSFERS}, got {self.kv_transfer!r}")
    _positive_int("layer_groups", self.layer_groups)
    if self.elastic is not None:
      self.elastic.check()
      if self.num_prefill + self.num_decode < self.elastic.min_prefill + self.elastic.min_decode:
        raise ValueError(f"an elastic deployment of {self.num_prefill + self.num_decode} "
                         f"instances cannot keep min_prefill={self.elastic.min_prefill} and "
                         f"min_decode={self.elastic.min_decode}")
      if not self.decode_cache:
        # The cache belongs to a pool, and an elastic group's one pool serves both
        # roles: it cannot be cached for prefill and not for decode.
        raise ValueError("decode_cache=False does not combine with elastic roles: a "
                         "group keeps one KV pool, and its prefix cache, in either role")
    p, d = self.instance_specs()
    p.check("prefill")
    d.check("decode")

  def check_layers(self, num_layers: int) -> None:
    """Raises ValueError when a model of `num_layers` layers does not split into the
    instances' pipeline stages and layer groups."""
    p, d = self.instance_specs()
    p.check_layers(num_layers, "prefill")
    d.check_layers(num_layers, "decode")

  def describe(self) -> str:
    return (f"{self.num_prefill}x prefill {self.prefill.describe()} + {self.num_decode}x "
            f"decode {self.decode.describe()}" + ("" if self.same_node else
                                                  ", KV over network")
            + (f", KV layerwise x{self.layer_groups}" if self.streams_kv else "")
            + (", elastic" if self.elastic is not None else "")
            + (f", local prefill <= {self.conditional_threshold} uncached"
               if self.conditional_threshold else "")
            + ("" if self.decode_cache else ", no decode cache"))


@dataclasses.dataclass(frozen=True)
class SemiPD(_Replicas):
  """semi-PD replicas: one weight copy and one KV pool per replica, prefill and
  decode sharing its compute.

  `prefill_share` and `decode_share` are the SM ratios (x, y) of semi-PD's paper;
  `decode_share=None` means 1 - x. Time-shared (what the engine runs), the device's
  time is split x' : y' = x / (x + y) : y / (x + y). With `concurrent` (true SM
  partitioning, simulator only) both phases run at once under MPS-style caps x
  and y, which may add up to more than 1 (`SmShares`: contention beyond the
  device, `work_conserving` to give a phase running alone the whole device), each
  step slowed by its `ShareScaling` at the share it gets. `partitioner` moves the
  split online: a `PartitionerConfig` (ours, `SloPartitioner`) or a
  `ModelPartitionerConfig` (the paper's Algorithm 1, `ModelPartitioner`)."""
  instance: InstanceSpec = InstanceSpec()
  replicas: int = 1
  prefill_share: float = 0.5
  partitioner: Union[PartitionerConfig, ModelPartitionerConfig, None] = None
  concurrent: bool = False
  prefill_scaling: ShareScaling = ShareScaling()
  decode_scaling: ShareScaling = ShareScaling()
  decode_share: Optional[float] = None
  work_conserving: bool = False
  routing: str = "cache_aware"

  mode = "semi_pd"

  @property
  def caps(self) -> tuple[float, float]:
    """(x, y): the prefill and decode SM ratios."""
    x = self.prefill_share
    return x, (1.0 - x if self.decode_share is None else self.decode_share)

  def check(self) -> None:
    self._check_replicas()
    x, y = self.prefill_share, self.decode_share
    if y is None:
      if not 0 < x < 1:
        raise ValueError(f"prefill_share must lie strictly between 0 and 1, got {x}")
    else:
      SmShares(x, y)  # each in (0, 1]; x + y may exceed 1
    if self.instance.pp != 1:
      raise ValueError("semi-PD time-shares one mesh; pipeline stages (pp > 1) are not "
                       "modelled for it")
    if self.partitioner is not None:
      if not isinstance(self.partitioner, (PartitionerConfig, ModelPartitionerConfig)):
        raise ValueError(f"partitioner must be a PartitionerConfig or a "
                         f"ModelPartitionerConfig, got {self.partitioner!r}")
      self.partitioner.check()
    if self.work_conserving and not self.concurrent:
      raise ValueError("work_conserving applies to SM partitioning (concurrent=True); a "
                       "time-shared device already gives a phase running alone all of it")

  def describe(self) -> str:
    how = ("dynamic (paper) from" if isinstance(self.partitioner, ModelPartitionerConfig)
           else "dynamic from" if self.partitioner else "share")
    x, y = self.caps
    split = f"x={x:.2f}" if self.decode_share is None else f"(x, y)=({x:.2f}, {y:.2f})"
    sm = (" SM caps" + (", work-conserving" if self.work_conserving else "")
          if self.concurrent else "")
    return f"{self.replicas}x {self.instance.describe()} {how} {split}{sm}"


@dataclasses.dataclass(frozen=True)
class PhaseOnly(_Replicas):
  """`replicas` instances of one phase alone, as DistServe's planner measures them:
  prefill with an infinitely fast decode side (TTFT only), or decode with requests
  arriving prefilled (TPOT only). The simulator's alone."""
  phase: str  # "prefill" or "decode"
  instance: InstanceSpec = InstanceSpec()
  replicas: int = 1

  mode = "phase_only"

  def check(self) -> None:
    if self.phase not in ("prefill", "decode"):
      raise ValueError(f"phase must be 'prefill' or 'decode', got {self.phase!r}")
    self._check_replicas()

  def describe(self) -> str:
    return f"{self.replicas}x {self.phase} {self.instance.describe()}"


Deployment = Union[Colocated, Disaggregated, SemiPD, PhaseOnly]


__all__ = ["InstanceSpec", "Colocated", "Disaggregated", "SemiPD", "PhaseOnly",
           "PartitionerConfig", "ModelPartitionerConfig", "ShareScaling", "SmShares",
           "ElasticConfig", "PAGE_POLICIES", "POLICIES", "MODES", "COLOCATED", "KV_TRANSFERS",
           "ROUTINGS"]
