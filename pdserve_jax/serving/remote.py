"""The router's executor: instances in worker processes, driven over ZeroMQ.

`RemoteExecutor` is the JAX executor with its instances elsewhere: the router runs
the engine loop, the mode's coordinator and every scheduler and page allocator
(the same objects as in one process; this is no third copy of the mode logic),
and each instance is a `serving.worker` process that holds the devices, weights,
pool and programs. A step goes out as the rows the runner would get (tokens,
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
from typing import Dict, List, Optional

import zmq

from pdserve_jax.kv.allocator import PageAllocator
from pdserve_jax.kv.pool import SCRATCH_PAGE
from pdserve_jax.runtime import buckets as bk
from pdserve_jax.serving import worker as W
from pdserve_jax.serving.executor import COPY, FAILED, LOST, STEP, JaxExecutor, runner_shape


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
  instances: list = dataclasses.field(default_factory=list)
  shape: object = None  # the worker runner's RunnerShape: the router pads as it does
  pool_reset: bool = False  # a failed command cost the worker its pool


class Channel:
  """Request/reply with heartbeats over one DEALER socket per worker; one I/O thread
  owns every socket (ZeroMQ sockets are not thread-safe)."""

  def __init__(self, on_lost, heartbeat_s: float = 0.5, timeout_s: float = 5.0,
               command_timeout_s: float = 600.0):
    self._ctx = zmq.Context()
    self._ids = itertools.count()
    self._out: "queue.SimpleQueue" = queue.SimpleQueue()
    self._on_lost = on_lost
    self.heartbeat_s, self.timeout_s = heartbeat_s, timeout_s
    self.command_timeout_s = command_timeout_s
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
          link.sock.send(W.encode(msg))
      for sock, _ in poller.poll(5):
        link = by_sock[sock]
        while True:
          try:
            reply = W.decode(sock.recv(zmq.NOBLOCK))
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
            link.sock.send(W.encode({"op": "ping", "id": next(self._ids)}))
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


class RemoteExecutor(JaxExecutor):
  """The executor seam over worker processes (see the module docstring)."""

  def __init__(self, model, cfg, clock, post, ended, prefill: List[str], decode: List[str],
               heartbeat_s: float = 0.5, timeout_s: float = 5.0,
               copy_timeout_s: float = 60.0, connect_timeout_s: float = 120.0):
    """`prefill`, `decode`: the control addresses of the workers of each role,
    e.g. "tcp://10.0.0.2:5601", one instance each."""
    super().__init__(model, cfg, clock, post, ended)
    self._channel = Channel(self._lost, heartbeat_s, timeout_s)
    self._free = {"prefill": list(prefill), "decode": list(decode)}
    self.copy_timeout_s, self.connect_timeout_s = copy_timeout_s, connect_timeout_s
    self._copy_ids = itertools.count(1)
    self.links: Dict[str, Link] = {}

  @classmethod
  def factory(cls, prefill: List[str], decode: List[str], **kw):
    """What `Engine(..., executor=)` takes."""
    return lambda model, cfg, clock, post, ended: cls(model, cfg, clock, post, ended,
                                                      prefill, decode, **kw)

  # -- building --------------------------------------------------------------------

  def allocator(self, group: str, spec, fraction: float) -> PageAllocator:
    role = "prefill" if group.startswith("prefill") else "decode"
    if not group.startswith(("prefill", "decode")):
      raise ValueError(f"worker processes serve disaggregated instances; got {group!r}")
    if spec.pp != 1 or fraction != 1.0:
      raise ValueError("pipeline stages (pp > 1) are not served across processes")
    if not self._free[role]:
      raise ValueError(f"{group} needs a {role} worker; none is left (give one address "
                       f"per {role} instance)")
    link = self._channel.connect(self._free[role].pop(0), role)
    info = self._channel.call(link, {"op": "hello"}, self.connect_timeout_s)
    if info["role"] != role:
      raise ValueError(f"worker {link.address} serves {info['role']}, not {role}")
    if info["model"] != self.model.config.name:
      raise ValueError(f"worker {link.address} serves model {info['model']!r}, the router "
                       f"{self.model.config.name!r}")
    link.info = info
    link.shape = runner_shape(self.cfg, spec, self.cfg.num_pages)
    config = {f.name: getattr(self.cfg, f.name) for f in dataclasses.fields(self.cfg)}
    self._channel.call(link, {"op": "setup", "spec": W.spec_json(spec), "config": config,
                              "num_pages": self.cfg.num_pages}, self.connect_timeout_s)
    self.links[group] = link
    return PageAllocator(self.cfg.num_pages, self.cfg.page_size, reserved=1)

  def bind(self, instances) -> None:
    self._bound = list(instances)
    for inst in instances:
      inst.handle = self.links[inst.group]
      inst.handle.instances.append(inst)
      self.roles.setdefault(inst.group, set()).add(inst.phase)

  def warmup(self, pairs) -> None:
    futs = [self._channel.request(link, {"op": "warmup", "packed": link.role == "prefill",
                                         "decode": link.role == "decode",
                                         "page_buckets": list(self.page_buckets)})
            for link in self.links.values()]
    for f in futs:
      f.result(self.connect_timeout_s)

  def close(self) -> None:
    self._channel.close()
    super().close()

  # -- the seam ---------------------------------------------------------------------

  def _watch(self, inst, futs) -> None:
    """Posts STEP once every call of the step answered, FAILED if one failed (a lost
    worker's steps end with its LOST event instead)."""
    left = [len(futs)]
    lock = threading.Lock()

    def done(fut):
      with lock:
        left[0] -= 1
        last = left[0] == 0
      if last:
        errors = [f.exception() for f in futs if f.exception() is not None]
        if errors and isinstance(errors[0], WorkerLost):
          return  # the LOST event ends this step with everything else there
        if any(getattr(e, "pool_reset", False) for e in errors):
          inst.handle.pool_reset = True
        self._post((FAILED, inst, errors[0]) if errors else (STEP, inst))

    for f in futs:
      f.add_done_callback(done)

  def _call(self, link, program: str, *args) -> cf.Future:
    rows, starts, tables, sampling = args
    names = (("chunks", "starts") if program == "packed" else ("tokens", "positions"))
    msg = {"op": program, names[0]: rows, names[1]: list(starts),
           "tables": [list(t) for t in tables], "sampling": W.sampling_to_json(sampling)}
    return self._channel.request(link, msg)

  def _read(self, fut):
    return W.sampled_from_json(fut.result())

  def recover_pool(self, inst) -> list:
    """After a failed step: if the worker reset its pool, the requests whose KV was
    there fail with it."""
    link = inst.handle
    if not link.pool_reset:
      return []
    link.pool_reset = False
    held = dict.fromkeys(r for i in link.instances for r in i.sched.allocator.owners())
    for r in held:
      r.payload.error = r.payload.error or RuntimeError(
          f"the KV pool of {inst.group} was lost when a step failed")
    return list(held)

  def _lost(self, link: Link) -> None:
    for inst in link.instances:
      self._post((LOST, inst, link.lost))

  def start_copy(self, req, src, dst, now: float) -> None:
    src_pages = src.sched.allocator.pages(req)
    n = bk.bucket(len(src_pages), self.page_buckets, "pages per transfer")
    pad = [SCRATCH_PAGE] * (n - len(src_pages))
    dst_pages = dst.sched.allocator.pages(req)[:len(src_pages)] + pad
    # One transfer id per destination process: each pulls its own copy.
    processes = dst.handle.info.get("processes", 1)
    uuid = next(self._copy_ids) * MAX_PROCESSES
    settled, lock = threading.Event(), threading.Lock()

    def finish(error: Optional[BaseException]) -> None:
      with lock:
        if settled.is_set():
          return
        settled.set()
      timer.cancel()
      if error is not None:
        req.payload.error = req.payload.error or RuntimeError(
            f"KV copy {src.name} -> {dst.name} failed: {error}")
        req.end_reason = "error"
      self._post((COPY, req))

    def offered(fut):
      if fut.exception() is not None:
        finish(fut.exception())
        return
      self._channel.request(dst.handle, {
          "op": "pull", "uuid": uuid, "src": src.handle.info["transfer"],
          "pages": dst_pages}).add_done_callback(lambda f: finish(f.exception()))

    timer = threading.Timer(self.copy_timeout_s, lambda: finish(TimeoutError(
        f"not landed within {self.copy_timeout_s:g} s")))
    timer.daemon = True
    timer.start()
    self._channel.request(src.handle, {
        "op": "offer", "uuids": [uuid + i for i in range(processes)],
        "pages": src_pages + pad}).add_done_callback(offered)


def wait_for_workers(addresses: List[str], timeout: float = 120.0) -> None:
  """Blocks until every worker answers a ping (workers may start after the router)."""
  ctx = zmq.Context()
  try:
    for address in addresses:
      sock = ctx.socket(zmq.DEALER)
      sock.setsockopt(zmq.LINGER, 0)
      sock.connect(address)
      sock.send(W.encode({"op": "ping", "id": -1}))
      if not sock.poll(int(timeout * 1000)):
        raise WorkerLost(f"worker {address} did not answer within {timeout:g} s")
      sock.recv()
      sock.close()
  finally:
    ctx.term()
  logging.info("all %d workers answer", len(addresses))
