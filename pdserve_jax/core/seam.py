"""The seam between the decisions and whatever carries them out.

A coordinator (`core.coordinator`) decides; an executor carries its decisions out
and reports back. Two Protocols name every call across the seam:

  `Executor`        what a coordinator calls (build a pool, launch a step, start a
                    KV copy) and `bind`, which hands the executor the coordinator it
                    reports to. The simulator's `LatencyExecutor`, the engine's
                    `JaxExecutor` (local or worker-process runners) and the tests'
                    hand-driven executor implement it.
  `EngineExecutor`  an `Executor` the engine loop also drives: it compiles, reads a
                    finished step's tokens, recovers from a failed step, closes.

Executors report back by calling the coordinator's entry points (`step_done`,
`copy_done`, `resume`, ...) directly (the simulator, on its virtual clock) or by
posting `Event`s to the engine's inbox, which the one engine thread handles in order.
The simulator alone also calls `repeat` and `skip` for the decode instances the
coordinator `repeats`: `step_done` and the launch of the next step in one, for steps
it runs back to back (`sim.simulator`).
The events are frozen records, one type per kind, so the inbox carries nothing else.

No jax here: `make lint` type-checks this folder and the executors against it.
"""

from __future__ import annotations

import dataclasses
from typing import (TYPE_CHECKING, Any, Callable, List, Optional, Protocol, Sequence, Tuple,
                    Union)

if TYPE_CHECKING:
  from pdserve_jax.core.coordinator import Coordinator, Instance
  from pdserve_jax.core.deploy import InstanceSpec
  from pdserve_jax.core.pages import PageAllocator
  from pdserve_jax.core.request import Request
  from pdserve_jax.core.step import Step


class Executor(Protocol):
  """What a coordinator calls on its executor."""

  def allocator(self, group: str, spec: InstanceSpec, fraction: float) -> PageAllocator:
    """A page allocator over `fraction` of a pool on device group `group` (whose
    instances run `spec`); called while the coordinator builds its instances."""
    ...

  def bind(self, coordinator: Coordinator) -> None:
    """The coordinator is built: the executor learns its instances and whom to report
    to."""
    ...

  def can_launch(self, inst: Instance, now: float) -> bool:
    """Whether `inst`'s devices can take a step now; if not, the executor calls the
    coordinator's `resume(inst, now)` when they can."""
    ...

  def launch(self, inst: Instance, step: Step, now: float) -> None:
    """Runs `step` on `inst`; later `step_done(inst, now, seconds)` (or, on the
    engine, a `StepDone` / `StepFailed` event). Each of `step.streams` (request,
    decode instance) is a KV copy that starts with the step, layer group by layer
    group as the step writes them; later `copy_done(request, now)` (or a `CopyDone`
    event) once the last group landed or the copy failed, before or after the
    step's end, even when the step fails."""
    ...

  def start_copy(self, req: Request, src: Instance, dst: Instance, now: float) -> None:
    """Moves `req`'s KV from `src`'s pool to `dst`'s; later `copy_done(req, now)`
    (or a `CopyDone` event)."""
    ...


@dataclasses.dataclass(frozen=True)
class StepRecord:
  """One finished step as it ran: which instance, when (engine clock, seconds; the end
  is when the engine saw it done), the shape bucket of each program call, (tokens,)
  for packed calls and (batch,) for decode calls, and what it computed
  (`Step.describe`)."""
  instance: str
  started: float
  finished: float
  packed_calls: tuple
  decode_calls: tuple
  work: tuple = ((), ())


class EngineExecutor(Executor, Protocol):
  """An executor the engine loop drives: real programs on real devices, local or in
  worker processes."""

  #: Devices this executor can place instances on, or None when it cannot tell
  #: (instances in other processes); the engine refuses deployments beyond it.
  device_count: Optional[int]
  #: Appends a `StepRecord` per finished step when set to a list.
  log: Optional[List[StepRecord]]

  def warmup(self) -> None:
    """Compiles every program and KV copy the bound instances will run."""
    ...

  def collect(self, inst: Instance) -> Tuple[float, float]:
    """Reads the finished step of `inst` into its requests (tokens, stop marks);
    returns (when it was seen done, its seconds). Raises if the step failed."""
    ...

  def fail_step(self, inst: Instance, error: BaseException) -> None:
    """The step of `inst` could not run or be read: its requests carry the error."""
    ...

  def drop_step(self, inst: Instance) -> None:
    """`inst`'s devices are gone: its step in flight is forgotten (no result comes)."""
    ...

  def recover_pool(self, inst: Instance) -> List[Request]:
    """After a failed step: if `inst`'s pool was lost with it, a fresh one replaces
    it; returns the requests whose KV was in the lost pool (they must end)."""
    ...

  def close(self) -> None:
    """Stops the executor's threads and connections; idempotent."""
    ...

  def prompt_logprobs(self, tokens: Sequence[int]) -> Any:
    """Each prompt token's log-probability given those before it
    (`runtime.rows.PromptLogprobs`), computed beside the steps; blocks. Called from
    a caller's thread, not the engine's."""
    ...


# -- the engine's inbox ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Submit:
  """A checked request enters the engine."""
  request: Request


@dataclasses.dataclass(frozen=True)
class StepDone:
  """Every output of `instance`'s step is ready to read."""
  instance: Instance


@dataclasses.dataclass(frozen=True)
class StepFailed:
  """`instance`'s step could not be launched, or its programs failed."""
  instance: Instance
  error: BaseException


@dataclasses.dataclass(frozen=True)
class CopyDone:
  """`request`'s KV copy landed, or failed with `error` (the coordinator then
  recomputes the request or ends it)."""
  request: Request
  error: Optional[BaseException] = None


@dataclasses.dataclass(frozen=True)
class InstanceLost:
  """`instance`'s devices are gone for good (its worker process stopped answering)."""
  instance: Instance
  error: BaseException


@dataclasses.dataclass(frozen=True)
class InstanceBack:
  """`instance`'s devices are back (its worker process restarted and was set up
  again, with an empty pool): it may take work."""
  instance: Instance


@dataclasses.dataclass(frozen=True)
class Abort:
  """End `request` wherever it is, with `reason` ("aborted", or "error" for a
  request whose pool was lost)."""
  request: Request
  reason: str = "aborted"


@dataclasses.dataclass(frozen=True)
class Close:
  """Take no more requests; serve those in flight and abort what is left at
  `deadline` (engine clock; None: never)."""
  deadline: Optional[float]


Event = Union[Submit, StepDone, StepFailed, CopyDone, InstanceLost, InstanceBack, Abort,
              Close]
Post = Callable[[Event], None]

__all__ = ["Executor", "EngineExecutor", "StepRecord", "Submit", "StepDone", "StepFailed",
           "CopyDone", "InstanceLost", "InstanceBack", "Abort", "Close", "Event", "Post"]
