"""Runners in worker processes, driven over ZeroMQ: the router's `Placement`.

The router runs the engine loop, the JAX executor (`serving.executor`), the mode's
coordinator and every scheduler and page allocator (the same objects as in one
process; this is no third copy of the mode logic); `WorkerPlacement` gives the
executor a `RemoteRunner` per instance, each a `cluster.worker` process that holds
the devices, weights, pool and programs. A step goes out as the rows the runner would get (tokens,
positions, page tables, sampling rows) and its sampled tokens come back; a KV
copy is an offer on the source worker (`await_pull` under the request's transfer
id) and a pull on the destination, after which the router frees the source pages
(the acknowledgement).

ZeroMQ carries the control messages (JSON, one DEALER socket per worker, owned by
one I/O thread): it queues while a peer restarts, frames messages, and needs no
hand-made wire protocol. Every worker is pinged every `heartbeat_s`; one silent for
`timeout_s` (or whose command gets no answer within `command_timeout_s`) is lost:
its pending commands fail, the engine ends every request it held with an error
naming it (`Engine._lose`), and no new work goes there. A KV copy that has not
landed within `copy_timeout_s` fails its request alone.

Limits: JSON rows cost host time per step (fine for research-sized batches);
pp > 1 instances are not served across processes.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import itertools
import logging
import queue
import threading
import time
from typing import Callable, Dict, List, Optional

import numpy as np
import zmq

from pdserve_jax.cluster import wire
from pdserve_jax.core.deploy import InstanceSpec
from pdserve_jax.runtime.buckets import RunnerShape
from pdserve_jax.runtime.rows import Sampled
from pdserve_jax.serving.executor import Runner


MAX_PROCESSES = 64  # per instance: the transfer ids of one copy


class WorkerLost(RuntimeError):
  """A worker process stopped answering."""


class RemoteError(RuntimeError):
  """A worker answered a command with an error (`pool_reset`: and lost its pool)."""

  def __init__(self, message: str, pool_reset: bool = False):
    super().__init__(message)
    self.pool_reset = pool_reset


@dataclasses.dataclass(eq=False)
class Link:
  """The router's end of one worker's control channel."""
  address: str
  role: str
  sock: zmq.Socket
  pending: Dict[int, tuple] = dataclasses.field(default_factory=dict)  # id -> (future, sent)
  last_seen: float = dataclasses.field(default_factory=time.monotonic)
  lost: Optional[BaseException] = None
  info: dict = dataclasses.field(default_factory=dict)  # its "hello" answer
  pool_reset: bool = False  # a failed command cost the worker its pool


class Channel:
  """Request/reply with heartbeats over one DEALER socket per worker; one I/O thread
  owns every socket (ZeroMQ sockets are not thread-safe)."""

  def __init__(self, on_lost, heartbeat_s: float = 0.5, timeout_s: float = 5.0,
               command_timeout_s: float = 600.0, connect_timeout_s: float = 120.0):
    self._ctx = zmq.Context()
    self._ids = itertools.count()
    self._out: "queue.SimpleQueue" = queue.SimpleQueue()
    self._on_lost = on_lost
    self.heartbeat_s, self.timeout_s = heartbeat_s, timeout_s
    self.command_timeout_s, self.connect_timeout_s = command_timeout_s, connect_timeout_s
    self.links: List[Link] = []
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._loop, name="pdserve-router-io", daemon=True)
    self._thread.start()

  def connect(self, address: str, role: str) -> Link:
    sock = self._ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    link = Link(address, role, sock)
    self._out.put(("add", link))
    return link

  def request(self, link: Link, msg: dict) -> cf.Future:
    fut: cf.Future = cf.Future()
    self._out.put(("send", link, dict(msg, id=next(self._ids)), fut))
    return fut

  def call(self, link: Link, msg: dict, timeout: float):
    """A request answered within `timeout` seconds; raises WorkerLost otherwise."""
    try:
      return self.request(link, msg).result(timeout)
    except cf.TimeoutError:
      raise WorkerLost(f"worker {link.address} did not answer {msg['op']!r} within "
                       f"{timeout:g} s") from None

  def close(self) -> None:
    self._stop.set()
    self._thread.join()
    self._ctx.term()

  def _loop(self) -> None:
    poller, by_sock, last_ping = zmq.Poller(), {}, 0.0
    while not self._stop.is_set():
      while True:
        try:
          item = self._out.get_nowait()
        except queue.Empty:
          break
        if item[0] == "add":
          link = item[1]
          self.links.append(link)
          by_sock[link.sock] = link
          poller.register(link.sock, zmq.POLLIN)
        else:
          _, link, msg, fut = item
          if link.lost is not None:
            fut.set_exception(link.lost)
            continue
          link.pending[msg["id"]] = (fut, time.monotonic())
          link.sock.send(wire.encode(msg))
      for sock, _ in poller.poll(5):
        link = by_sock[sock]
        while True:
          try:
            reply = wire.decode(sock.recv(zmq.NOBLOCK))
          except zmq.Again:
            break
          link.last_seen = time.monotonic()
          fut, _ = link.pending.pop(reply["id"], (None, 0.0))
          if fut is None:
            continue  # a heartbeat's answer
          if reply.get("ok"):
            fut.set_result(reply)
          else:
            fut.set_exception(RemoteError(reply.get("error", "unknown error"),
                                          bool(reply.get("pool_reset"))))
      now = time.monotonic()
      if now - last_ping >= self.heartbeat_s:
        last_ping = now
        for link in self.links:
          if link.lost is None:
            link.sock.send(wire.encode({"op": "ping", "id": next(self._ids)}))
      for link in self.links:
        if link.lost is not None:
          continue
        overdue = any(now - sent > self.command_timeout_s for _, sent in link.pending.values())
        if now - link.last_seen > self.timeout_s or overdue:
          self._lose(link, WorkerLost(
              f"worker {link.address} ({link.role}) "
              + ("left a command unanswered" if overdue else
                 f"sent nothing for {now - link.last_seen:.1f} s")))
    for link in self.links:
      link.sock.close()

  def _lose(self, link: Link, error: BaseException) -> None:
    link.lost = error
    pending, link.pending = link.pending, {}
    for fut, _ in pending.values():
      fut.set_exception(error)
    self._on_lost(link)


class _RemotePending:
  """A program call in flight on a worker."""

  def __init__(self, fut: cf.Future):
    self._fut = fut

  def on_ready(self, callback) -> None:
    self._fut.add_done_callback(lambda _: callback())

  def result(self) -> Sampled:
    return wire.sampled_from_json(self._fut.result())


class RemoteRunner:
  """The executor's `Runner` for one worker process (see the module docstring)."""

  def __init__(self, channel: Channel, link: Link, shape: RunnerShape,
               copy_timeout_s: float, copy_ids):
    self._channel, self.link, self.shape = channel, link, shape
    self.copy_timeout_s, self._copy_ids = copy_timeout_s, copy_ids

  def _call(self, program: str, rows, starts, tables, sampling) -> _RemotePending:
    names = ("chunks", "starts") if program == "packed" else ("tokens", "positions")
    msg = {"op": program, names[0]: [list(r) for r in rows] if program == "packed" else
           list(rows), names[1]: list(starts), "tables": [list(t) for t in tables],
           "sampling": wire.sampling_to_json(sampling)}
    fut = self._channel.request(self.link, msg)
    fut.add_done_callback(self._note_reset)
    return _RemotePending(fut)

  def _note_reset(self, fut: cf.Future) -> None:
    if getattr(fut.exception(), "pool_reset", False):
      self.link.pool_reset = True

  def packed(self, chunks, starts, tables, sampling, streams=()) -> _RemotePending:
    if streams:  # `check_servable` refuses such deployments across processes
      raise NotImplementedError("layer-wise KV streaming between worker processes")
    return self._call("packed", chunks, starts, tables, sampling)

  def decode(self, tokens, positions, tables, sampling) -> _RemotePending:
    return self._call("decode", tokens, positions, tables, sampling)

  def num_programs(self, packed: bool, decode: bool) -> int:
    return (len(self.shape.compiled_packed_shapes()) * packed
            + len(self.shape.compiled_decode_shapes()) * decode)

  def warmup(self, packed, decode, copy_pages, progress) -> None:
    reply = self._channel.request(self.link, {
        "op": "warmup", "packed": packed, "decode": decode,
        "page_buckets": list(copy_pages)}).result(self._channel.connect_timeout_s)
    for _ in range(reply["programs"]):
      progress()

  def warm_copies(self, dst: Runner, copy_pages) -> None:
    pass  # each worker compiled its own gather or scatter in `warmup`

  def copy_to(self, dst: Runner, src_pages: np.ndarray, dst_pages: np.ndarray,
              done: Callable[[Optional[BaseException]], None]) -> None:
    """An offer on this worker (`await_pull` under the copy's transfer ids) and a pull
    on `dst`'s; `done` once it landed, failed, or `copy_timeout_s` passed."""
    if not isinstance(dst, RemoteRunner):
      raise TypeError(f"a worker copies KV to workers, not {type(dst).__name__}")
    # One transfer id per destination process: each pulls its own copy.
    processes = dst.link.info.get("processes", 1)
    uuid = next(self._copy_ids) * MAX_PROCESSES
    settled, lock = threading.Event(), threading.Lock()

    def finish(error: Optional[BaseException]) -> None:
      with lock:
        if settled.is_set():
          return
        settled.set()
      timer.cancel()
      done(error)

    def offered(fut):
      if fut.exception() is not None:
        finish(fut.exception())
        return
      self._channel.request(dst.link, {
          "op": "pull", "uuid": uuid, "src": self.link.info["transfer"],
          "pages": dst_pages.tolist()}).add_done_callback(lambda f: finish(f.exception()))

    timer = threading.Timer(self.copy_timeout_s, lambda: finish(TimeoutError(
        f"not landed within {self.copy_timeout_s:g} s")))
    timer.daemon = True
    timer.start()
    self._channel.request(self.link, {
        "op": "offer", "uuids": [uuid + i for i in range(processes)],
        "pages": src_pages.tolist()}).add_done_callback(offered)

  def pools_lost(self) -> bool:
    return self.link.pool_reset

  def reset_pools(self) -> None:
    self.link.pool_reset = False  # the worker reset its pool when the command failed


class WorkerPlacement:
  """The executor's `Placement` over worker processes: each device group the
  coordinator asks for is the next free worker of its role."""

  device_count: Optional[int] = None  # the workers' devices are theirs to count
  in_process = False

  def __init__(self, model_name: str, attn_impl: str, prefill: List[str], decode: List[str],
               heartbeat_s: float = 0.5, timeout_s: float = 5.0,
               copy_timeout_s: float = 60.0, connect_timeout_s: float = 120.0,
               command_timeout_s: float = 600.0):
    """`prefill`, `decode`: the control addresses of the workers of each role,
    e.g. "tcp://10.0.0.2:5601", one instance each."""
    self.model_name, self.attn_impl = model_name, attn_impl
    self._lost: Dict[int, Callable[[BaseException], None]] = {}
    self._channel = Channel(self._on_lost, heartbeat_s, timeout_s, command_timeout_s,
                            connect_timeout_s)
    self._free = {"prefill": list(prefill), "decode": list(decode)}
    self.copy_timeout_s = copy_timeout_s
    self._copy_ids = itertools.count(1)

  def open(self, group: str, spec: InstanceSpec, shape: RunnerShape,
           lost: Callable[[BaseException], None]) -> Runner:
    if not group.startswith(("prefill", "decode")):
      raise ValueError(f"worker processes serve disaggregated instances; got {group!r}")
    role = "prefill" if group.startswith("prefill") else "decode"
    if spec.pp != 1:
      raise ValueError("pipeline stages (pp > 1) are not served across processes")
    if not self._free[role]:
      raise ValueError(f"{group} needs a {role} worker; none is left (give one address "
                       f"per {role} instance)")
    channel, timeout = self._channel, self._channel.connect_timeout_s
    link = channel.connect(self._free[role].pop(0), role)
    info = channel.call(link, {"op": "hello"}, timeout)
    if info["role"] != role:
      raise ValueError(f"worker {link.address} serves {info['role']}, not {role}")
    if info["model"] != self.model_name:
      raise ValueError(f"worker {link.address} serves model {info['model']!r}, the router "
                       f"{self.model_name!r}")
    link.info = info
    channel.call(link, {"op": "setup", "spec": wire.spec_json(spec),
                        "shape": dataclasses.asdict(shape), "attn_impl": self.attn_impl},
                 timeout)
    self._lost[id(link)] = lost
    return RemoteRunner(channel, link, shape, self.copy_timeout_s, self._copy_ids)

  def sibling(self, runner: Runner, shape: RunnerShape) -> Runner:
    raise ValueError("pipeline stages (pp > 1) are not served across processes")

  def _on_lost(self, link: Link) -> None:
    lost = self._lost.get(id(link))
    if lost is not None and link.lost is not None:
      lost(link.lost)

  def close(self) -> None:
    self._channel.close()


def wait_for_workers(addresses: List[str], timeout: float = 120.0) -> None:
  """Blocks until every worker answers a ping (workers may start after the router)."""
  ctx = zmq.Context()
  try:
    for address in addresses:
      sock = ctx.socket(zmq.DEALER)
      sock.setsockopt(zmq.LINGER, 0)
      sock.connect(address)
      sock.send(wire.encode({"op": "ping", "id": -1}))
      if not sock.poll(int(timeout * 1000)):
        raise WorkerLost(f"worker {address} did not answer within {timeout:g} s")
      sock.recv()
      sock.close()
  finally:
    ctx.term()
  logging.info("all %d workers answer", len(addresses))
