"""Latency models: how long one instance takes for one scheduler step.

Three families behind one interface (`LatencyModel`, in `base`), one module each:
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
  * `TpuCostLatencyModel` (`tpu_cost`): XLA's flops, bytes and collectives of
    this library's programs compiled for TPU (`runtime.cost`, `cli.tpu_cost`),
    per tp and bucket, over a chip's peaks at named efficiencies; attention
    added from each step's contexts. Any pp; only the tp the table compiled.
  * `WithOverheads` (`overheads`): any of them plus a serving system's per-step
    costs (`StepOverheads`; `DISTSERVE` is what DistServe's simulator adds).
  * `ShareScaling`: semi-PD's slowdown of a phase given a share s of the device's
    compute, t_100 * (alpha / s + beta).

Pipeline parallelism follows DistServe's convention: an instance with `pp` stages
is a full pipeline, so an iteration costs one stage's time (the whole time / pp).
This models throughput, not the extra latency of a request crossing every stage.
Times are seconds. Knows nothing of arrays; reads `Step` shapes only.
"""

from __future__ import annotations

import json
from typing import Callable

from pdserve_jax.model.config import ModelConfig
from pdserve_jax.core.share import ShareScaling
from pdserve_jax.sim.hardware import HardwareSpec
from pdserve_jax.sim.latency.base import LatencyModel, transfer_time
from pdserve_jax.sim.latency.overheads import (NONE as NO_OVERHEADS, StepOverheads,
                                               WithOverheads, get_overheads)
from pdserve_jax.sim.latency.polynomial import (A100_SYSTEMS, DISTSERVE_MODELS,
                                                PolynomialLatencyModel, distserve_a100,
                                                fit_polynomial, load_distserve_json)
from pdserve_jax.sim.latency.roofline import RooflineLatencyModel
from pdserve_jax.sim.latency.shape_table import ShapeTableLatencyModel
from pdserve_jax.sim.latency.tpu_cost import (KIND as TPU_COST_KIND, TpuCostLatencyModel,
                                              load_table)


def latency_source(kind: str, model: ModelConfig, hardware: HardwareSpec,
                   overheads="none", **roofline_kw) -> Callable[[int, int], LatencyModel]:
  """A (tp, pp) -> LatencyModel factory, as the simulator and planner take.

  Args:
    kind: "distserve" (DistServe's A100-80GB figures of its own engine, OPT-13B/66B
      only), "vllm" (DistServe's figures for vLLM, its colocated baseline),
      "roofline" (analytic, any model and hardware), or the path of a profiled
      JSON: a polynomial (`PolynomialLatencyModel.save`), which describes the tp it
      was profiled at and is returned for every tp (so plan with that tp alone), pp
      dividing its times DistServe's way; a shape table
      (`ShapeTableLatencyModel.save`), for the one instance it measured (pp = 1);
      or a TPU cost table (`cli.tpu_cost`), for the tp it compiled, any pp.
    model, hardware: what runs.
    overheads: per-step serving costs added to every step: "none", "distserve"
      (what DistServe's simulator adds, to reproduce its paper), "vllm" (vLLM's
      published CPU time per iteration and per request) or a `StepOverheads`.
    roofline_kw: efficiency factors of `RooflineLatencyModel`, or of
      `TpuCostLatencyModel` with a TPU cost table.

  The factory's `parameters` attribute, when it has one, names the factors a
  model applies (printed with a plan).
  """
  base = _base_source(kind, model, hardware, **roofline_kw)
  extra = get_overheads(overheads)
  if extra == NO_OVERHEADS:
    return base
  wrapped = lambda tp, pp: WithOverheads(base(tp, pp), extra, pp)
  if hasattr(base, "parameters"):
    wrapped.parameters = base.parameters
  return wrapped


def _base_source(kind, model, hardware, **roofline_kw):
  if kind in A100_SYSTEMS:
    known = DISTSERVE_MODELS
    if model.name not in known or hardware.name != "a100-80gb":
      raise ValueError(f"DistServe's figures cover {known} on a100-80gb, not "
                       f"{model.name} on {hardware.name}; use 'roofline' or a fitted JSON")
    return lambda tp, pp: distserve_a100(model.name, tp, pp, system=kind)
  if kind == "roofline":
    return lambda tp, pp: RooflineLatencyModel(model, hardware, tp, pp, **roofline_kw)
  with open(kind) as f:
    text = f.read()
  kind_of = json.loads(text).get("kind")
  if kind_of == TPU_COST_KIND:
    table = load_table(text)

    def compiled(tp, pp):
      return TpuCostLatencyModel(table, model, hardware, tp, pp, **roofline_kw)
    compiled.parameters = dict(TpuCostLatencyModel(
        table, model, hardware, int(min(table["tp"], key=int)), 1,
        **roofline_kw).parameters(), table=kind, compiled_for=table["device_kind"])
    return compiled
  if kind_of == "shape_table":
    table = ShapeTableLatencyModel.from_json(text)

    def measured(tp, pp):
      if pp != 1:
        raise ValueError(f"{kind} measured one instance without pipeline stages; pp={pp}")
      return table
    return measured
  fitted = PolynomialLatencyModel.from_json(text)
  return lambda tp, pp: fitted.with_pp(pp)


__all__ = ["LatencyModel", "transfer_time", "PolynomialLatencyModel", "distserve_a100",
           "StepOverheads", "WithOverheads", "get_overheads",
           "fit_polynomial", "load_distserve_json", "RooflineLatencyModel",
           "ShapeTableLatencyModel", "TpuCostLatencyModel", "ShareScaling", "latency_source"]
