"""Scheduling policies for the three serving modes, written once for two executors.

Each scheduler is a host-side object over `Request` state and one `PageAllocator`.
An executor drives it in a loop: `step = schedule()`, run the step (real jitted
programs on the wall clock, or a latency model on a virtual clock), set
`req.stopped` for any request that sampled a stop token, then `complete(step, now)`.
One step is in flight per scheduler at a time. Schedulers never see arrays.

Page accounting: a request's pages are reserved at admission for its whole life
(`prompt_len + max_tokens` tokens), so a running request can never run out of pages
and nothing is ever preempted. The price is memory held for tokens a request may
not produce (early stops); the gain is that admission is the only place a request
can wait for memory, which keeps both executors simple and identical. The prefill
side of a disaggregated pair only reserves the prompt: its pages are a queue that
drains into a decode instance.

Modes:
  colocated: `PrefillFirstScheduler` (vLLM's classic policy) and
    `ChunkedPrefillScheduler` (Sarathi-Serve's token budget per step).
  disaggregated (DistServe): `PrefillScheduler` per prefill instance and
    `DecodeScheduler` per decode instance; the decode side pulls hand-offs when it
    has pages, and the prefill side frees a hand-off when its KV copy is done.
  semi-PD: a `PrefillScheduler(reserve_lifetime=True)` and a `DecodeScheduler` over
    one allocator; `move_handoffs` passes requests across without copying.
    `ShareController` splits device time between the phases and `SloPartitioner`
    moves the split online (semi-PD's Algorithm 1).
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Callable, Optional, Sequence

from pdserve_jax.kv.allocator import PageAllocator, pages_for
from pdserve_jax.serving.metrics import percentile
from pdserve_jax.serving.request import Request

PREFILL = "prefill"
DECODE = "decode"


@dataclasses.dataclass(frozen=True, slots=True)
class PrefillChunk:
  """Prompt tokens [start, end) of `request` computed in one step. The chunk with
  `end == request.prompt_len` also samples the request's first output token."""
  request: Request
  start: int
  end: int

  @property
  def num_tokens(self) -> int:
    return self.end - self.start

  @property
  def last(self) -> bool:
    return self.end == self.request.prompt_len


@dataclasses.dataclass(slots=True)
class Step:
  """One iteration: prompt chunks and decode requests (one token each).

  Its lists are snapshots: a scheduler never mutates a list it has handed out (it
  builds a new one when membership changes), which lets consecutive decode steps
  share one list instead of copying the batch every step.
  """
  prefills: list[PrefillChunk] = dataclasses.field(default_factory=list)
  decodes: list[Request] = dataclasses.field(default_factory=list)
  # Schedulers keep this total up to date as requests join and leave, so that a
  # latency model need not walk the batch every step.
  _decode_context: Optional[int] = None

  @property
  def num_prefill_tokens(self) -> int:
    return sum(c.end - c.start for c in self.prefills)

  @property
  def num_decode_tokens(self) -> int:
    return len(self.decodes)

  @property
  def empty(self) -> bool:
    return not self.prefills and not self.decodes

  @property
  def decode_context(self) -> int:
    """Tokens the decodes attend over, summed (each attends `kv_len + 1`)."""
    if self._decode_context is None:
      return sum(r.num_prefilled + r.num_output for r in self.decodes)
    return self._decode_context


def check_fits(allocator: PageAllocator, req: Request, num_tokens: int,
               where: str = "") -> None:
  """Raises ValueError when `req` could never hold `num_tokens` tokens of KV."""
  need = pages_for(num_tokens, allocator.page_size)
  if need > allocator.capacity:
    pool = f"the {where} KV pool" if where else "the KV pool"
    raise ValueError(
        f"request {req.request_id} (prompt {req.prompt_len} + max_tokens "
        f"{req.max_tokens}) needs {need} pages of {allocator.page_size} tokens for "
        f"{num_tokens} tokens, but {pool} holds only {allocator.capacity} pages")


def _check_fresh(req: Request) -> None:
  if req.num_prefilled or req.num_output or req.token_times or req.finish_time is not None:
    raise ValueError(f"request {req.request_id} has already made progress; "
                     "add a fresh copy (Request.fresh())")


def _check_limit(name: str, value: int) -> None:
  if value < 1:
    raise ValueError(f"{name} must be >= 1, got {value}")


def _context(reqs) -> int:
  """Tokens the next decode step of `reqs` attends over, summed."""
  return sum(r.num_prefilled + r.num_output for r in reqs)


class _Scheduler:
  """Waiting queue, the in-flight step, and the shared effect of a finished step.

  Subclasses keep `_ctx`, the `_context` of their decode batch, up to date: each
  decode step adds one token per request, and joining or leaving requests add or
  take theirs.
  """

  def __init__(self, allocator: PageAllocator):
    self.allocator = allocator
    self._waiting: collections.deque[Request] = collections.deque()
    self._in_flight: Optional[Step] = None
    self._ctx = 0

  def _begin(self, step: Step) -> Step:
    self._in_flight = step
    return step

  def _check_schedulable(self) -> None:
    if self._in_flight is not None:
      raise RuntimeError("schedule() called while a step is in flight; call "
                         "complete(step, now) first")

  def _advance(self, step: Step, now: float) -> tuple[list[Request], int]:
    """Applies a finished step to its requests. Returns those now done (finish time
    set) and the context the finished decodes had reached (see `_context`)."""
    if step is not self._in_flight:
      raise RuntimeError("complete() got a step this scheduler did not schedule last")
    self._in_flight = None
    done = []
    for c in step.prefills:
      r = c.request
      if c.start != r.num_prefilled:
        raise RuntimeError(f"request {r.request_id}: chunk starts at {c.start} but "
                           f"{r.num_prefilled} prompt tokens are cached")
      r.num_prefilled = c.end
      if c.end == r.prompt_len:
        r.num_output += 1
        r.token_times.append(now)
      if r.stopped or r.num_output >= r.max_tokens:
        r.finish_time = now
        done.append(r)
    gone = 0
    for r in step.decodes:
      n = r.num_output + 1
      r.num_output = n
      r.token_times.append(now)
      if n >= r.max_tokens or r.stopped:
        r.finish_time = now
        done.append(r)
        gone += r.num_prefilled + n
    return done, gone

  @property
  def num_waiting(self) -> int:
    return len(self._waiting)


def _add_prompt(sched, req: Request, reserve: int, where: str) -> None:
  """Queues a request whose whole prompt one prefill step will compute."""
  _check_fresh(req)
  check_fits(sched.allocator, req, reserve, where)
  if req.prompt_len > sched.max_prefill_tokens:
    raise ValueError(f"request {req.request_id}: prompt of {req.prompt_len} tokens "
                     f"exceeds max_prefill_tokens={sched.max_prefill_tokens}")
  sched._waiting.append(req)


def _admit_prompts(sched, room: int, reservation) -> list[PrefillChunk]:
  """Admits waiting requests FCFS, whole prompts, while the batch has `room`, the
  prompt-token budget holds and `reservation(req)` tokens of pages are free."""
  chunks, tokens = [], 0
  waiting, alloc = sched._waiting, sched.allocator
  while waiting and len(chunks) < room:
    req = waiting[0]
    need = reservation(req)
    if tokens + req.prompt_len > sched.max_prefill_tokens or not alloc.can_fit(req, need):
      break
    alloc.ensure(req, need)
    waiting.popleft()
    chunks.append(PrefillChunk(req, 0, req.prompt_len))
    tokens += req.prompt_len
  return chunks


class PrefillFirstScheduler(_Scheduler):
  """vLLM's classic colocated policy.

  If the head of the waiting queue can be admitted (batch cap, prompt-token budget,
  free pages), the step prefills every waiting request admissible in FCFS order,
  stopping at the first that is not; otherwise the step decodes every running
  request. Decodes pause while prefills run.
  """

  def __init__(self, allocator: PageAllocator, max_batch: int, max_prefill_tokens: int):
    super().__init__(allocator)
    _check_limit("max_batch", max_batch)
    _check_limit("max_prefill_tokens", max_prefill_tokens)
    self.max_batch = max_batch
    self.max_prefill_tokens = max_prefill_tokens
    self._running: list[Request] = []

  def add(self, req: Request) -> None:
    _add_prompt(self, req, req.lifetime_tokens, "")

  def schedule(self) -> Optional[Step]:
    self._check_schedulable()
    chunks = _admit_prompts(self, self.max_batch - len(self._running),
                            lambda r: r.lifetime_tokens)
    if chunks:
      self._running = self._running + [c.request for c in chunks]
      return self._begin(Step(chunks, []))
    if self._running:
      return self._begin(Step([], self._running, self._ctx))
    return None

  def complete(self, step: Step, now: float) -> list[Request]:
    done, gone = self._advance(step, now)
    self._ctx += len(step.decodes) - gone + _context(
        [c.request for c in step.prefills if c.request.finish_time is None])
    if done:
      for r in done:
        self.allocator.free(r)
      self._running = [r for r in self._running if r.finish_time is None]
    return done

  @property
  def num_running(self) -> int:
    return len(self._running)

  @property
  def idle(self) -> bool:
    return not self._waiting and not self._running


class ChunkedPrefillScheduler(_Scheduler):
  """Sarathi-Serve's colocated policy: stall-free batches under a token budget.

  Every step decodes all running requests whose prompt is done (one token each),
  then spends what is left of `token_budget` on prompt chunks: the request whose
  prompt is partly cached continues first, then waiting requests are admitted FCFS
  while the batch cap and free pages allow.
  """

  def __init__(self, allocator: PageAllocator, max_batch: int, token_budget: int):
    super().__init__(allocator)
    _check_limit("max_batch", max_batch)
    if token_budget < max_batch + 1:
      raise ValueError(f"token_budget={token_budget} must exceed max_batch={max_batch}, "
                       "or a full decode batch leaves no room for prompt tokens")
    self.max_batch = max_batch
    self.token_budget = token_budget
    self._prefilling: list[Request] = []  # admitted, prompt not fully cached; FCFS
    self._decoding: list[Request] = []

  def add(self, req: Request) -> None:
    _check_fresh(req)
    check_fits(self.allocator, req, req.lifetime_tokens)
    self._waiting.append(req)

  def schedule(self) -> Optional[Step]:
    self._check_schedulable()
    budget = self.token_budget - len(self._decoding)
    chunks = []
    for r in self._prefilling:
      if budget <= 0:
        break
      n = min(r.prompt_len - r.num_prefilled, budget)
      chunks.append(PrefillChunk(r, r.num_prefilled, r.num_prefilled + n))
      budget -= n
    waiting, alloc = self._waiting, self.allocator
    while (waiting and budget > 0
           and len(self._prefilling) + len(self._decoding) < self.max_batch):
      req = waiting[0]
      if not alloc.can_fit(req, req.lifetime_tokens):
        break
      alloc.ensure(req, req.lifetime_tokens)
      waiting.popleft()
      self._prefilling.append(req)
      n = min(req.prompt_len, budget)
      chunks.append(PrefillChunk(req, 0, n))
      budget -= n
    if not chunks and not self._decoding:
      return None
    return self._begin(Step(chunks, self._decoding, self._ctx))

  def complete(self, step: Step, now: float) -> list[Request]:
    done, gone = self._advance(step, now)
    self._ctx += len(step.decodes) - gone
    for r in done:
      self.allocator.free(r)
    if step.prefills:
      moved = [c.request for c in step.prefills if c.last and c.request.finish_time is None]
      self._ctx += _context(moved)
      self._prefilling = [r for r in self._prefilling if r.num_prefilled < r.prompt_len
                          and r.finish_time is None]
      if done:
        self._decoding = [r for r in self._decoding if r.finish_time is None]
      if moved:
        self._decoding = self._decoding + moved
    elif done:
      self._decoding = [r for r in self._decoding if r.finish_time is None]
    return done

  @property
  def num_running(self) -> int:
    return len(self._prefilling) + len(self._decoding)

  @property
  def idle(self) -> bool:
    return not self._waiting and not self._prefilling and not self._decoding


class PrefillScheduler(_Scheduler):
  """Prefill-only instance (DistServe's prefill side, or semi-PD's prefill phase).

  Steps prefill whole prompts, admitted FCFS under the batch cap, the prompt-token
  budget and free pages. A request whose prompt finished and that is not done joins
  the hand-off queue with its pages held; requests done after their first token are
  freed and returned by `complete`.

  Pages reserved per request: the prompt alone by default (the KV leaves for a decode
  instance), or the whole life with `reserve_lifetime=True` (semi-PD, where decode
  keeps using the same pages).
  """

  def __init__(self, allocator: PageAllocator, max_batch: int, max_prefill_tokens: int,
               reserve_lifetime: bool = False):
    super().__init__(allocator)
    _check_limit("max_batch", max_batch)
    _check_limit("max_prefill_tokens", max_prefill_tokens)
    self.max_batch = max_batch
    self.max_prefill_tokens = max_prefill_tokens
    self.reserve_lifetime = reserve_lifetime
    self._running: list[Request] = []
    self._handoffs: collections.deque[Request] = collections.deque()
    self._transferring: dict[Request, None] = {}

  def _reservation(self, req: Request) -> int:
    return req.lifetime_tokens if self.reserve_lifetime else req.prompt_len

  def add(self, req: Request) -> None:
    _add_prompt(self, req, self._reservation(req), "prefill")

  def schedule(self) -> Optional[Step]:
    self._check_schedulable()
    chunks = _admit_prompts(self, self.max_batch, self._reservation)
    if not chunks:
      return None
    self._running = [c.request for c in chunks]
    return self._begin(Step(chunks, []))

  def complete(self, step: Step, now: float) -> list[Request]:
    if step.decodes:
      raise RuntimeError("a prefill scheduler's step has no decodes")
    done, _ = self._advance(step, now)
    for r in self._running:
      if r.finish_time is None:
        self._handoffs.append(r)
      else:
        self.allocator.free(r)
    self._running = []
    return done

  @property
  def handoffs(self) -> tuple[Request, ...]:
    """Requests waiting for a decode instance, FCFS; their pages are held here."""
    return tuple(self._handoffs)

  @property
  def num_handoffs(self) -> int:
    """Hand-offs queued or being copied out."""
    return len(self._handoffs) + len(self._transferring)

  def peek_handoff(self) -> Optional[Request]:
    return self._handoffs[0] if self._handoffs else None

  def take_handoff(self) -> Optional[Request]:
    """The oldest hand-off starts its KV copy: it leaves the queue, and its pages
    stay held here until `release_handoff`."""
    if not self._handoffs:
      return None
    req = self._handoffs.popleft()
    self._transferring[req] = None
    return req

  def release_handoff(self, req: Request) -> None:
    """The KV copy of `req` is done: its pages here are freed."""
    if req not in self._transferring:
      raise KeyError(f"request {req.request_id} is not being handed off")
    del self._transferring[req]
    self.allocator.free(req)

  def detach_handoffs(self) -> list[Request]:
    """Every queued hand-off leaves with its pages, which now belong to whoever
    shares this allocator (semi-PD's decode phase)."""
    out = list(self._handoffs)
    self._handoffs.clear()
    return out

  @property
  def num_running(self) -> int:
    return len(self._running)

  @property
  def idle(self) -> bool:
    return not (self._waiting or self._running or self._handoffs or self._transferring)


class DecodeScheduler(_Scheduler):
  """Decode-only instance (DistServe's decode side, or semi-PD's decode phase).

  Requests arrive with their prompt done and first token sampled. In disaggregated
  mode the instance pulls: `can_accept` says whether it has pages for the request's
  life, `reserve` takes them (the target of the KV copy), and `admit` puts the
  request in the queue once the copy is done. Steps decode up to `max_batch`
  admitted requests, FCFS; the rest wait with their pages held.
  """

  def __init__(self, allocator: PageAllocator, max_batch: int):
    super().__init__(allocator)
    _check_limit("max_batch", max_batch)
    self.max_batch = max_batch
    self._reserved: dict[Request, None] = {}
    self._running: list[Request] = []

  def check_fits(self, req: Request) -> None:
    """Raises ValueError when `req` could never fit this instance's KV pool."""
    check_fits(self.allocator, req, req.lifetime_tokens, "decode")

  def can_accept(self, req: Request) -> bool:
    return self.allocator.can_fit(req, req.lifetime_tokens)

  def reserve(self, req: Request) -> None:
    """Allocates `req`'s pages for its life here; raises OutOfPages when
    `can_accept(req)` is false."""
    self.check_fits(req)
    if req in self._reserved or self.allocator.pages(req):
      raise ValueError(f"request {req.request_id} already holds pages here")
    self.allocator.ensure(req, req.lifetime_tokens)
    self._reserved[req] = None

  def admit(self, req: Request) -> None:
    """`req`'s KV is in place (copied into reserved pages, or shared in semi-PD):
    it joins the decode queue."""
    if req in self._reserved:
      del self._reserved[req]
    elif len(self.allocator.pages(req)) < pages_for(req.lifetime_tokens,
                                                    self.allocator.page_size):
      raise ValueError(f"request {req.request_id} holds too few pages here; reserve() "
                       "it first")
    if req.num_prefilled != req.prompt_len or req.num_output < 1 or req.done:
      raise ValueError(f"request {req.request_id} is not ready to decode "
                       f"(prefilled {req.num_prefilled}/{req.prompt_len}, "
                       f"output {req.num_output}/{req.max_tokens})")
    self._waiting.append(req)

  def schedule(self) -> Optional[Step]:
    self._check_schedulable()
    waiting = self._waiting
    room = self.max_batch - len(self._running)
    if waiting and room > 0:
      joined = [waiting.popleft() for _ in range(min(room, len(waiting)))]
      self._running = self._running + joined
      self._ctx += _context(joined)
    if not self._running:
      return None
    return self._begin(Step([], self._running, self._ctx))

  def complete(self, step: Step, now: float) -> list[Request]:
    if step.prefills:
      raise RuntimeError("a decode scheduler's step has no prefills")
    done, gone = self._advance(step, now)
    self._ctx += len(step.decodes) - gone
    if done:
      for r in done:
        self.allocator.free(r)
      self._running = [r for r in self._running if r.finish_time is None]
    return done

  @property
  def num_waiting(self) -> int:
    """Requests reserved (KV in flight) or admitted but not yet in the batch."""
    return len(self._reserved) + len(self._waiting)

  @property
  def num_running(self) -> int:
    return len(self._running)

  @property
  def idle(self) -> bool:
    return not (self._reserved or self._waiting or self._running)


def move_handoffs(prefill: PrefillScheduler, decode: DecodeScheduler) -> int:
  """semi-PD hand-off: requests pass from prefill to decode over their shared
  allocator, with no copy and no page change. Returns how many moved."""
  if prefill.allocator is not decode.allocator:
    raise ValueError("move_handoffs needs both schedulers on one allocator")
  moved = prefill.detach_handoffs()
  for r in moved:
    decode.admit(r)
  return len(moved)


def least_loaded(instances: Sequence, eligible: Optional[Callable] = None):
  """The instance with the fewest queued + running requests (ties: lowest index),
  among those `eligible(instance)` accepts; None when none does."""
  best, best_load = None, None
  for inst in instances:
    if eligible is not None and not eligible(inst):
      continue
    load = inst.num_waiting + inst.num_running
    if best is None or load < best_load:
      best, best_load = inst, load
  return best


def _check_share(x: float) -> float:
  if not 0.0 < x < 1.0:
    raise ValueError(f"prefill share must lie strictly between 0 and 1, got {x}")
  return float(x)


class ShareController:
  """Time-shares one device between the prefill and decode phases as x : 1 - x.

  When both phases have work, the one whose busy time divided by its share is lower
  runs next (a start-time fair queue), so contended busy time follows
  x : 1 - x. A phase with nothing to run forgoes its claim for that time rather
  than building credit, so after an idle spell neither phase can monopolise the
  device to catch up. Changing the share changes numbers only.
  """

  def __init__(self, prefill_share: float = 0.5):
    self._x = _check_share(prefill_share)
    self._vtime = {PREFILL: 0.0, DECODE: 0.0}
    self._idle: set[str] = set()
    self.busy = {PREFILL: 0.0, DECODE: 0.0}

  @property
  def prefill_share(self) -> float:
    return self._x

  def set_share(self, prefill_share: float) -> None:
    self._x = _check_share(prefill_share)
    # The new split governs time from now on; past imbalance is not repaid.
    v = max(self._vtime.values())
    self._vtime = {PREFILL: v, DECODE: v}

  def record(self, phase: str, seconds: float) -> None:
    """Charges `seconds` of device time to `phase`."""
    if phase not in self.busy:
      raise ValueError(f"phase must be {PREFILL!r} or {DECODE!r}, got {phase!r}")
    share = self._x if phase == PREFILL else 1.0 - self._x
    self.busy[phase] += seconds
    self._vtime[phase] += seconds / share

  def pick(self, prefill_ready: bool, decode_ready: bool) -> Optional[str]:
    """The phase to run next, or None when neither has work."""
    vt, idle = self._vtime, self._idle
    for phase, other, ready in ((PREFILL, DECODE, prefill_ready),
                                (DECODE, PREFILL, decode_ready)):
      if not ready:
        idle.add(phase)
      elif phase in idle:
        # Back from idle: start level with the other phase, owed nothing.
        idle.discard(phase)
        vt[phase] = max(vt[phase], vt[other])
    if prefill_ready and decode_ready:
      return PREFILL if vt[PREFILL] <= vt[DECODE] else DECODE
    if prefill_ready:
      return PREFILL
    if decode_ready:
      return DECODE
    return None


class SloPartitioner:
  """semi-PD's SLO-aware share adjustment (arXiv 2504.19867, Algorithm 1).

  Every `window` finished requests, it compares P90 TTFT and P90 TPOT with their SLOs.
  If the worse ratio (P90 / SLO) exceeds 1 and the two ratios differ by more than
  `hysteresis`, the phase with the worse ratio gets `step` more share, within
  [min_share, max_share] for prefill. Requests with one output token have no TPOT
  and only count towards TTFT.
  """

  def __init__(self, ttft_slo: float, tpot_slo: float, window: int = 64,
               step: float = 0.05, min_share: float = 0.1, max_share: float = 0.9,
               hysteresis: float = 0.1, initial_share: float = 0.5,
               start_time: float = 0.0):
    if ttft_slo <= 0 or tpot_slo <= 0:
      raise ValueError(f"SLOs must be positive, got ttft={ttft_slo} tpot={tpot_slo}")
    _check_limit("window", window)
    if not 0 < step < 1:
      raise ValueError(f"step must lie in (0, 1), got {step}")
    if not 0 < min_share <= initial_share <= max_share < 1:
      raise ValueError("need 0 < min_share <= initial_share <= max_share < 1, got "
                       f"{min_share}, {initial_share}, {max_share}")
    if hysteresis < 0:
      raise ValueError(f"hysteresis must be >= 0, got {hysteresis}")
    self.ttft_slo, self.tpot_slo = ttft_slo, tpot_slo
    self.window, self.step, self.hysteresis = window, step, hysteresis
    self.min_share, self.max_share = min_share, max_share
    self._share = initial_share
    self._ttfts: list[float] = []
    self._tpots: list[float] = []
    self._history = [(start_time, initial_share)]

  @property
  def share(self) -> float:
    """The current prefill share."""
    return self._share

  @property
  def history(self) -> list[tuple[float, float]]:
    """(time, prefill share) at the start and at every change."""
    return list(self._history)

  def observe(self, req: Request) -> Optional[float]:
    """Takes a finished request; returns the new prefill share when it moved."""
    if req.ttft is None:
      raise ValueError(f"request {req.request_id} has produced no token")
    self._ttfts.append(req.ttft)
    tpot = req.tpot
    if tpot is not None:
      self._tpots.append(tpot)
    if len(self._ttfts) < self.window:
      return None
    r_ttft = percentile(self._ttfts, 90) / self.ttft_slo
    r_tpot = percentile(self._tpots, 90) / self.tpot_slo if self._tpots else 0.0
    self._ttfts, self._tpots = [], []
    if max(r_ttft, r_tpot) <= 1.0 or abs(r_ttft - r_tpot) <= self.hysteresis:
      return None
    if r_ttft > r_tpot:
      new = min(self.max_share, self._share + self.step)
    else:
      new = max(self.min_share, self._share - self.step)
    new = round(new, 9)  # keep repeated steps from drifting off the grid
    if new == self._share:
      return None
    self._share = new
    when = req.finish_time if req.finish_time is not None else req.token_times[-1]
    self._history.append((when, new))
    return new
