"""Mode names and the deployment blocks of a config, shared by every app.

One scheme everywhere: `colocated_prefill_first`, `colocated_chunked`,
`disaggregated` and `semi_pd`. A config's `instance`, `disaggregated` and
`semi_pd` blocks (built by `blocks()`, with `pdserve_jax.core.deploy`'s defaults) give
each mode its deployment; `serve`, `simulate` and `sweep` build one per listed
mode, `plan` searches tp, pp, replicas and shares itself and reads only the batch
limits, page policy and semi-PD knobs. No JAX here.
"""

from __future__ import annotations

import dataclasses

import ml_collections

from pdserve_jax.core import deploy
from pdserve_jax.cli import common
from pdserve_jax.core.elastic import ElasticConfig
from pdserve_jax.core.share import (PAPER_DECODE_STEP, PAPER_PREFILL_STEP,
                                   ModelPartitionerConfig, PartitionerConfig, ShareScaling)

MODES = deploy.MODES

_DEFAULTS = dict(
    # Every instance's batch limits and page policy. Colocated and semi-PD run
    # `replicas` instances of `tp` x `pp` devices; a prefill-first step takes up to
    # `max_step_tokens` prompt tokens, a chunked step `chunked_max_step_tokens` tokens in all.
    # `routing` places arrivals among instances of a kind: "cache_aware" or
    # "least_loaded" (`core.coordinator`).
    instance=dict(tp=1, pp=1, replicas=1, max_batch=256, max_step_tokens=4096,
                  chunked_max_step_tokens=512, page_policy="on_demand",
                  routing="cache_aware"),
    # Prefill and decode instances of the `instance` limits with their own tp x pp;
    # `same_node`: KV moves over the node link, else the network (simulator only).
    # `kv_transfer`: "whole" or "layerwise" (streamed in `layer_groups` groups during
    # the prefill); `elastic`: instances change role online, by `elastic_controller`.
    # `decode_cache`: decode instances keep a prefix cache and hand-offs move only the
    # pages they lack; `conditional_threshold` > 0: prompts with at most that many
    # uncached tokens are prefilled on their decode instance (conditional
    # disaggregation; its steps take `chunked_max_step_tokens` tokens).
    disaggregated=dict(num_prefill=1, prefill_tp=1, prefill_pp=1, num_decode=1,
                       decode_tp=1, decode_pp=1, same_node=True, kv_transfer="whole",
                       layer_groups=2, elastic=False,
                       elastic_controller=dataclasses.asdict(ElasticConfig()),
                       decode_cache=True, conditional_threshold=0),
    # The SM ratios (x, y): `prefill_share` and `decode_share` (0: 1 - x); `dynamic`
    # moves them online, by `algorithm` "ours" (`partitioner`, the SloPartitioner) or
    # "paper" (`model_partitioner`, semi-PD's Algorithm 1). `concurrent` (simulator
    # only) models SM partitioning under caps x and y (which may add up to more
    # than 1; `work_conserving`: a phase alone takes the whole device), each phase
    # slowed by its ShareScaling: (alpha, beta) or "paper" (semi-PD's Figure 10).
    semi_pd=dict(prefill_share=0.5, decode_share=0.0, dynamic=False, algorithm="ours",
                 concurrent=False, work_conserving=False,
                 prefill_scaling=(1.0, 0.0), decode_scaling=(1.0, 0.0),
                 partitioner=dataclasses.asdict(PartitionerConfig()),
                 model_partitioner=dataclasses.asdict(ModelPartitionerConfig())),
)
ALGORITHMS = ("ours", "paper")


def blocks(**overrides) -> dict:
  """{"instance", "disaggregated", "semi_pd"} blocks as ConfigDicts: the defaults,
  each block updated by `overrides[name]` (a dict; `semi_pd.partitioner` too)."""
  out = {}
  for name, default in _DEFAULTS.items():
    given = dict(overrides.pop(name, {}))
    for key in given:
      if key not in default and common.renamed(f"{name}.{key}"):
        raise ValueError(f"config key {name}.{key} was renamed {common.renamed(f'{name}.{key}')}")
    unknown = sorted(set(given) - set(default))
    if unknown:
      raise ValueError(f"unknown {name} key(s) {unknown}; known: {sorted(default)}")
    block = dict(default, **given)
    if name == "semi_pd":
      for sub in ("partitioner", "model_partitioner"):
        block[sub] = dict(default[sub], **given.get(sub, {}))
    if name == "disaggregated":
      block["elastic_controller"] = dict(default["elastic_controller"],
                                         **given.get("elastic_controller", {}))
    out[name] = ml_collections.ConfigDict(block)
  if overrides:
    raise ValueError(f"unknown block(s) {sorted(overrides)}; known: {sorted(_DEFAULTS)}")
  return out


_POS = common.at_least(1)
RULES = {
    **{f"instance.{k}": _POS for k in ("tp", "pp", "replicas", "max_batch", "max_step_tokens")},
    "instance.chunked_max_step_tokens": common.at_least(2),
    "instance.page_policy": common.one_of(*deploy.PAGE_POLICIES),
    "instance.routing": common.one_of(*deploy.ROUTINGS),
    "disaggregated.conditional_threshold": common.at_least(0),
    **{f"disaggregated.{k}": _POS for k in ("num_prefill", "prefill_tp", "prefill_pp",
                                            "num_decode", "decode_tp", "decode_pp",
                                            "layer_groups")},
    "disaggregated.kv_transfer": common.one_of(*deploy.KV_TRANSFERS),
    "semi_pd.algorithm": common.one_of(*ALGORITHMS),
}  # semi_pd's shares and partitioners: `deployment` and `partitioner` check them;
# disaggregated.elastic_controller: its `check` does


def modes(cfg, key: str = "modes") -> tuple[str, ...]:
  """The config's mode names, checked."""
  out = common.names(key, cfg[key])
  for m in out:
    if m not in MODES:
      raise common.ConfigError(f"{key}: unknown mode {m!r}; known: {', '.join(MODES)}")
  return out


def _scaling(cfg, key) -> ShareScaling:
  if cfg.semi_pd[key] == "paper":
    return PAPER_PREFILL_STEP if key == "prefill_scaling" else PAPER_DECODE_STEP
  pair = common.numbers(f"semi_pd.{key}", cfg.semi_pd[key], low=0.0, strict=False)
  if len(pair) != 2:
    raise common.ConfigError(f"semi_pd.{key}: expected (alpha, beta), got {pair}")
  return ShareScaling(*pair)


def deployment(cfg, mode: str) -> deploy.Deployment:
  """`mode`'s deployment from the config's blocks (see the module docstring)."""
  common.check(cfg, RULES)
  i = cfg.instance

  def spec(tp, pp, max_step_tokens=i.max_step_tokens, max_batch=i.max_batch):
    return deploy.InstanceSpec(tp, pp, max_batch, max_step_tokens, i.page_policy)

  # A chunked step holds at most chunked_max_step_tokens - 1 decodes, leaving a prompt token.
  budget = i.chunked_max_step_tokens
  routing = i.get("routing", "cache_aware")
  if mode == "colocated_prefill_first":
    dep = deploy.Colocated(spec(i.tp, i.pp), i.replicas, "prefill_first", routing)
  elif mode == "colocated_chunked":
    dep = deploy.Colocated(spec(i.tp, i.pp, budget, min(i.max_batch, budget - 1)), i.replicas,
                           "chunked", routing)
  elif mode == "disaggregated":
    d = cfg.disaggregated
    threshold = d.get("conditional_threshold", 0)
    # Decode instances that prefill prompts chunk them as colocated chunked steps do.
    decode = spec(d.decode_tp, d.decode_pp, budget, min(i.max_batch, budget - 1)) \
        if threshold else spec(d.decode_tp, d.decode_pp)
    elastic = _checked("disaggregated.elastic_controller",
                       ElasticConfig(**d.elastic_controller.to_dict())) if d.elastic else None
    dep = deploy.Disaggregated(spec(d.prefill_tp, d.prefill_pp), decode, d.num_prefill,
                               d.num_decode, d.same_node, d.kv_transfer, d.layer_groups,
                               elastic, routing=routing,
                               decode_cache=d.get("decode_cache", True),
                               conditional_threshold=threshold)
  elif mode == "semi_pd":
    s = cfg.semi_pd
    part = partitioner(cfg) if s.dynamic else None
    dep = deploy.SemiPD(spec(i.tp, i.pp), i.replicas, s.prefill_share, part, s.concurrent,
                        _scaling(cfg, "prefill_scaling"), _scaling(cfg, "decode_scaling"),
                        s.get("decode_share", 0.0) or None, s.get("work_conserving", False),
                        routing)
  else:
    raise common.ConfigError(f"modes: unknown mode {mode!r}; known: {', '.join(MODES)}")
  return _checked(f"modes: {mode}", dep)


def partitioner(cfg):
  """The semi-PD partitioner `config.semi_pd.algorithm` names: ours
  (`semi_pd.partitioner`) or the paper's (`semi_pd.model_partitioner`), checked."""
  s = cfg.semi_pd
  if s.get("algorithm", "ours") == "paper":
    return _checked("semi_pd.model_partitioner",
                    ModelPartitionerConfig(**s.model_partitioner.to_dict()))
  return _checked("semi_pd.partitioner", PartitionerConfig(**s.partitioner.to_dict()))


def _checked(key: str, obj):
  """`obj` after its `check()`, whose ValueError becomes a ConfigError naming `key`."""
  try:
    obj.check()
  except ValueError as e:
    raise common.ConfigError(f"{key}: {e}") from None
  return obj
