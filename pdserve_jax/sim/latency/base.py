"""The latency-model interface: seconds for one scheduler `Step` on one instance,
and for a KV copy over a link. Each family lives in a module of its own."""

from __future__ import annotations

import json
from typing import Optional, Sequence

from pdserve_jax.core.step import Step


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
