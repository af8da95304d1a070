"""Per-instance batch policies, written once for both executors.

Each scheduler is a host-side object over `Request` state and one `PageAllocator`.
A coordinator drives it: `step = schedule()`, an executor runs the step (real
programs on the wall clock, or a latency model on a virtual clock) and marks
`req.stopped` for any request that sampled a stop token, then `complete(step, now)`.
One step is in flight per scheduler at a time. Schedulers never see arrays.

Page policies (`page_policy`):
  "on_demand" (default, vLLM's way): a request holds pages for the tokens written
    so far. Admission takes the pages of the first prefill chunk, keeping a 1%
    watermark free when others hold pages; a decode takes a new page when its
    next token crosses a page boundary. When a step cannot get a page, the most
    recently admitted request still running is preempted: its pages are freed and
    it is recomputed later (prompt + output so far, in one prefill); tokens it
    already produced are kept. The oldest request always progresses, so as long as
    one request's whole life fits the pool (checked at `add`), everything ends.
  "reserve": pages for a request's whole life (`prompt_len + max_tokens`) are
    taken at admission; nothing is ever preempted.

Decode batch cap (`max_decode_tokens`, off by default): a decode step takes
running requests in a rotating order while the tokens they attend over stay
within the cap, and the requests it decoded go to the back (DistServe's
simulator does this with a hard-coded 50,000, `simdistserve/base/worker.py`,
`_enter_decodes`). Page growth is then checked per request and step.

Preempted requests of a colocated scheduler rejoin the front of its own queue; a
decode-only scheduler hands them back (`take_preempted`) for its coordinator to
send to a prefill scheduler.

Prefix cache (when the allocator has one and requests carry `prefix_keys`): a
prefill admission maps the longest cached prefix of the prompt's full pages and
its chunk starts there (`num_prefilled` = the cached tokens); at least the last
prompt token is always computed, since it samples, so a page-aligned prompt never
writes into a shared page. A finished chunk registers the full prompt pages it
completed. Preemption and abort free pages as before: registered ones stay cached,
so a recomputation (or the next of n samples) maps them again. A request whose next
uncached page an admitted request is computing waits at the head of the queue
until that page is registered (SGLang's in-batch prefix deduplication), so n
samples of one prompt, or a burst sharing a system prompt, compute it once.

Schedulers:
  `PrefillFirstScheduler` (vLLM's classic colocated policy),
  `ChunkedPrefillScheduler` (Sarathi-Serve's token budget per step),
  `PrefillScheduler` (prefill only: DistServe's prefill side, semi-PD's prefill
    phase) and `DecodeScheduler` (decode only; optionally prefilling prompts with
    few uncached tokens itself, conditional disaggregation).
"""

from __future__ import annotations

import collections
import itertools
from typing import Callable, Optional, Sequence

from pdserve_jax.core.pages import PageAllocator, pages_for
from pdserve_jax.core.request import Request
from pdserve_jax.core.step import PrefillChunk, Step

PAGE_POLICIES = ("on_demand", "reserve")
# Admission leaves this share of the pool free for running requests to grow into
# (vLLM's default watermark, 1%), when other requests hold pages.
WATERMARK = 0.01

_admissions = itertools.count()  # global order of admissions: preemption picks the newest


def check_page_policy(policy: str) -> str:
  if policy not in PAGE_POLICIES:
    raise ValueError(f"page_policy must be one of {PAGE_POLICIES}, got {policy!r}")
  return policy


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
  if (req.num_prefilled or req.num_output or req.token_times or req.finish_time is not None
      or req.end_reason is not None):
    raise ValueError(f"request {req.request_id} has already made progress; "
                     "add a fresh copy (Request.fresh())")


def check_limit(name: str, value: int) -> None:
  if value < 1:
    raise ValueError(f"{name} must be >= 1, got {value}")


def _context(reqs) -> int:
  """Tokens the next decode step of `reqs` attends over, summed."""
  return sum(r.context_len for r in reqs)


def cache_limit(req: Request, page_size: int) -> int:
  """Cached pages a prefill of `req` may map: its full prompt pages, but never its
  last token's (that token is computed: it samples the next one)."""
  return min(len(req.prefix_keys or ()), (req.prefill_len - 1) // page_size)


def cached_tokens(allocator: PageAllocator, req: Request) -> int:
  """Tokens of `req`'s prefill that `allocator`'s cache holds now."""
  if not req.prefix_keys or not allocator.prefix_cache:
    return 0
  hits = allocator.lookup(req.prefix_keys, cache_limit(req, allocator.page_size))
  return len(hits) * allocator.page_size


class _Queue(collections.deque):
  """A FIFO of requests that keeps the sum of their prefill lengths (`tokens`), the
  prompt work waiting in it, for cache-aware routing. A request's prefill length
  does not change while it waits."""

  def __init__(self):
    super().__init__()
    self.tokens = 0

  def append(self, r):
    super().append(r)
    self.tokens += r.prefill_len

  def appendleft(self, r):
    super().appendleft(r)
    self.tokens += r.prefill_len

  def popleft(self):
    r = super().popleft()
    self.tokens -= r.prefill_len
    return r

  def remove(self, r):
    super().remove(r)
    self.tokens -= r.prefill_len

  # Elastic roles take queued requests from either end and clear whole queues.
  def pop(self, *index):
    r = super().pop(*index)
    self.tokens -= r.prefill_len
    return r

  def clear(self):
    super().clear()
    self.tokens = 0

  def extend(self, reqs):
    for r in reqs:
      self.append(r)


class _Scheduler:
  """Waiting queue, the in-flight step, page growth with preemption, and the shared
  effect of a finished step.

  Subclasses keep `_ctx`, the `_context` of their decode batch, up to date: each
  decode step adds one token per request, and joining or leaving requests add or
  take theirs; after a preemption or a cancellation they recount it.

  On-demand growth is tracked per page, not per token: `_due[k]` lists the
  requests whose decode step number k (counting this scheduler's decode steps)
  writes the first token past their last page.
  """

  def __init__(self, allocator: PageAllocator, page_policy: str = "on_demand",
               max_decode_tokens: Optional[int] = None):
    self.allocator = allocator
    self.page_policy = check_page_policy(page_policy)
    if max_decode_tokens is not None:
      check_limit("max_decode_tokens", max_decode_tokens)
    self.max_decode_tokens = max_decode_tokens
    self._lifetime = page_policy == "reserve"
    # Per-page growth tracking (`_track`) is off under "reserve" (nothing grows) and
    # under a decode cap (growth is checked per request and step: `_capped_batch`).
    self._tracks = not self._lifetime and max_decode_tokens is None
    self._watermark = max(1, int(allocator.capacity * WATERMARK))
    self._waiting: _Queue = _Queue()
    self._in_flight: Optional[Step] = None
    self._ctx = 0
    self._recount = False
    self._decode_steps = 0
    self._due: dict[int, list[Request]] = {}
    self._due_of: dict[Request, int] = {}
    # `steady`'s bounds: the decode step number at which the first request of the
    # batch `_steady_for` finishes (None: to recount), and one before which no
    # page is due (`_due` has no key in [`_decode_steps`, `_grow_from`)).
    self._steady_for: Optional[list[Request]] = None
    self._finish_at = self._grow_from = 0
    self.num_preemptions = 0

  # -- hooks of the subclasses -------------------------------------------------

  def _decoding(self) -> list[Request]:
    """The decode batch (requests whose next step decodes)."""
    raise NotImplementedError

  def _holders(self) -> list[Request]:
    """Requests holding pages that a preemption may take."""
    raise NotImplementedError

  def _drop(self, req: Request) -> bool:
    """Removes `req` from the running lists; True when it was in one."""
    raise NotImplementedError

  def _requeue(self, req: Request) -> None:
    """Where a preempted request goes: by default the front of this queue."""
    self._waiting.appendleft(req)

  def pending_prefill_tokens(self) -> int:
    """Prompt tokens queued or partly prefilled here: the prefill work ahead of a
    request that joins now (cache-aware routing's load)."""
    return self._waiting.tokens

  # -- steps --------------------------------------------------------------------

  def _begin(self, step: Step) -> Step:
    self._in_flight = step
    if step.decodes:
      self._decode_steps += 1
    return step

  def _check_schedulable(self) -> None:
    if self._in_flight is not None:
      raise RuntimeError("schedule() called while a step is in flight; call "
                         "complete(step, now) first")

  def _advance(self, step: Step, now: float, keep=()) -> tuple[list[Request], int]:
    """Applies a finished step to its requests. Returns those now done (finish time
    set) and the context the finished decodes had reached (see `_context`).
    Cancelled requests (`end_reason` set) make no progress and end here, but those
    prefilled in `keep`, which end later (when their KV copy lands)."""
    if step is not self._in_flight:
      raise RuntimeError("complete() got a step this scheduler did not schedule last")
    self._in_flight = None
    done = []
    for c in step.prefills:
      r = c.request
      if r.end_reason is None:
        if c.start != r.num_prefilled:
          raise RuntimeError(f"request {r.request_id}: chunk starts at {c.start} but "
                             f"{r.num_prefilled} tokens are cached")
        r.num_prefilled = c.end
        r.num_computed += c.end - c.start
        if r.prefix_keys is not None:
          self.allocator.commit(r, r.prefix_keys, min(c.end, r.prompt_len))
        if c.end == r.prefill_len:
          r.num_output += 1
          r.token_times.append(now)
      else:
        self._recount = True
      if r.done and r not in keep:
        r.finish_time = now
        done.append(r)
    gone = 0
    for r in step.decodes:  # one token each: the simulator's innermost loop
      if r.end_reason is None:
        n = r.num_output = r.num_output + 1
        r.token_times.append(now)
        if n >= r.max_tokens or r.stopped:
          r.finish_time = now
          done.append(r)
          gone += r.prompt_len + n
      else:
        r.finish_time = now
        done.append(r)
        self._recount = True
    return done, gone

  def _release(self, done: Sequence[Request]) -> None:
    free, due_of = self.allocator.free, self._due_of
    for r in done:
      free(r)
      due_of.pop(r, None)

  def _settle(self) -> None:
    if self._recount:
      self._recount = False
      self._ctx = _context(self._decoding())

  # -- pages --------------------------------------------------------------------

  def _fits_now(self, req: Request, tokens: int, watermark: bool, hits=()) -> bool:
    """Whether `req` can hold `tokens` tokens now, mapping the cached pages `hits`
    when it holds none, keeping the watermark free (on-demand admissions into a pool
    others use)."""
    alloc = self.allocator
    have = len(alloc.pages(req))
    if hits and not have:
      need = alloc.cost(hits, tokens)
    else:
      need = pages_for(tokens, alloc.page_size) - have
    if watermark and not self._lifetime and alloc.num_free < alloc.capacity:
      need += self._watermark
    return need <= alloc.num_free

  def _lookup(self, req: Request) -> Optional[list[int]]:
    """The cached pages a prefill admission of `req` maps, or None when it should
    wait: an admitted request is computing the next page it would compute."""
    alloc = self.allocator
    keys = req.prefix_keys
    if not keys or not alloc.prefix_cache:
      return []
    limit = cache_limit(req, alloc.page_size)
    hits = alloc.lookup(keys, limit)
    return None if alloc.pending(keys, len(hits), limit) else hits

  def _admitted(self, req: Request, tokens: int, hits=()) -> None:
    """Admits a prefill of `req` holding `tokens` tokens of pages, the cached `hits`
    among them: its prefill starts after them."""
    alloc = self.allocator
    alloc.admit(req, hits, tokens, req.prefix_keys or (), req.prefill_len)
    if hits:
      cached = len(hits) * alloc.page_size
      req.num_prefilled = cached
      req.num_cached += cached
    req.admitted_seq = next(_admissions)

  def _track(self, req: Request) -> None:
    """Notes the decode step at which `req` first writes past its pages."""
    if not self._tracks:
      return
    alloc = self.allocator
    due = self._decode_steps + max(len(alloc.pages(req)) * alloc.page_size - req.kv_len, 0)
    if due < self._grow_from:
      self._grow_from = due
    bucket = self._due.get(due)
    if bucket is None:
      self._due[due] = [req]
    else:
      bucket.append(req)
    self._due_of[req] = due

  def _grow_due(self) -> None:
    """Gives the decodes of the next step the pages they need, oldest first."""
    k = self._decode_steps
    bucket = self._due.pop(k, None)
    if not bucket:
      return
    if len(bucket) > 1:
      bucket.sort(key=_seq)
    # `_track` written out (a decode crosses a page boundary every page_size steps).
    due, due_of, alloc = self._due, self._due_of, self.allocator
    pages, page_size = alloc.pages, alloc.page_size
    for r in bucket:
      if due_of.get(r) != k:
        continue  # tracked again or gone since
      tokens = r.context_len
      if not alloc.grow(r, tokens) and not self._grow(r, tokens):
        continue
      # Past k, where a key was due: `_grow_from` <= k needs no lowering, unlike in `_track`.
      nxt = k + max(len(pages(r)) * page_size - r.kv_len, 0)
      later = due.get(nxt)
      if later is None:
        due[nxt] = [r]
      else:
        later.append(r)
      due_of[r] = nxt

  def _grow(self, req: Request, tokens: int) -> bool:
    """Grows `req` to `tokens` tokens of pages, preempting newer requests, newest
    first, while pages are short; when none is newer, `req` itself is preempted
    (returns False)."""
    alloc = self.allocator
    if alloc.grow(req, tokens):
      return True
    newer = sorted((h for h in self._holders() if h.admitted_seq > req.admitted_seq),
                   key=_seq)
    while newer:
      self._preempt(newer.pop())
      if alloc.grow(req, tokens):
        return True
    self._preempt(req)
    return False

  def _capped_batch(self, running: list[Request]) -> list[Request]:
    """The next decode batch under `max_decode_tokens`: running requests in order
    while their attended tokens fit the cap (the first always goes), each given
    the page its next token needs (oldest first, preempting newer ones)."""
    assert self.max_decode_tokens is not None  # only called under a cap
    room, batch = self.max_decode_tokens, list[Request]()
    for r in running:
      if batch and r.context_len > room:
        break
      room -= r.context_len
      batch.append(r)
    if not self._lifetime:
      for r in sorted(batch, key=_seq):
        if self.allocator.pages(r):
          self._grow(r, r.context_len)
      batch = [r for r in batch if self.allocator.pages(r)]
    self._recount = True
    return batch

  def _rotate(self, running: list[Request], step: Step) -> list[Request]:
    """`running` with the requests `step` decoded (and still running) moved to the
    back, in their order: the cap's round robin."""
    decoded = {id(r) for r in step.decodes}
    return ([r for r in running if id(r) not in decoded]
            + [r for r in step.decodes if r.finish_time is None])

  def _preempt(self, req: Request) -> None:
    self.allocator.free(req)
    self._due_of.pop(req, None)
    if not self._drop(req):
      self._waiting.remove(req)
    req.preempt()
    self.num_preemptions += 1
    self._recount = True
    self._requeue(req)

  def drop_step(self) -> None:
    """Forgets the step in flight, whose results will never come (its instance's
    devices are gone); its requests stay held here until `remove`d."""
    self._in_flight = None
    self._recount = True
    self._steady_for = None

  # -- abort ----------------------------------------------------------------------

  def remove(self, req: Request) -> Optional[bool]:
    """Takes `req` out if this scheduler holds it: True when it was removed and its
    pages freed, False when it is in the step in flight (it ends when that step
    completes, if cancelled), None when it is not held here."""
    if self._in_flight is not None and req in self._in_flight.requests:
      self._steady_for = None  # it is cancelled: it ends with the step
      return False
    if self._drop(req):
      pass
    elif req in self._waiting:
      self._waiting.remove(req)
    else:
      return None
    self._release([req])
    self._recount = True
    self._settle()
    return True

  @property
  def num_waiting(self) -> int:
    return len(self._waiting)

  def held(self) -> list[Request]:
    """Every request here: queued, in the step in flight, or holding pages."""
    out = dict.fromkeys(self._waiting)
    if self._in_flight is not None:
      out.update(dict.fromkeys(self._in_flight.requests))
    out.update(dict.fromkeys(self.allocator.owners()))
    return list(out)


def _seq(r: Request) -> int:
  return r.admitted_seq


def _add_prompt(sched, req: Request, where: str) -> None:
  """Queues a fresh request whose whole prompt one prefill step will compute (alone,
  if it is longer than the prompt-token budget)."""
  _check_fresh(req)
  check_fits(sched.allocator, req, req.lifetime_tokens, where)
  sched._waiting.append(req)


def _admit_prompts(sched, room: int, reservation: Callable[[Request], int],
                   watermark: bool) -> list[PrefillChunk]:
  """Admits waiting requests FCFS, whole prefills, while the batch has `room`, the
  prompt-token budget holds and `reservation(req)` tokens of pages are free. A
  prefill longer than the budget runs alone."""
  chunks: list[PrefillChunk] = []
  tokens = 0
  waiting = sched._waiting
  while waiting and len(chunks) < room:
    req = waiting[0]
    hits = sched._lookup(req)
    if hits is None:
      break
    start = len(hits) * sched.allocator.page_size
    n = req.prefill_len - start
    if chunks and tokens + n > sched.max_step_tokens:
      break
    need = reservation(req)
    if not sched._fits_now(req, need, watermark, hits):
      break
    sched._admitted(req, need, hits)
    waiting.popleft()
    chunks.append(PrefillChunk(req, start, req.prefill_len))
    tokens += n
  return chunks


class PrefillFirstScheduler(_Scheduler):
  """vLLM's classic colocated policy.

  If the head of the waiting queue can be admitted (batch cap, prompt-token budget,
  free pages), the step prefills every waiting request admissible in FCFS order,
  stopping at the first that is not; otherwise the step decodes every running
  request. Decodes pause while prefills run.
  """

  def __init__(self, allocator: PageAllocator, max_batch: int, max_step_tokens: int,
               page_policy: str = "on_demand", max_decode_tokens: Optional[int] = None):
    super().__init__(allocator, page_policy, max_decode_tokens)
    check_limit("max_batch", max_batch)
    check_limit("max_step_tokens", max_step_tokens)
    self.max_batch = max_batch
    self.max_step_tokens = max_step_tokens
    self._running: list[Request] = []

  def _decoding(self):
    return self._running

  def _holders(self):
    return self._running

  def _drop(self, req):
    if req in self._running:
      self._running = [r for r in self._running if r is not req]
      return True
    return False

  def add(self, req: Request) -> None:
    _add_prompt(self, req, "")

  def _reservation(self, req: Request) -> int:
    return req.lifetime_tokens if self._lifetime else req.prefill_len

  def schedule(self) -> Optional[Step]:
    self._check_schedulable()
    chunks = _admit_prompts(self, self.max_batch - len(self._running), self._reservation,
                            watermark=True)
    if chunks:
      self._running = self._running + [c.request for c in chunks]
      return self._begin(Step(chunks, []))
    if not self._running:
      return None
    if self.max_decode_tokens is not None:
      return self._begin(Step([], self._capped_batch(self._running)))
    self._grow_due()
    self._settle()
    return self._begin(Step([], self._running, self._ctx))

  def complete(self, step: Step, now: float) -> list[Request]:
    done, gone = self._advance(step, now)
    joined = [c.request for c in step.prefills if c.request.finish_time is None]
    self._ctx += len(step.decodes) - gone + _context(joined)
    for r in joined:
      self._track(r)
    if self.max_decode_tokens is not None and step.decodes:
      self._running = self._rotate(self._running, step)
    if done:
      self._release(done)
      self._running = [r for r in self._running if r.finish_time is None]
    self._settle()
    return done

  @property
  def num_running(self) -> int:
    return len(self._running)

  @property
  def idle(self) -> bool:
    return not self._waiting and not self._running


class ChunkedPrefillScheduler(_Scheduler):
  """Sarathi-Serve's colocated policy: stall-free batches under a token budget.

  Every step decodes all running requests whose prefill is done (one token each),
  then spends what is left of `max_step_tokens` on prefill chunks: requests whose
  prefill is partly cached continue first, then waiting requests are admitted FCFS
  while the batch cap and free pages allow.
  """

  def __init__(self, allocator: PageAllocator, max_batch: int, max_step_tokens: int,
               page_policy: str = "on_demand"):
    super().__init__(allocator, page_policy)
    check_limit("max_batch", max_batch)
    if max_step_tokens < max_batch + 1:
      raise ValueError(f"max_step_tokens={max_step_tokens} must exceed max_batch={max_batch}, "
                       "or a full decode batch leaves no room for prompt tokens")
    self.max_batch = max_batch
    self.max_step_tokens = max_step_tokens
    self._prefilling: list[Request] = []  # admitted, prefill not fully cached; FCFS
    self._decoding_batch: list[Request] = []

  def _decoding(self):
    return self._decoding_batch

  def _holders(self):
    return self._prefilling + self._decoding_batch

  def _drop(self, req):
    if req in self._prefilling:
      self._prefilling.remove(req)
      return True
    if req in self._decoding_batch:
      self._decoding_batch = [r for r in self._decoding_batch if r is not req]
      return True
    return False

  def add(self, req: Request) -> None:
    _check_fresh(req)
    check_fits(self.allocator, req, req.lifetime_tokens)
    self._waiting.append(req)

  def pending_prefill_tokens(self) -> int:
    return self._waiting.tokens + _left(self._prefilling)

  def schedule(self) -> Optional[Step]:
    self._check_schedulable()
    self._grow_due()
    chunks = _chunks(self, self._waiting, self.max_step_tokens - len(self._decoding_batch),
                     len(self._decoding_batch))
    self._settle()
    if not chunks and not self._decoding_batch:
      return None
    return self._begin(Step(chunks, self._decoding_batch, self._ctx))

  def complete(self, step: Step, now: float) -> list[Request]:
    done, gone = self._advance(step, now)
    self._ctx += len(step.decodes) - gone
    self._release(done)
    self._decoding_batch = _after_chunks(self, step, done, self._decoding_batch)
    self._settle()
    return done

  @property
  def num_running(self) -> int:
    return len(self._prefilling) + len(self._decoding_batch)

  @property
  def idle(self) -> bool:
    return not self._waiting and not self._prefilling and not self._decoding_batch


def _left(reqs) -> int:
  """Prefill tokens `reqs` (partly prefilled) still have to compute."""
  return sum(r.prefill_len - r.num_prefilled for r in reqs)


def _chunks(sched, prompts: _Queue, budget: int, decoding: int) -> list[PrefillChunk]:
  """Sarathi-Serve's prompt chunks of one step within `budget` tokens: requests in
  `sched._prefilling` (partly prefilled, FCFS) continue first, then `prompts` are
  admitted FCFS while the batch (`decoding` requests plus those prefilling) stays
  under `sched.max_batch` and pages allow, each from its cached prefix on."""
  chunks = []
  alloc = sched.allocator
  for r in list(sched._prefilling):
    if budget <= 0:
      break
    if not alloc.pages(r):
      continue  # preempted by an older request's growth in this loop
    n = min(r.prefill_len - r.num_prefilled, budget)
    if not sched._lifetime and not sched._grow(r, r.num_prefilled + n):
      continue
    chunks.append(PrefillChunk(r, r.num_prefilled, r.num_prefilled + n))
    budget -= n
  while prompts and budget > 0 and len(sched._prefilling) + decoding < sched.max_batch:
    req = prompts[0]
    hits = sched._lookup(req)
    if hits is None:
      break
    start = len(hits) * alloc.page_size
    n = min(req.prefill_len - start, budget)
    need = req.lifetime_tokens if sched._lifetime else start + n
    if not sched._fits_now(req, need, True, hits):
      break
    sched._admitted(req, need, hits)
    prompts.popleft()
    sched._prefilling.append(req)
    chunks.append(PrefillChunk(req, start, start + n))
    budget -= n
  # Chunks of requests preempted later in this loop are dropped.
  return [c for c in chunks if alloc.pages(c.request)]


def _after_chunks(sched, step: Step, done, decoding: list[Request]) -> list[Request]:
  """After a step of `_chunks` and decodes: prefills that finished join the decode
  batch `decoding` (returned, a new list when it changed), ended requests leave."""
  if step.prefills:
    moved = [c.request for c in step.prefills if c.last and c.request.finish_time is None]
    sched._ctx += _context(moved)
    sched._prefilling = [r for r in sched._prefilling if not r.prefill_done
                         and r.finish_time is None]
    if done:
      decoding = [r for r in decoding if r.finish_time is None]
    if moved:
      decoding = decoding + moved
      for r in moved:
        sched._track(r)
  elif done:
    decoding = [r for r in decoding if r.finish_time is None]
  return decoding


class PrefillScheduler(_Scheduler):
  """Prefill-only instance (DistServe's prefill side, or semi-PD's prefill phase).

  Steps prefill whole prompts (or recomputations), admitted FCFS under the batch
  cap, the prompt-token budget and free pages. A request whose prefill finished
  and that is not done joins the hand-off queue with its pages held; requests done
  after their first token are freed and returned by `complete`.

  Pages held per request: its prefill. With `shared=True` (semi-PD, where decode
  keeps using the same pool) the reserve policy takes the whole life at admission
  and the on-demand policy keeps the watermark free for decodes to grow into.

  Layer-wise KV streaming: a request `stream`ed while its step is in flight is
  copied out as the step computes it, so when the step ends it goes straight to
  the copies out (done or not: one that ends with its first token, or was
  cancelled meanwhile, ends when the copy lands and `release_handoff` frees it).
  """

  def __init__(self, allocator: PageAllocator, max_batch: int, max_step_tokens: int,
               page_policy: str = "on_demand", shared: bool = False):
    super().__init__(allocator, page_policy)
    check_limit("max_batch", max_batch)
    check_limit("max_step_tokens", max_step_tokens)
    self.max_batch = max_batch
    self.max_step_tokens = max_step_tokens
    self.shared = shared
    self._running: list[Request] = []
    self._handoffs: collections.deque[Request] = collections.deque()
    self._transferring: dict[Request, None] = {}
    self._streamed: set[Request] = set()

  def _decoding(self):
    return ()

  def _holders(self):
    return ()  # prompts hold what they need when admitted; nothing grows here

  def _drop(self, req):
    if req in self._handoffs:
      self._handoffs.remove(req)
      return True
    if req in self._running:  # only once its step was dropped (`drop_step`)
      self._running = [r for r in self._running if r is not req]
      return True
    return False

  def _reservation(self, req: Request) -> int:
    return req.lifetime_tokens if self.shared and self._lifetime else req.prefill_len

  def add(self, req: Request) -> None:
    _add_prompt(self, req, "prefill")

  def requeue(self, req: Request) -> None:
    """A request preempted elsewhere joins the front of the queue to recompute."""
    if req.num_prefilled or not req.num_preemptions:
      raise ValueError(f"request {req.request_id} was not preempted")
    self._waiting.appendleft(req)

  def schedule(self) -> Optional[Step]:
    self._check_schedulable()
    chunks = _admit_prompts(self, self.max_batch, self._reservation, watermark=self.shared)
    if not chunks:
      return None
    self._running = [c.request for c in chunks]
    return self._begin(Step(chunks, []))

  def stream(self, req: Request) -> None:
    """`req`'s KV leaves while the step in flight prefills it (see the class
    docstring)."""
    if self._in_flight is None or not any(c.request is req and c.last
                                          for c in self._in_flight.prefills):
      raise ValueError(f"request {req.request_id} is not finishing its prefill in the step "
                       "in flight")
    self._streamed.add(req)

  def drop_step(self) -> None:
    """As `_Scheduler.drop_step`; the requests streamed out of the dropped step join
    the copies out (their pages held until `release_handoff`), as at a step's end."""
    super().drop_step()
    streamed, self._streamed = self._streamed, set()
    self._running = [r for r in self._running if r not in streamed]
    self._transferring.update(dict.fromkeys(sorted(streamed, key=_seq)))

  def complete(self, step: Step, now: float) -> list[Request]:
    if step.decodes:
      raise RuntimeError("a prefill scheduler's step has no decodes")
    streamed, self._streamed = self._streamed, set()
    done, _ = self._advance(step, now, streamed)
    for r in self._running:
      if r in streamed:
        self._transferring[r] = None
      elif r.finish_time is None:
        self._handoffs.append(r)
    self._release(done)
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

  def detach_handoff(self) -> Optional[Request]:
    """The oldest hand-off leaves with its pages (see `detach_handoffs`)."""
    return self._handoffs.popleft() if self._handoffs else None

  def take_waiting(self) -> list[Request]:
    """Every queued request (none holds pages) leaves the queue, in order."""
    out = list(self._waiting)
    self._waiting.clear()
    return out

  def take_newest(self) -> Optional[Request]:
    """The most recently queued request (it holds no pages) leaves the queue."""
    return self._waiting.pop() if self._waiting else None

  def merge_waiting(self, reqs: Sequence[Request]) -> None:
    """Requests queued elsewhere join this queue: requests to recompute stay first,
    then the rest in arrival order."""
    merged = list(self._waiting) + list(reqs)
    merged.sort(key=lambda r: (r.num_recompute == 0, r.arrival_time))
    self._waiting = _Queue()
    self._waiting.extend(merged)

  @property
  def num_running(self) -> int:
    return len(self._running)

  @property
  def idle(self) -> bool:
    return not (self._waiting or self._running or self._handoffs or self._transferring)


class DecodeScheduler(_Scheduler):
  """Decode-only instance (DistServe's decode side, or semi-PD's decode phase).

  Requests arrive with their prefill done and a token sampled. In disaggregated
  mode the instance pulls: `can_accept` says whether it has pages for the request
  (its KV and the next token, or its whole life under "reserve"), `reserve` takes
  them (the target of the KV copy), and `admit` puts the request in the queue once
  the copy is done. Steps decode up to `max_batch` admitted requests, FCFS; the
  rest wait with their pages held. Requests preempted here leave through
  `take_preempted` to be recomputed by a prefill scheduler.

  With a prefix cache on its pool, `reserve` maps the cached pages of the request's
  prompt: the copy moves only the other pages (`copy_skip` of them are in place),
  and `admit` registers the copied prompt pages, so later hand-offs sharing the
  prefix move less.

  With `local_prefill` (conditional disaggregation), prompts the coordinator sends
  here (`add_local`) are prefilled in chunks within `max_step_tokens` beside the
  decodes, Sarathi-Serve's way, from their cached prefix on; they then decode here.
  """

  def __init__(self, allocator: PageAllocator, max_batch: int,
               page_policy: str = "on_demand", max_decode_tokens: Optional[int] = None,
               local_prefill: bool = False, max_step_tokens: int = 4096):
    super().__init__(allocator, page_policy, max_decode_tokens)
    if local_prefill and max_decode_tokens is not None:
      raise ValueError("local prefill (conditional disaggregation) and a decode token cap "
                       "(max_decode_tokens) do not combine")
    check_limit("max_batch", max_batch)
    self.max_batch = max_batch
    self.local_prefill = local_prefill
    if local_prefill and max_step_tokens < max_batch + 1:
      raise ValueError(f"local prefill needs max_step_tokens={max_step_tokens} > "
                       f"max_batch={max_batch}, or a full decode batch leaves no room")
    self.max_step_tokens = max_step_tokens
    self._reserved: dict[Request, int] = {}  # KV in flight -> pages already in place
    self._running: list[Request] = []
    self._preempted: list[Request] = []
    self._local: _Queue = _Queue()  # prompts to prefill here, FCFS
    self._prefilling: list[Request] = []
    self._leaving: dict[Request, None] = {}  # detached, their KV being copied out

  def _decoding(self):
    return self._running

  def _holders(self):
    return self._prefilling + self._running + list(self._waiting)

  def _drop(self, req):
    if req in self._running:
      self._running = [r for r in self._running if r is not req]
      return True
    if req in self._prefilling:
      self._prefilling.remove(req)
      return True
    if req in self._local:
      self._local.remove(req)
      return True
    return False

  def _requeue(self, req):
    self._preempted.append(req)

  def take_preempted(self) -> list[Request]:
    """Requests preempted since the last call; they hold no pages anywhere."""
    if not self._preempted:
      return []
    out, self._preempted = self._preempted, []
    return out

  def _tokens(self, req: Request) -> int:
    # Its KV (once prefilled, for a streamed copy that starts with the prefill) and
    # the next token's.
    return req.lifetime_tokens if self._lifetime else max(req.kv_len, req.prefill_len) + 1

  def _cached(self, req: Request) -> list[int]:
    """Pages of `req`'s prompt this pool's cache holds (all its full prompt pages
    may be mapped: a decode writes after them)."""
    keys = req.prefix_keys
    if not keys or not self.allocator.prefix_cache:
      return []
    return self.allocator.lookup(keys, len(keys))

  def check_fits(self, req: Request) -> None:
    """Raises ValueError when `req` could never fit this instance's KV pool."""
    check_fits(self.allocator, req, req.lifetime_tokens, "decode")

  def can_accept(self, req: Request) -> bool:
    tokens = self._tokens(req)
    if self._fits_now(req, tokens, True):
      return True
    # Cached pages only lower the need: look them up when the pool is short.
    hits = self._cached(req)
    return bool(hits) and self._fits_now(req, tokens, True, hits)

  def reserve(self, req: Request) -> None:
    """Allocates `req`'s pages here (see the class docstring); raises OutOfPages
    when `can_accept(req)` is false."""
    self.check_fits(req)
    if req in self._reserved or self.allocator.pages(req):
      raise ValueError(f"request {req.request_id} already holds pages here")
    hits = self._cached(req)
    self.allocator.admit(req, hits, self._tokens(req))
    self._reserved[req] = len(hits)

  def copy_skip(self, req: Request) -> int:
    """Leading pages of `req`'s KV already in place here (from the cache): a copy
    moves only the pages after them."""
    return self._reserved.get(req, 0)

  def can_adopt(self, req: Request) -> bool:
    """Whether `req`, holding its prefill's pages in this allocator (a hand-off of a
    prefill scheduler sharing it), can join the queue now: under "reserve" its
    pages must grow to its whole life."""
    return not self._lifetime or self._fits_now(req, req.lifetime_tokens, watermark=False)

  def adopt(self, req: Request) -> None:
    """`req` joins the queue with the pages it holds here (see `can_adopt`)."""
    if self._lifetime:
      self.allocator.ensure(req, req.lifetime_tokens)
    self.admit(req)

  def detach(self, req: Request) -> bool:
    """`req`, admitted here, leaves with its pages for another decode instance (a
    migration); False, changing nothing, while it is in the step in flight. Its
    pages are freed by `release_handoff` once its KV copy has landed."""
    if self._in_flight is not None and req in self._in_flight.requests:
      return False
    if not self._drop(req):
      self._waiting.remove(req)
    self._due_of.pop(req, None)
    self._recount = True
    self._settle()
    self._leaving[req] = None
    return True

  @property
  def admitted(self) -> list[Request]:
    """Requests in the batch, then those queued for it."""
    return self._running + list(self._waiting)

  def release_handoff(self, req: Request) -> None:
    """The KV copy of a detached `req` landed: its pages here are freed."""
    del self._leaving[req]
    self.allocator.free(req)

  def cancel_reserved(self, req: Request) -> None:
    """The copy into `req`'s reserved pages finished but the request was cancelled
    meanwhile: the pages are freed (only now: the copy wrote into them)."""
    del self._reserved[req]
    self.allocator.free(req)

  def admit(self, req: Request) -> None:
    """`req`'s KV is in place (copied into reserved pages, or shared in semi-PD):
    it joins the decode queue."""
    if req in self._reserved:
      del self._reserved[req]
    else:
      need = req.lifetime_tokens if self._lifetime else req.prefill_len
      if len(self.allocator.pages(req)) < pages_for(need, self.allocator.page_size):
        raise ValueError(f"request {req.request_id} holds too few pages here; reserve() "
                         "it first")
    if not req.prefill_done or req.num_output < 1 or req.done:
      raise ValueError(f"request {req.request_id} is not ready to decode "
                       f"(prefilled {req.num_prefilled}/{req.prefill_len}, "
                       f"output {req.num_output}/{req.max_tokens})")
    if req.prefix_keys is not None:
      self.allocator.commit(req, req.prefix_keys, req.prompt_len)
    req.admitted_seq = next(_admissions)
    self._waiting.append(req)

  # -- local prefill (conditional disaggregation) ------------------------------------

  def add_local(self, req: Request) -> None:
    """Queues a fresh request to be prefilled here."""
    self._check_local()
    _check_fresh(req)
    self.check_fits(req)
    self._local.append(req)

  def requeue_local(self, req: Request) -> None:
    """A preempted request joins the front of the local queue to recompute."""
    self._check_local()
    if req.num_prefilled or not req.num_preemptions:
      raise ValueError(f"request {req.request_id} was not preempted")
    self._local.appendleft(req)

  def _check_local(self) -> None:
    if not self.local_prefill:
      raise RuntimeError("this decode scheduler does not prefill (local_prefill=False)")

  def pending_prefill_tokens(self) -> int:
    return self._local.tokens + _left(self._prefilling)

  # -- steps --------------------------------------------------------------------------

  def schedule(self) -> Optional[Step]:
    self._check_schedulable()
    waiting = self._waiting
    room = self.max_batch - len(self._running) - len(self._prefilling)
    if waiting and room > 0:
      joined = [waiting.popleft() for _ in range(min(room, len(waiting)))]
      self._running = self._running + joined
      self._ctx += _context(joined)
      for r in joined:
        self._track(r)
    if self.max_decode_tokens is not None:
      batch = self._capped_batch(self._running) if self._running else []
      return self._begin(Step([], batch)) if batch else None
    self._grow_due()
    chunks = []
    if self._local or self._prefilling:
      chunks = _chunks(self, self._local, self.max_step_tokens - len(self._running),
                       len(self._running))
    self._settle()
    if not chunks and not self._running:
      return None
    return self._begin(Step(chunks, self._running, self._ctx))

  # -- back-to-back decode steps (the simulator's fast path) ---------------------------

  def steady(self) -> int:
    """How many steps, the one in flight first, would each complete finishing nobody
    and be followed by `schedule()` beginning the same batch with nothing else to
    decide (nothing joins, grows, is prefilled here, preempted or recounted), if
    nothing else happened meanwhile."""
    step = self._in_flight
    if step is None or step.prefills or step.decodes is not self._running \
        or (self._waiting and len(self._running) < self.max_batch) or self._local \
        or self._prefilling or self._recount or self._preempted or not self._running \
        or self.max_decode_tokens is not None:
      return 0
    # `schedule` after the i-th of them grows the pages due at `now + i - 1`.
    now, due = self._decode_steps, self._due
    if now in due:
      return 0
    if self._steady_for is not step.decodes:
      # Kept while the batch stays: each step adds one to both `now` and every
      # request's output. Requests are cancelled through `remove`, which recounts.
      self._finish_at = now + min(
          [r.max_tokens - r.num_output if r.end_reason is None and not r.stopped else 0
           for r in step.decodes])
      self._steady_for = step.decodes
    end = self._finish_at - 1
    g = max(self._grow_from, now + 1)
    while g < end and g not in due:
      g += 1
    self._grow_from = g
    return max(min(end, g) - now, 0)

  def skip(self, times: Sequence[float]) -> Step:
    """Completes the step in flight at `times[0]` and the steps `schedule` would
    begin after it at the later times, as `complete` and `schedule` would (at most
    `steady()` of them), and begins the next: returned."""
    k, running = len(times), self._running
    for r in running:
      r.num_output += k
      r.token_times.extend(times)
    self._ctx += k * len(running)
    self._decode_steps += k - 1  # `_begin` counts the last
    self._in_flight = None
    return self._begin(Step([], running, self._ctx))

  def complete(self, step: Step, now: float) -> list[Request]:
    if step.prefills and not self.local_prefill:
      raise RuntimeError("a decode scheduler's step has no prefills")
    done, gone = self._advance(step, now)
    self._ctx += len(step.decodes) - gone
    if self.max_decode_tokens is not None:
      self._running = self._rotate(self._running, step)
    if step.prefills:
      self._release(done)
      self._running = _after_chunks(self, step, done, self._running)
    elif done:
      self._release(done)
      self._running = [r for r in self._running if r.finish_time is None]
    self._settle()
    return done

  def held(self) -> list[Request]:
    return list(dict.fromkeys(super().held() + list(self._local)))

  @property
  def num_waiting(self) -> int:
    """Requests reserved (KV in flight), admitted but not yet in the batch, or queued
    to prefill here."""
    return len(self._reserved) + len(self._waiting) + len(self._local)

  @property
  def num_running(self) -> int:
    return len(self._running) + len(self._prefilling)

  @property
  def idle(self) -> bool:
    return not (self._reserved or self._waiting or self._running or self._local
                or self._prefilling)


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
