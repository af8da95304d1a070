"""Per-step serving overheads that a fitted latency model leaves out.

A fit of forward-pass times (DistServe's polynomial, a profiled table) prices the
model's work, not the serving system's: scheduling, the RPC that launches a step,
reading results back. `StepOverheads` names those costs and `WithOverheads` adds
them to any `LatencyModel`.

`DISTSERVE` is what DistServe's own simulator adds (LLMServe/DistServe,
simdistserve; figures only, cited per field), needed to reproduce the paper's
goodputs: with it (and `Setup.distserve_compat`) our simulator agrees with
simdistserve within 2% (`docs/fidelity.md`). `VLLM` is vLLM's CPU time per
iteration as measured and published for the vLLM 0.5/0.6 era (cited below): a
fixed part and a part per request in the batch. Presets are data with a source,
never factors fitted to a paper's result.
Limits: DistServe adds the per-step part at the first pipeline stage only, and
our simulator's stages are equal, so with pp > 1 a request's latency counts it
once per stage (throughput, set by the slowest stage, is unchanged). Its context
count is the tokens each request attends over, which here includes the token
being fed (one token per request more than DistServe's count, 1e-7 s each).
"""

from __future__ import annotations

import dataclasses

from pdserve_jax.core.step import Step
from pdserve_jax.sim.latency.base import LatencyModel


@dataclasses.dataclass(frozen=True)
class StepOverheads:
  """Seconds a serving system adds to each step.

  Attributes:
    per_step_s: fixed, every step.
    per_context_token_s: per token of context in the step's batch (prompt tokens
      up to each chunk's end for prefills, attended tokens for decodes).
    per_prefill_stage_s: per pipeline stage, on steps that prefill.
    per_seq_s: per request in the step (a prompt chunk or a decode).
  """
  per_step_s: float = 0.0
  per_context_token_s: float = 0.0
  per_prefill_stage_s: float = 0.0
  per_seq_s: float = 0.0

  def __post_init__(self):
    for f in dataclasses.fields(self):
      v = getattr(self, f.name)
      if not (isinstance(v, (int, float)) and v >= 0):
        raise ValueError(f"{f.name} must be a number >= 0, got {v!r}")

  def seconds(self, context: int, prefill: bool, pp: int, num_seqs: int = 0) -> float:
    return (self.per_step_s + self.per_context_token_s * context + self.per_seq_s * num_seqs
            + (self.per_prefill_stage_s * pp if prefill else 0.0))

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


NONE = StepOverheads()
DISTSERVE = StepOverheads(
    # simdistserve base/worker.py, Worker.add_ray_overhead: 2 ms + 1e-4 ms per
    # context token of the batch, on every prefill and decode step.
    per_step_s=2e-3, per_context_token_s=1e-7,
    # simdistserve estimators/time_estimator.py, get_prefill_time: pp_const = 1 ms
    # per pipeline stage, added to each prefill step's time.
    per_prefill_stage_s=1e-3)
VLLM = StepOverheads(
    # vLLM v0.5.4 serving Llama-3-8B (one A6000, Xeon Gold 5218 host), scheduling
    # time per iteration (input preparation, scheduling, output processing) against
    # the batch's requests: 10.6 ms at 128, 24.6 ms at 512, 42.2 ms at 1,024
    # (WukLab, "Can Scheduling Overhead Dominate LLM Inference Performance?",
    # 2024-09-10, Figure 5, read off the published SVG); the least-squares line
    # through them: 6.1 ms + 0.035 ms per request. vLLM v0.6.0 (the semi-PD paper's
    # baseline) overlaps part of the output processing with the GPU (its
    # 2024-09-05 release blog: +12% throughput from the async output processor).
    per_step_s=6.1e-3, per_seq_s=3.5e-5)
PRESETS = {"none": NONE, "distserve": DISTSERVE, "vllm": VLLM}


def get_overheads(name) -> StepOverheads:
  """A preset by name ("none", "distserve"), or a `StepOverheads` as given."""
  if isinstance(name, StepOverheads):
    return name
  try:
    return PRESETS[name]
  except (KeyError, TypeError):
    raise ValueError(f"unknown overheads {name!r}; known: {sorted(PRESETS)}") from None


@dataclasses.dataclass(frozen=True)
class WithOverheads(LatencyModel):
  """`base`'s step times plus `overheads`, for an instance of `pp` stages."""
  base: LatencyModel
  overheads: StepOverheads
  pp: int = 1

  def prefill_totals(self, num_seqs, tokens, sq_tokens):
    # Batch totals alone do not give a chunk's end; whole prompts (context = tokens)
    # are what the planner's estimates price here.
    return (self.base.prefill_totals(num_seqs, tokens, sq_tokens)
            + self.overheads.seconds(tokens, True, self.pp, num_seqs))

  def decode_totals(self, batch, context):
    return self.base.decode_totals(batch, context) + self.overheads.seconds(
        context, False, self.pp, batch)

  def mixed_totals(self, num_seqs, tokens, sq_tokens, batch, context):
    return (self.base.mixed_totals(num_seqs, tokens, sq_tokens, batch, context)
            + self.overheads.seconds(tokens + context, True, self.pp, num_seqs + batch))

  def step_time(self, step: Step, pages=None) -> float:
    context = step.decode_context + sum(c.end for c in step.prefills)
    return (self.base.step_time(step, pages)
            + self.overheads.seconds(context, bool(step.prefills), self.pp,
                                     len(step.prefills) + len(step.decodes)))
