"""`Engine`: serves a model as a `deploy` deployment says, with real programs.

    engine = Engine(model, deploy.Disaggregated(prefill=InstanceSpec(tp=2), ...))

The deployment (colocated, disaggregated or semi-PD: the same type the simulator
and the planner use) decides the instances and their batch limits; the mode's
coordinator (`core.coordinator`) decides everything between them; the JAX
executor (`serving.executor`) runs the steps. This module owns only the thread
that feeds them events and the caller's side: checking requests, handles,
abort, the admission limit, and ending every request exactly once.

One engine thread owns the coordinator, its schedulers and allocators. It sleeps
on its inbox and handles one event at a time: a submission, a step or KV copy
that finished (posted by the executor's watcher threads), a failed launch, an
abort. Bad requests are rejected at `submit` with a ValueError or TypeError naming
the field, and never reach the engine thread. An error in one step ends that
step's requests with the error; the engine goes on serving the others. If the
thread itself dies, every request it holds, queued ones included, ends at once
with the error.

Pipeline-parallel instances (pp > 1) run as the simulator models them: pp virtual
engines per replica, each with 1/pp of the pool, their calls in flight through the
stages at once. A disaggregated deployment may stream KV layer by layer during the
prefill and move instances between roles (`Disaggregated.kv_transfer`, `elastic`);
both need the instances in this process. Limits: SM-partitioned semi-PD runs in the
simulator only, and is refused here with the reason.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import queue
import threading
import time
from typing import Dict, Iterator, List, Optional, Sequence, Union

import numpy as np

from pdserve_jax.core import coordinator as C
from pdserve_jax.core import deploy, metrics, seam
from pdserve_jax.core import sampling as validate
from pdserve_jax.core.pages import PageAllocator
from pdserve_jax.core.prefix import block_tokens, token_keys
from pdserve_jax.core.request import Request
from pdserve_jax.core.sampling import SamplingParams
from pdserve_jax.serving.config import EngineConfig, check_servable, max_prompt_len
from pdserve_jax.serving.executor import JaxExecutor, Placement, wall_clock
from pdserve_jax.serving.output import Delta, RequestOutput


class EngineOverloaded(RuntimeError):
  """`submit` found the engine holding `max_queued` unfinished requests."""


class EngineUnavailable(RuntimeError):
  """No instance is left that can serve a request (every one of a role is lost);
  the engine takes requests again once instances come back."""


@dataclasses.dataclass
class Completion:
  """One continuation of a prompt."""
  index: int  # which of the request's n samples
  token_ids: List[int]
  text: Optional[str]  # None when the model has no tokenizer; cut before a stop string
  finish_reason: str  # "stop", "length" or "aborted"
  token_times: List[float]  # seconds on the engine clock, one per token
  logprobs: Optional[List[float]] = None  # with SamplingParams.logprobs set
  top_logprobs: Optional[List[Dict[int, float]]] = None  # with logprobs >= 1
  stop_reason: Union[int, str, None] = None  # the stop id or string that ended it
  num_preemptions: int = 0


@dataclasses.dataclass
class Result:
  """A finished request: its prompt and its n completions (`outputs`).

  With n = 1 the completion's fields read directly off the result (`result.text`,
  `result.token_ids`, ...); with n > 1 they raise, naming `outputs`.
  """
  request_id: int
  prompt: List[int]
  prompt_text: Optional[str]
  arrival_time: float
  finish_time: float
  outputs: List[Completion]

  def _only(self) -> Completion:
    if len(self.outputs) != 1:
      raise ValueError(f"request {self.request_id} has n={len(self.outputs)} completions; "
                       "read result.outputs[i]")
    return self.outputs[0]

  token_ids = property(lambda self: self._only().token_ids)
  text = property(lambda self: self._only().text)
  finish_reason = property(lambda self: self._only().finish_reason)
  token_times = property(lambda self: self._only().token_times)
  logprobs = property(lambda self: self._only().logprobs)
  top_logprobs = property(lambda self: self._only().top_logprobs)
  num_preemptions = property(lambda self: self._only().num_preemptions)

  @property
  def ttft(self) -> Optional[float]:
    """First token of the first completion to produce one, minus arrival."""
    firsts = [c.token_times[0] for c in self.outputs if c.token_times]
    return min(firsts) - self.arrival_time if firsts else None

  @property
  def tpot(self) -> Optional[float]:
    times = self._only().token_times
    n = len(times)
    return (times[-1] - times[0]) / (n - 1) if n > 1 else None


def _completion(req: Request, index: int) -> Completion:
  out, reason = req.payload, req.finish_reason
  assert reason is not None, f"request {req.request_id} has not finished"
  k = out.params.logprobs
  return Completion(index, list(out.tokens), out.text(), reason,
                    list(req.token_times), list(out.logprobs) if k is not None else None,
                    list(out.top_logprobs) if k else None, out.stop_reason,
                    req.num_preemptions)


class RequestHandle:
  """A submitted request: iterate for token ids as they come (n = 1), wait for
  `result()`, or `cancel()` it. Each ends when the request does, whatever ends it."""

  def __init__(self, reqs: List[Request], engine: "Engine", prompt_text: Optional[str]):
    self._reqs, self._engine, self._prompt_text = reqs, engine, prompt_text

  @property
  def _req(self) -> Request:
    return self._reqs[0]

  @property
  def request_id(self) -> int:
    return self._req.request_id

  @property
  def prompt(self) -> List[int]:
    """The prompt's token ids."""
    return list(self._req.payload.prompt)

  @property
  def done(self) -> bool:
    """Whether every completion has ended (finished, aborted or failed)."""
    return all(r.payload.finished.is_set() for r in self._reqs)

  def __iter__(self) -> Iterator[int]:
    """Token ids as they come (n = 1); raises the request's error if it failed."""
    for d in self.deltas():
      if d.token is not None:
        yield d.token

  def deltas(self) -> Iterator[Delta]:
    """`serving.output.Delta`s as they come (n = 1): each token with the text it
    releases and its log-probabilities. Iterate a handle once, one way or the other."""
    if len(self._reqs) != 1:
      raise TypeError(f"request {self.request_id} has n={len(self._reqs)} completions; "
                      "stream one at a time with n=1, or wait for result()")
    return self._req.payload.deltas()

  @property
  def arrival_time(self) -> float:
    return self._req.arrival_time

  def wait(self, timeout: Optional[float] = None) -> bool:
    """Waits until every completion ended, however; False after `timeout` seconds."""
    deadline = None if timeout is None else time.monotonic() + timeout
    for r in self._reqs:
      left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
      if not r.payload.finished.wait(left):
        return False
    return True

  def outcomes(self) -> List[str]:
    """Once done, how each completion ended: "stop", "length", "aborted" or
    "failed" (an error, or refused by the engine thread)."""
    out = []
    for r in self._reqs:
      if r.payload.error is not None or r.end_reason == "error":
        out.append("failed")
      else:
        out.append(r.finish_reason or "aborted")
    return out

  def token_times(self) -> List[List[float]]:
    """Each completion's token times (engine clock)."""
    return [list(r.token_times) for r in self._reqs]

  def cancel(self) -> bool:
    """Aborts the request (see `Engine.abort`); False when it had already ended."""
    return any([self._engine.abort(r.request_id) for r in self._reqs])

  def result(self, timeout: Optional[float] = None) -> Result:
    """Raises the request's error if it failed, TimeoutError if still running."""
    deadline = None if timeout is None else time.monotonic() + timeout
    for r in self._reqs:
      left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
      if not r.payload.finished.wait(left):
        raise TimeoutError(f"request {r.request_id} not finished after {timeout} s")
      if r.payload.error is not None:
        raise r.payload.error
    first = self._req
    return Result(first.request_id, first.payload.prompt, self._prompt_text,
                  first.arrival_time, max(r.finish_time or 0.0 for r in self._reqs),
                  [_completion(r, i) for i, r in enumerate(self._reqs)])


@dataclasses.dataclass
class WorkloadReport:
  results: List[Result]
  requests: List[Request]  # with their token times, for metrics
  summary: dict
  share_history: List[tuple]
  wall_seconds: float


class Engine:
  """Serves `model` as `deployment` says; see the module docstring."""

  def __init__(self, model, deployment=None, config: Optional[EngineConfig] = None,
               placement: Optional[Placement] = None):
    """`model`: a `Model`, or with a `placement` of worker processes anything with its
    `config`, `tokenizer` and `eos_token_ids` (`model.card.ModelCard`). `placement`
    says where instances run: this process's devices by default
    (`serving.local.LocalPlacement`), or worker processes (`cluster.router`)."""
    config = config or EngineConfig()
    deployment = deployment or deploy.Colocated(deploy.InstanceSpec(max_batch=16,
                                                                    max_step_tokens=512))
    if isinstance(deployment, EngineConfig):
      raise TypeError("Engine(model, deployment, config): pass a deployment "
                      "(pdj.Colocated, pdj.Disaggregated, pdj.SemiPD) before the config")
    config.check()
    if not model.config.executable:
      raise ValueError(f"model {model.config.name!r} ({model.config.arch}) cannot be served")
    if placement is None:
      from pdserve_jax.serving.local import LocalPlacement  # loads jax

      placement = LocalPlacement(model, config.attn_impl)
    check_servable(deployment, model.config, placement.device_count)
    self.model, self.deployment, self.config = model, deployment, config
    self.tokenizer = model.tokenizer
    self._seeds = np.random.default_rng()  # OS entropy: fresh seeds per engine
    self.max_prompt_len = max_prompt_len(deployment, config)
    self.clock = wall_clock(time.perf_counter())
    self._inbox: "queue.Queue[seam.Event]" = queue.Queue()
    self.executor: seam.EngineExecutor = JaxExecutor(placement, config, self.clock,
                                                     self._inbox.put)
    try:
      self.coordinator = C.build(deployment, self.executor, config.ttft_slo,
                                 config.tpot_slo, start_time=self.clock(), on_end=self._ended)
      if config.warmup:
        self.executor.warmup()
    except BaseException:
      self.executor.close()  # no thread of a half-built engine is left running
      raise
    self.step_log: List[seam.StepRecord] = []
    self.event_log: List[tuple] = []  # (kind, request id, engine time), with log_steps
    if config.log_steps:
      self.executor.log = self.step_log
    self._ids = itertools.count()
    self._lock = threading.Lock()  # guards the state below against submit/close races
    self._live: Dict[int, Request] = {}  # submitted, not ended
    self._closing = False
    self._error: Optional[BaseException] = None
    self._end_errors: Dict[int, BaseException] = {}  # why requests ending now fail
    self._losses: Dict[str, BaseException] = {}  # lost instances (until back): why
    self.counts = {"finished": 0, "aborted": 0, "failed": 0, "rejected": 0}
    self._thread = threading.Thread(target=self._loop, name="pdserve-engine", daemon=True)
    self._thread.start()

  # -- the caller's side -----------------------------------------------------

  def submit(self, prompt: Union[str, Sequence[int]],
             sampling: Optional[SamplingParams] = None,
             arrival_time: Optional[float] = None) -> RequestHandle:
    """Queues one prompt (text, when the model has a tokenizer, or token ids) for
    `sampling.n` completions. Raises at once, changing nothing: ValueError or
    TypeError naming a bad field, EngineOverloaded beyond `max_queued` unfinished
    requests, RuntimeError once the engine is closed or has failed."""
    return self._enqueue([self._prepare(prompt, sampling)], arrival_time)[0]

  def _prepare(self, prompt, sampling) -> tuple:
    """Checks one prompt and its params; returns what `_enqueue` needs."""
    params = validate.check_sampling(sampling or SamplingParams(),
                                     self.model.config.vocab_size)
    prompt_text, ids = self._prompt_ids(prompt)
    if len(ids) + params.max_tokens > self.config.max_seq_len:
      raise ValueError(f"prompt ({len(ids)}) + max_tokens ({params.max_tokens}) exceeds "
                       f"max_seq_len={self.config.max_seq_len}")
    if params.stop and self.tokenizer is None:
      raise ValueError("stop: stop strings need a tokenizer and this model has none; "
                       "use stop_token_ids")
    return prompt_text, ids, params

  def _enqueue(self, prepared: List[tuple], arrival_time=None) -> List[RequestHandle]:
    """Queues checked prompts, all or none."""
    detokenize = self.tokenizer.decode if self.tokenizer is not None else None
    with self._lock:
      if self._error is not None:
        raise RuntimeError(f"engine failed: {self._error!r}")
      if self._closing:
        raise RuntimeError("engine is closed")
      unservable = self._unservable()
      if unservable is not None:
        raise unservable
      n = sum(params.n for _, _, params in prepared)
      if len(self._live) + n > self.config.max_queued:
        raise EngineOverloaded(
            f"engine overloaded: {len(self._live)} requests unfinished, the limit "
            f"(max_queued) is {self.config.max_queued}; these {n} would exceed it. "
            "Retry later or raise max_queued")
      when = self.clock() if arrival_time is None else arrival_time
      groups = []
      for prompt_text, ids, params in prepared:
        if params.seed is None:  # fresh seeds, drawn under the lock: callers may race
          seeds = self._seeds.integers(validate.SEED_LIMIT, size=params.n).tolist()
        else:
          seeds = [(params.seed + i) % validate.SEED_LIMIT for i in range(params.n)]
        eos = () if params.ignore_eos else self.model.eos_token_ids
        stop_ids = frozenset(params.stop_token_ids) | frozenset(eos)
        keys = token_keys(ids, self.config.page_size) if self.config.prefix_cache else None
        reqs = [Request(next(self._ids), len(ids), params.max_tokens, when,
                        payload=RequestOutput(ids, dataclasses.replace(params, seed=seed),
                                              stop_ids, detokenize), prefix_keys=keys)
                for seed in seeds]
        # Pool sizes never change, so this thread may read them.
        self.coordinator.check(reqs[0])
        groups.append((reqs, prompt_text))
      for reqs, _ in groups:
        for req in reqs:
          self._live[req.request_id] = req
          self._inbox.put(seam.Submit(req))
    return [RequestHandle(reqs, self, text) for reqs, text in groups]

  def _prompt_ids(self, prompt) -> tuple[Optional[str], List[int]]:
    """(the prompt's text or None, its checked token ids)."""
    text = None
    if isinstance(prompt, str):
      if self.tokenizer is None:
        raise TypeError("prompt is a str but the model has no tokenizer: pass token ids, "
                        "or load the model from a folder with a tokenizer.json")
      text, prompt = prompt, self.tokenizer.encode(prompt)
    return text, validate.check_prompt(prompt, self.model.config.vocab_size,
                                       self.max_prompt_len)

  def prompt_ids(self, prompt: Union[str, Sequence[int]]) -> List[int]:
    """The token ids `submit` would serve for `prompt`, checked (ValueError or
    TypeError naming what is wrong)."""
    return self._prompt_ids(prompt)[1]

  def prompt_logprobs(self, prompt: Union[str, Sequence[int]]) -> tuple:
    """(the prompt's checked token ids, `runtime.rows.PromptLogprobs` of them): each
    token's log-probability given those before it, by one forward pass on a serving
    instance's weights (what `echo` with logprobs returns). Blocks until done; call
    it from any thread but the engine's."""
    if self._error is not None or self._closing:
      raise RuntimeError("engine is closed" if self._closing else
                         f"engine failed: {self._error!r}")
    _, ids = self._prompt_ids(prompt)
    return ids, self.executor.prompt_logprobs(ids)

  def abort(self, request_id: int) -> bool:
    """Ends a request wherever it is, with finish reason "aborted", freeing its pages
    on every mesh. Returns False when it had already ended (or never existed)."""
    with self._lock:
      req = self._live.get(request_id)
      if req is None or self._error is not None:
        return False
      self._inbox.put(seam.Abort(req))
    return True

  def generate(self, prompts: Sequence[Union[str, Sequence[int]]],
               sampling: Union[SamplingParams, Sequence[SamplingParams], None] = None,
               timeout: Optional[float] = None) -> List[Result]:
    """Serves a batch of prompts (strs or token-id lists; one str is one prompt);
    results in prompt order. If any prompt is refused, none is queued."""
    if isinstance(prompts, str):
      prompts = [prompts]
    prompts = list(prompts)
    if prompts and validate.is_int(prompts[0]):
      raise TypeError("prompts must be a list of prompts (strs or token-id lists); wrap a "
                      "single token-id prompt in a list")
    per_prompt: Sequence[Optional[SamplingParams]]
    if sampling is None or isinstance(sampling, SamplingParams):
      per_prompt = [sampling] * len(prompts)
    else:
      per_prompt = sampling
    if len(per_prompt) != len(prompts):
      raise ValueError(f"{len(per_prompt)} SamplingParams for {len(prompts)} prompts")
    handles = self._enqueue([self._prepare(p, s) for p, s in zip(prompts, per_prompt)])
    return [h.result(timeout) for h in handles]

  def run_workload(self, requests: Sequence[Request],
                   sampling: Optional[SamplingParams] = None, seed: int = 0,
                   timeout: Optional[float] = None) -> WorkloadReport:
    """Replays `requests` (arrival offsets in seconds, prompt_len, max_tokens; the
    prompt's token ids in `payload` if given, else made from its `blocks` if given
    (`core.prefix.block_tokens`: shared blocks give shared tokens), else random
    ones) on the wall clock.
    By default each request decodes its `max_tokens` (greedy, EOS ignored), as
    serving benchmarks do, so the workload's output lengths hold."""
    if not requests:
      raise ValueError("empty workload")
    base = sampling or SamplingParams(ignore_eos=True)
    rng = np.random.default_rng(seed)
    vocab = self.model.config.vocab_size
    plan = []
    for r in sorted(requests, key=lambda r: r.arrival_time):
      if r.payload is not None:
        prompt = r.payload
      elif r.blocks is not None:
        prompt = block_tokens(r.blocks, r.prompt_len, vocab, seed)
      else:
        prompt = rng.integers(0, vocab, r.prompt_len)
      params = dataclasses.replace(base, max_tokens=r.max_tokens)
      plan.append((r.arrival_time, list(prompt), params))
    start = self.clock()
    handles = []
    for offset, prompt, params in plan:
      delay = start + offset - self.clock()
      if delay > 0:
        time.sleep(delay)
      handles.append(self.submit(prompt, params, arrival_time=start + offset))
    results = [h.result(timeout) for h in handles]
    reqs = [r for h in handles for r in h._reqs]
    cfg = self.config
    return WorkloadReport(results, reqs, metrics.summarize(reqs, cfg.ttft_slo, cfg.tpot_slo),
                          self.share_history, self.clock() - start)

  @property
  def share_history(self) -> List[tuple]:
    """semi-PD with a partitioner: (time, prefill share) at the start and at every
    change (the first replica's)."""
    hist = self.coordinator.share_history()
    return list(next(iter(hist.values()))) if hist else []

  @property
  def failure(self) -> Optional[BaseException]:
    """What stopped the engine thread, or None while it serves."""
    return self._error

  def allocators(self) -> List[PageAllocator]:
    return self.coordinator.allocators()

  def pages_in_use(self) -> int:
    return sum(a.capacity - a.num_free for a in self.allocators())

  def stats(self) -> dict:
    """Requests ended by kind, preemptions, unfinished requests, pages in use (held
    by requests; cached pages nobody holds count as free), and the prefix cache's
    counters as `prefix_*` (`Coordinator.prefix_stats`: lookups and hits in
    admissions and tokens, hit rates, evictions, cached pages, arrivals routed by
    the cache, local prefills, KV pages copied and saved); with elastic roles, the
    instances serving each phase (`elastic_prefill`, `elastic_decode`, as of the
    last completed move) and the moves completed (`elastic_moves`). Read between
    steps; counters may lag by the step in flight."""
    with self._lock:
      live = len(self._live)
    prefix = {f"prefix_{k}": v for k, v in self.coordinator.prefix_stats().items()}
    return dict(self.counts, preemptions=self.coordinator.num_preemptions, unfinished=live,
                pages_in_use=self.pages_in_use(), **prefix, **self.coordinator.role_stats())

  def close(self, timeout: Optional[float] = None) -> None:
    """Stops taking requests and serves those in flight; after `timeout` seconds
    (None: no limit) aborts what is left. Returns once the engine thread ended."""
    with self._lock:
      if self._closing:
        already = True
      else:
        already, self._closing = False, True
        self._inbox.put(seam.Close(None if timeout is None else self.clock() + timeout))
    if not already or self._thread.is_alive():
      self._thread.join()
    self.executor.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  # -- the engine thread -----------------------------------------------------

  def _ended(self, req: Request, now: float) -> None:
    """The coordinator ended `req`: finished, aborted, or failed."""
    out = req.payload
    reason = req.end_reason
    if reason == "error":
      self.counts["failed"] += 1
      out.end(out.error or self._end_errors.get(req.request_id) or self._unservable()
              or RuntimeError(f"request {req.request_id} failed"))
    else:
      self.counts["aborted" if reason == "aborted" else "finished"] += 1
      out.end()
    with self._lock:
      self._live.pop(req.request_id, None)

  def _handle(self, event: seam.Event) -> None:
    coord, ex = self.coordinator, self.executor
    if isinstance(event, seam.Submit):
      req, now = event.request, self.clock()
      if self.config.log_steps:
        self.event_log.append(("arrival", req.request_id, now))
      try:
        coord.add(req, now)
      except ValueError as e:
        self.counts["rejected"] += 1
        req.finish_time, req.end_reason = now, "error"
        # An instance was lost since `submit` checked?
        req.payload.end(self._unservable() or e)
        with self._lock:
          self._live.pop(req.request_id, None)
    elif isinstance(event, seam.StepDone):
      inst = event.instance
      if inst.step is None:
        return  # its instance was lost meanwhile, and the step ended with it
      try:
        now, seconds = ex.collect(inst)
      except Exception as e:  # noqa: BLE001 - one step's failure ends its requests only
        self._fail(inst, e)
        return
      coord.step_done(inst, now, seconds)
    elif isinstance(event, seam.StepFailed):
      self._fail(event.instance, event.error)
    elif isinstance(event, seam.InstanceLost):
      self._lose(event.instance, event.error)
    elif isinstance(event, seam.InstanceBack):
      logging.warning("instance %s is back", event.instance.name)
      self._losses.pop(event.instance.name, None)
      coord.readmit(event.instance, self.clock())
    elif isinstance(event, seam.CopyDone):
      now, req = self.clock(), event.request
      if self.config.log_steps:
        self.event_log.append(("copy", req.request_id, now))
      if event.error is None:
        coord.copy_done(req, now)
      else:
        logging.warning("request %d: %s; recomputing it", req.request_id, event.error)
        self._ending_with(event.error, [req], lambda: coord.copy_done(req, now, failed=True))
    elif isinstance(event, seam.Abort):
      coord.abort(event.request, self.clock(), event.reason)
    else:
      raise TypeError(f"unknown engine event {event!r}")

  def _fail(self, inst, error: BaseException) -> None:
    """A step could not run or be read: its requests end with the error; if the
    instance's pool went with it, so do the other requests whose KV was there."""
    ex, coord = self.executor, self.coordinator
    if inst.step is None:
      return  # already ended (its instance was lost)
    ex.fail_step(inst, error)
    now = self.clock()
    coord.fail(inst, now)
    for r in ex.recover_pool(inst):
      coord.abort(r, now, "error")

  def _lose(self, inst, error: BaseException) -> None:
    """`inst`'s devices are gone: the coordinator recomputes its requests elsewhere
    or ends them with an error naming it."""
    if inst.lost:
      return
    logging.error("instance %s lost: %s", inst.name, error)
    self.executor.drop_step(inst)
    lost = self._losses[inst.name] = RuntimeError(f"instance {inst.name} was lost: {error}")
    with self._lock:
      live = list(self._live.values())  # any request the loss ends, it ends for this
    self._ending_with(lost, live, lambda: self.coordinator.lose(inst, self.clock()))

  def _ending_with(self, error: BaseException, reqs, act) -> None:
    """Runs `act()`; those of `reqs` it ends with an error (and no error of their
    own) carry `error`; the others go on (recomputed elsewhere)."""
    self._end_errors = {r.request_id: error for r in reqs}
    try:
      act()
    finally:
      self._end_errors = {}

  def _unservable(self) -> Optional[EngineUnavailable]:
    """Why no request can be served now, naming the lost instances; None if one can.
    (The error of requests that end for want of an instance, after the loss.)"""
    blocked = self.coordinator.unservable()
    if blocked is None:
      return None
    why = "; ".join(str(e) for e in list(self._losses.values()))  # other threads read it
    return EngineUnavailable(f"no instance can serve: {blocked}" + (f" ({why})" if why else ""))

  def pages_held(self) -> Dict[str, int]:
    """Per instance, the KV pages its requests hold now (semi-PD's two phases report
    their shared pool). Read from any thread: counters only, they may lag a step."""
    return {i.name: i.sched.allocator.capacity - i.sched.allocator.num_free
            for i in self.coordinator.instances}

  def unavailable(self) -> Optional[str]:
    """Why the engine cannot take a request now (failed, closed, or no instance left
    of a role it needs), or None when it can."""
    if self._error is not None:
      return f"engine failed: {self._error!r}"
    if self._closing:
      return "engine is closed"
    unservable = self._unservable()
    return None if unservable is None else str(unservable)

  def health(self) -> dict:
    """{instance name: "ok" or "lost"}."""
    return {i.name: "lost" if i.lost else "ok" for i in self.coordinator.instances}

  def _loop(self) -> None:
    deadline, closing = None, False
    try:
      while True:
        with self._lock:
          if closing and not self._live:
            return
        wait = None if deadline is None else max(deadline - self.clock(), 0.0)
        try:
          event = self._inbox.get(timeout=wait)
        except queue.Empty:
          # Past the close deadline: abort what is left, then let it drain.
          with self._lock:
            left = list(self._live.values())
          for req in left:
            self._inbox.put(seam.Abort(req))
          deadline = None
          continue
        if isinstance(event, seam.Close):
          closing, deadline = True, event.deadline
          continue
        self._handle(event)
    except BaseException as e:  # noqa: BLE001 - no caller may be left waiting
      logging.exception("pdserve engine thread failed; ending every request it held")
      with self._lock:
        self._error = e
        for req in self._live.values():
          req.payload.end(RuntimeError(f"engine failed: {e!r}"))
        self._live.clear()
