"""One serving request: its shape, its progress, and the times of its tokens.

A `Request` is the unit every scheduler, executor and metric works on. It is mutable
(the scheduler advances it step by step) and hashes by identity, so it can key the
page allocator. It holds no arrays: executor data (token ids, sampling parameters)
travels opaquely in `payload`, which no scheduler reads. What a prefix cache needs
of the prompt travels as `prefix_keys` (one key per full page, `core.prefix`): the
engine makes them from the token ids, the simulator from `blocks` (a trace's block
hashes).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

from pdserve_jax.core.prefix import Blocks


@dataclasses.dataclass(eq=False, slots=True)
class Request:
  """A request and its progress.

  Attributes:
    request_id: caller's id; not used for hashing.
    prompt_len: prompt tokens.
    max_tokens: output tokens to produce, the first (sampled by prefill) included.
    arrival_time: seconds on the executor's clock.
    payload: executor data; schedulers never read it.
    num_prefilled: tokens of `prefill_len` whose KV is cached.
    num_output: output tokens produced so far.
    token_times: executor clock time of each output token.
    stopped: an executor sampled a stop token.
    finish_time: when the request ended; None while it runs.
    num_recompute: output tokens to recompute with the prompt on the next prefill
      (set when the request is preempted and its pages freed).
    num_preemptions: how often the request lost its pages.
    end_reason: "aborted" or "error" once the request is cancelled; it then ends at
      the next point where a scheduler holds it, producing nothing more.
    admitted_seq: order of the latest admission to a batch; preemption takes the
      newest first.
    prefix_keys: one key per full page of the prompt at the pool's page size
      (`core.prefix`); None: the prefix cache ignores this request.
    blocks: the prompt's block hashes (a trace's, or a synthetic workload's), from
      which the simulator makes `prefix_keys` at its page size.
    num_cached: prefill tokens mapped from a prefix cache, over every admission.
    num_computed: prefill tokens computed, over every admission.
  """
  request_id: int
  prompt_len: int
  max_tokens: int
  arrival_time: float = 0.0
  payload: Any = None
  num_prefilled: int = 0
  num_output: int = 0
  token_times: list[float] = dataclasses.field(default_factory=list)
  stopped: bool = False
  finish_time: float | None = None
  num_recompute: int = 0
  num_preemptions: int = 0
  end_reason: str | None = None
  admitted_seq: int = -1
  prefix_keys: Optional[Sequence] = None
  blocks: Optional[Blocks] = None
  num_cached: int = 0
  num_computed: int = 0

  def __post_init__(self):
    if self.prompt_len < 1:
      raise ValueError(f"request {self.request_id}: prompt_len must be >= 1, "
                       f"got {self.prompt_len}")
    if self.max_tokens < 1:
      raise ValueError(f"request {self.request_id}: max_tokens must be >= 1, "
                       f"got {self.max_tokens}")

  @property
  def done(self) -> bool:
    return self.stopped or self.end_reason is not None or self.num_output >= self.max_tokens

  @property
  def finish_reason(self) -> str | None:
    """"stop", "length", "aborted" or "error" once finished; None before."""
    if self.finish_time is None:
      return None
    if self.end_reason is not None:
      return self.end_reason
    return "stop" if self.stopped else "length"

  @property
  def prefill_len(self) -> int:
    """Tokens the next prefill computes: the prompt, plus after a preemption the
    output tokens produced before it (their KV was freed with the pages)."""
    return self.prompt_len + self.num_recompute

  @property
  def prefill_done(self) -> bool:
    return self.num_prefilled >= self.prefill_len

  @property
  def kv_len(self) -> int:
    """Tokens whose KV is cached now: the prefilled tokens plus every output token
    fed back since. The newest output token is not fed yet, so a decode step
    writes one more entry and attends over `kv_len + 1` tokens."""
    fed = self.num_output - 1 - self.num_recompute
    return self.num_prefilled + fed if fed > 0 else self.num_prefilled

  @property
  def context_len(self) -> int:
    """Tokens a decode step of this request attends over (`kv_len + 1` once its
    prefill is done)."""
    return self.prompt_len + self.num_output

  def preempt(self) -> None:
    """Drops the cached KV (the caller frees the pages): the next prefill
    recomputes the prompt and every output token so far."""
    self.num_prefilled = 0
    self.num_recompute = self.num_output
    self.num_preemptions += 1

  @property
  def lifetime_tokens(self) -> int:
    """Tokens of KV this request may need over its whole life; schedulers reserve
    pages for this many at admission (one more than strictly needed, since the
    last output token is never fed back, which keeps the bound obvious)."""
    return self.prompt_len + self.max_tokens

  @property
  def ttft(self) -> float | None:
    if not self.token_times:
      return None
    return self.token_times[0] - self.arrival_time

  @property
  def tpot(self) -> float | None:
    """Mean time between output tokens; None with fewer than two tokens."""
    n = len(self.token_times)
    if n < 2:
      return None
    return (self.token_times[-1] - self.token_times[0]) / (n - 1)

  @property
  def latency(self) -> float | None:
    """End-to-end latency: finish time minus arrival."""
    if self.finish_time is None:
      return None
    return self.finish_time - self.arrival_time

  def fresh(self) -> Request:
    """A copy with the same shape, arrival, payload and prefix and no progress."""
    return Request(self.request_id, self.prompt_len, self.max_tokens,
                   self.arrival_time, self.payload, prefix_keys=self.prefix_keys,
                   blocks=self.blocks)
