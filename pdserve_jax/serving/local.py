"""Runners on this process's devices: the executor's `Placement` for one process.

`LocalPlacement` carves `jax.devices()` into instance meshes as the coordinator
asks for device groups (tp devices per mesh, one mesh per pipeline stage) and
builds an `InstanceRunner` (weights, pool, programs) on each. A `LocalRunner`
adapts it to the executor's `Runner`: a call returns at once with its device arrays
(JAX dispatches asynchronously), and a `Watcher` thread per device group waits for
them and rings the executor's callback. KV copies move with `kv.pool.transfer_pages`
(`jax.device_put` between meshes) and are watched by a thread per destination group.
A packed call with KV streams moves each layer group's pages right after dispatching
that group's program, so the copy of one group runs while the next computes (JAX
orders each pool's reads and donations, so the gather sees the group's writes).
"""

from __future__ import annotations

import functools
import queue
import threading
from typing import Callable, Dict, List, Optional, Sequence

import jax
import numpy as np

from pdserve_jax.core.deploy import InstanceSpec
from pdserve_jax.kv.pool import SCRATCH_PAGE, transfer_pages
from pdserve_jax.model import sharding
from pdserve_jax.runtime.buckets import RunnerShape
from pdserve_jax.runtime.programs import InstanceRunner
from pdserve_jax.runtime.rows import Sampled
from pdserve_jax.serving.executor import KvStream, Runner


class Watcher:
  """A daemon thread that waits for device arrays, in the order given, and calls each
  callback once its arrays are ready (or have failed: the reader meets the error)."""

  def __init__(self, name: str):
    self._queue: "queue.SimpleQueue" = queue.SimpleQueue()
    self._thread = threading.Thread(target=self._run, name=name, daemon=True)
    self._thread.start()

  def watch(self, arrays, callback: Callable[[], None]) -> None:
    self._queue.put((arrays, callback))

  def close(self) -> None:
    """Ends the thread once what it watches is ready (so no thread is left in native
    code while the interpreter shuts down)."""
    self._queue.put(None)
    if self._thread is not threading.current_thread():
      self._thread.join()

  def _run(self) -> None:
    while (item := self._queue.get()) is not None:
      arrays, callback = item
      try:
        jax.block_until_ready(arrays)
      except Exception:  # noqa: BLE001 - `result()` meets the error when it reads
        pass
      callback()


class _Pending:
  """A program call in flight on this process's devices."""

  def __init__(self, out: Sampled, watcher: Watcher):
    self._out, self._watcher = out, watcher

  def on_ready(self, callback: Callable[[], None]) -> None:
    self._watcher.watch(list(self._out), callback)

  def result(self) -> Sampled:
    return Sampled(*jax.device_get(tuple(self._out)))


class LocalRunner:
  """An `InstanceRunner` as the executor's `Runner`."""

  def __init__(self, runner: InstanceRunner, watcher: Watcher, copies: Callable[[], Watcher]):
    self.runner, self._watcher, self._copies = runner, watcher, copies
    self.shape: RunnerShape = runner.shape

  def packed(self, chunks, starts, tables, sampling, streams: Sequence[KvStream] = ()
             ) -> _Pending:
    if not streams:
      return _Pending(self.runner.packed(chunks, starts, tables, sampling), self._watcher)
    dsts = [_local(s.dst) for s in streams]
    moved: List[list] = [[] for _ in streams]

    def send(pool):  # this group's pages of each stream, while the next group computes
      for s, dst, bufs in zip(streams, dsts, moved):
        bufs += transfer_pages(pool, s.src_pages, dst.runner.pools, s.dst_pages)

    out = self.runner.packed(chunks, starts, tables, sampling, after_stage=send)
    for s, dst, bufs in zip(streams, dsts, moved):
      dst._copies().watch(bufs, functools.partial(_report, bufs, s.done))
    return _Pending(out, self._watcher)

  def decode(self, tokens, positions, tables, sampling) -> _Pending:
    return _Pending(self.runner.decode(tokens, positions, tables, sampling), self._watcher)

  def num_programs(self, packed: bool, decode: bool) -> int:
    return len(self.runner.compiled_shapes(packed, decode))

  def warmup(self, packed: bool, decode: bool, copy_pages: Sequence[int],
             progress: Callable[[], None]) -> None:
    # This process's copies compile with their pairs (`warm_copies`).
    self.runner.warmup(packed, decode, progress=progress)

  def warm_copies(self, dst: Runner, copy_pages: Sequence[int]) -> None:
    dst = _local(dst)
    for n in copy_pages:
      scratch = np.full(n, SCRATCH_PAGE)
      moved = transfer_pages(self.runner.pools, scratch, dst.runner.pools, scratch)
      jax.block_until_ready(moved)
    jax.block_until_ready([p.arrays for p in dst.runner.pools])

  def copy_to(self, dst: Runner, src_pages: np.ndarray, dst_pages: np.ndarray,
              done: Callable[[Optional[BaseException]], None]) -> None:
    dst = _local(dst)
    moved = transfer_pages(self.runner.pools, src_pages, dst.runner.pools, dst_pages)
    dst._copies().watch(moved, lambda: done(_failure(moved)))

  def pools_lost(self) -> bool:
    return self.runner.pools_lost()

  def prompt_logprobs(self, tokens):
    from pdserve_jax.runtime.scoring import prompt_logprobs

    return prompt_logprobs(self.runner, tokens)

  def reset_pools(self) -> None:
    self.runner.reset_pools()


def _local(dst: Runner) -> LocalRunner:
  if not isinstance(dst, LocalRunner):
    raise TypeError(f"a local runner copies KV to local runners, not {type(dst).__name__}")
  return dst


def _report(arrays, done: Callable[[Optional[BaseException]], None]) -> None:
  done(_failure(arrays))


def _failure(arrays) -> Optional[BaseException]:
  """The error a set of ready (or failed) device arrays holds, if any."""
  try:
    jax.block_until_ready(arrays)
  except Exception as e:  # noqa: BLE001 - the copy failed; its request will say why
    return e
  return None


class LocalPlacement:
  """Instances on this process's devices, in the order groups are asked for."""

  def __init__(self, model, attn_impl: str = "auto", devices: Optional[List] = None):
    self.model, self.attn_impl = model, attn_impl
    self._devices = list(jax.devices() if devices is None else devices)
    self.device_count: Optional[int] = len(self._devices)
    self._watchers: Dict[str, Watcher] = {}
    self._copy_watchers: Dict[str, Watcher] = {}
    self._lock = threading.Lock()

  def open(self, group: str, spec: InstanceSpec, shape: RunnerShape,
           lost: Callable[[BaseException], None]) -> Runner:
    n = spec.tp * spec.pp
    if len(self._devices) < n:
      raise ValueError(f"{group} needs {n} devices; only {len(self._devices)} are left")
    meshes = sharding.split_devices([spec.tp] * spec.pp, self._devices[:n])
    self._devices = self._devices[n:]
    runner = InstanceRunner(self.model, meshes if spec.pp > 1 else meshes[0], shape,
                            self.attn_impl)
    self._watchers[group] = Watcher(f"pdserve-watch-{group}")
    return LocalRunner(runner, self._watchers[group], lambda: self._copy_watcher(group))

  def sibling(self, runner: Runner, shape: RunnerShape) -> Runner:
    assert isinstance(runner, LocalRunner)
    return LocalRunner(runner.runner.sibling(shape.num_pages), runner._watcher, runner._copies)

  def _copy_watcher(self, group: str) -> Watcher:
    with self._lock:
      w = self._copy_watchers.get(group)
      if w is None:
        w = self._copy_watchers[group] = Watcher(f"pdserve-copies-{group}")
      return w

  def close(self) -> None:
    for w in list(self._watchers.values()) + list(self._copy_watchers.values()):
      w.close()
