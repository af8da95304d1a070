"""Runners in worker processes, driven over ZeroMQ: the router's `Placement`.

The router runs the engine loop, the JAX executor (`serving.executor`), the mode's
coordinator and every scheduler and page allocator (the same objects as in one
process; this is no third copy of the mode logic); `WorkerPlacement` gives the
executor a `RemoteRunner` per instance, each a `cluster.worker` process that holds
the devices, weights, pool and programs. A step goes out as the rows the runner would get (tokens,
positions, page tables, sampling rows) and its sampled tokens come back; a KV
copy is an offer on the source worker (`await_pull` under the request's transfer
id, one per layer group) and a pull on the destination per offer, after which the
router frees the source pages (the acknowledgement). With layer-wise streaming a
packed call carries its requests' streams: the prefill worker offers each layer
group's pages as it dispatches that group, and the router sends the decode worker
the pulls together with the call, so each group lands while later groups compute;
the stream is reported done (the executor's `KvStream.done`, as in one process)
when the last group landed.

ZeroMQ carries the control messages (JSON, one DEALER socket per worker, owned by
one I/O thread): it frames messages and needs no hand-made wire protocol. A worker
is lost when its connection closes (the process died: seen at once, through the
socket's monitor), when it is silent for `timeout_s` (pinged every `heartbeat_s`: a
hung process or host), or when a command gets no answer within
`command_timeout_s`. So a busy worker on a loaded machine may be given a long
`timeout_s` without slowing the response to a crash. The engine hears of a loss
first (`Engine._lose`: its requests are recomputed elsewhere, or end with an error
naming it), then its pending commands fail, and no new work goes there. A KV copy
that has not landed within `copy_timeout_s` fails, and the coordinator recomputes
its request.

A lost worker is not forgotten: its socket is replaced (so no command queued for
the dead process reaches its successor) and pinged on. When a process answers at
that address again (the worker restarted with the same command), a thread of its
own checks it (`hello`: role and model, else it stays lost and the log says why),
sets it up and warms it up as at the start, and the executor hears it is back
(`on_back`): the instance takes work again, with an empty pool, no router restart.
Any number of losses and returns leave the router's state as it was.

Workers serve one role each: "prefill" or "decode" (disaggregated), or "replica"
(a colocated replica or a semi-PD instance, both phases on one pool).

Limits: JSON rows cost host time per step (fine for research-sized batches);
pp > 1 instances are not served across processes; a worker is known by the
address the router was given (a new address needs a router restart).
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import functools
import itertools
import logging
import queue
import threading
import time
from typing import Callable, Dict, List, Optional

import numpy as np
import zmq
from zmq.utils.monitor import recv_monitor_message

from pdserve_jax.cluster import wire
from pdserve_jax.core.deploy import InstanceSpec
from pdserve_jax.runtime.buckets import RunnerShape
from pdserve_jax.runtime.rows import PromptLogprobs, Sampled
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
  monitor: zmq.Socket  # `sock`'s connection events (a closed connection)
  pending: Dict[int, tuple] = dataclasses.field(default_factory=dict)  # id -> (future, sent)
  last_seen: float = dataclasses.field(default_factory=time.monotonic)
  lost: Optional[BaseException] = None
  info: dict = dataclasses.field(default_factory=dict)  # its "hello" answer
  pool_reset: bool = False  # a failed command cost the worker its pool
  returning: bool = False  # lost, and a process answers again: being set up
  losses: int = 0  # how many times it was lost


class Channel:
  """Request/reply with heartbeats over one DEALER socket per worker; one I/O thread
  owns every socket (ZeroMQ sockets are not thread-safe)."""

  def __init__(self, on_lost, heartbeat_s: float = 0.5, timeout_s: float = 5.0,
               command_timeout_s: float = 600.0, connect_timeout_s: float = 120.0,
               on_answer=None):
    """`on_lost(link)` when a worker is lost; `on_answer(link)` when a lost worker's
    address answers again (both on the I/O thread: they must not block)."""
    self._ctx = zmq.Context()
    self._ids = itertools.count()
    self._out: "queue.SimpleQueue" = queue.SimpleQueue()
    self._on_lost = on_lost
    self._on_answer = on_answer or (lambda link: None)
    self.heartbeat_s, self.timeout_s = heartbeat_s, timeout_s
    self.command_timeout_s, self.connect_timeout_s = command_timeout_s, connect_timeout_s
    self.links: List[Link] = []
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._loop, name="pdserve-router-io", daemon=True)
    self._thread.start()

  def _socket(self, address: str) -> tuple:
    """A DEALER socket connected to `address`, and its monitor."""
    sock = self._ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
    sock.connect(address)
    return sock, monitor

  def connect(self, address: str, role: str) -> Link:
    link = Link(address, role, *self._socket(address))
    self._out.put(("add", link))
    return link

  def request(self, link: Link, msg: dict, returning: bool = False) -> cf.Future:
    """Sends `msg`; its future holds the reply. To a lost worker it fails at once,
    unless `returning` (the commands that take a restarted worker back)."""
    fut: cf.Future = cf.Future()
    self._out.put(("send", link, dict(msg, id=next(self._ids)), fut, returning))
    return fut

  def call(self, link: Link, msg: dict, timeout: float, returning: bool = False):
    """A request answered within `timeout` seconds; raises WorkerLost otherwise."""
    try:
      return self.request(link, msg, returning).result(timeout)
    except cf.TimeoutError:
      raise WorkerLost(f"worker {link.address} did not answer {msg['op']!r} within "
                       f"{timeout:g} s") from None

  def forget(self, link: Link, fut: cf.Future, error: BaseException) -> None:
    """No answer to `fut`'s command is awaited any more (it fails with `error`; a
    late answer is dropped): a pull the router gave up on must not make its worker
    look lost once `command_timeout_s` passed."""
    self._out.put(("forget", link, fut, error))

  def back(self, link: Link) -> None:
    """The returning worker is set up: it serves again."""
    self._out.put(("back", link))

  def still_lost(self, link: Link) -> None:
    """Taking the returning worker back failed: it stays lost (pinged on)."""
    self._out.put(("still_lost", link))

  def close(self) -> None:
    self._stop.set()
    self._thread.join()
    self._ctx.term()

  def _loop(self) -> None:
    poller, last_ping = zmq.Poller(), 0.0
    by_sock: Dict[zmq.Socket, Link] = {}  # each link's socket and monitor
    while not self._stop.is_set():
      while True:
        try:
          item = self._out.get_nowait()
        except queue.Empty:
          break
        kind, link = item[0], item[1]
        if kind == "add":
          self.links.append(link)
          self._watch(link, poller, by_sock)
        elif kind == "back":
          link.lost, link.returning, link.last_seen = None, False, time.monotonic()
        elif kind == "still_lost":
          link.returning = False
          self._fail_pending(link, link.lost)
        elif kind == "forget":
          _, link, fut, error = item
          for msg_id, (pending, _) in list(link.pending.items()):
            if pending is fut:
              del link.pending[msg_id]
              fut.set_exception(error)
        else:
          _, link, msg, fut, returning = item
          if link.lost is not None and not returning:
            fut.set_exception(link.lost)
            continue
          link.pending[msg["id"]] = (fut, time.monotonic())
          link.sock.send(wire.encode(msg))
      for sock, _ in poller.poll(5):
        link = by_sock.get(sock)
        if link is None:
          continue  # the socket of a lost worker, replaced
        if sock is link.monitor:
          self._closed(link, poller, by_sock)
          continue
        while True:
          try:
            reply = wire.decode(sock.recv(zmq.NOBLOCK))
          except zmq.Again:
            break
          link.last_seen = time.monotonic()
          if link.lost is not None and not link.returning:
            link.returning = True  # a process answers at a lost worker's address
            self._on_answer(link)
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
        for link in self.links:  # lost ones too: a restarted worker answers
          link.sock.send(wire.encode({"op": "ping", "id": next(self._ids)}))
      for link in self.links:
        if link.lost is not None:
          continue
        overdue = any(now - sent > self.command_timeout_s for _, sent in link.pending.values())
        if now - link.last_seen > self.timeout_s or overdue:
          self._lose(link, WorkerLost(
              f"worker {link.address} ({link.role}) "
              + ("left a command unanswered" if overdue else
                 f"sent nothing for {now - link.last_seen:.1f} s")), poller, by_sock)
    for link in self.links:
      self._unwatch(link, poller, by_sock)

  @staticmethod
  def _watch(link: Link, poller, by_sock) -> None:
    for sock in (link.sock, link.monitor):
      by_sock[sock] = link
      poller.register(sock, zmq.POLLIN)

  @staticmethod
  def _unwatch(link: Link, poller, by_sock) -> None:
    for sock in (link.sock, link.monitor):
      poller.unregister(sock)
      by_sock.pop(sock, None)
    link.sock.disable_monitor()
    link.monitor.close()
    link.sock.close()

  def _closed(self, link: Link, poller, by_sock) -> None:
    """`link`'s monitor has news: a closed connection means its process is gone."""
    try:
      event = recv_monitor_message(link.monitor, zmq.NOBLOCK)
    except zmq.Again:
      return
    if event["event"] != zmq.EVENT_DISCONNECTED:
      return
    error = WorkerLost(f"worker {link.address} ({link.role}) closed its connection")
    if link.lost is None:
      self._lose(link, error, poller, by_sock)
    elif link.returning:  # died while being taken back: its set-up fails now
      self._fail_pending(link, error)

  def _lose(self, link: Link, error: BaseException, poller, by_sock) -> None:
    link.lost, link.losses = error, link.losses + 1
    # The engine first: the requests there go elsewhere before their calls fail.
    self._on_lost(link)
    self._fail_pending(link, error)
    # A fresh socket: nothing queued for the dead process reaches its successor.
    self._unwatch(link, poller, by_sock)
    link.sock, link.monitor = self._socket(link.address)
    self._watch(link, poller, by_sock)

  @staticmethod
  def _fail_pending(link: Link, error: BaseException) -> None:
    pending, link.pending = link.pending, {}
    for fut, _ in pending.values():
      fut.set_exception(error)


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
               copy_timeout_s: float, copy_ids, setup: dict):
    self._channel, self.link, self.shape = channel, link, shape
    self.copy_timeout_s, self._copy_ids = copy_timeout_s, copy_ids
    self.setup = setup  # the "setup" command, sent again to a restarted worker
    self.warmup_msg: Optional[dict] = None  # and the "warmup" one
    self.warm_movers: List[dict] = []  # and the "warm_movers" ones
    self.on_back: Callable[[], None] = lambda: None  # set by the executor

  @staticmethod
  def _rows(program: str, rows, starts, tables, sampling) -> dict:
    names = ("chunks", "starts") if program == "packed" else ("tokens", "positions")
    return {"op": program, names[0]: [list(r) for r in rows] if program == "packed" else
            list(rows), names[1]: list(starts), "tables": [list(t) for t in tables],
            "sampling": wire.sampling_to_json(sampling)}

  def _send(self, msg: dict) -> cf.Future:
    fut = self._channel.request(self.link, msg)
    fut.add_done_callback(self._note_reset)
    return fut

  def layer_groups(self) -> List[range]:
    """The layers of each of this runner's layer groups (one offer each per copy)."""
    n, groups = self.link.info["layers"], self.shape.layer_groups
    return [range(g * n // groups, (g + 1) * n // groups) for g in range(groups)]

  def _note_reset(self, fut: cf.Future) -> None:
    if getattr(fut.exception(), "pool_reset", False):
      self.link.pool_reset = True

  def packed(self, chunks, starts, tables, sampling, streams=()) -> _RemotePending:
    """A packed call; each of `streams` goes to its worker layer group by layer group
    (see the module docstring)."""
    dsts = [_remote(s.dst) for s in streams]  # before any copy starts its clock
    copies = [_Copy(self, dst, s.done) for s, dst in zip(streams, dsts)]
    msg = self._rows("packed", chunks, starts, tables, sampling)
    if copies:
      msg["streams"] = [{"pages": s.src_pages.tolist(), "uuids": c.uuids}
                        for s, c in zip(streams, copies)]
    fut = self._send(msg)
    refused = fut.done()  # at once, by a lost worker: no pull goes out
    if not refused:
      for s, c in zip(streams, copies):
        c.pull(s.dst_pages)

    def failed(fut: cf.Future) -> None:
      # The worker offered errors for the groups it did not offer, which fail their
      # pulls; this ends the copies at once, whichever answer comes first.
      if fut.exception() is not None:
        for c in copies:
          c.finish(fut.exception(), pulls_sent=not refused)

    fut.add_done_callback(failed)
    return _RemotePending(fut)

  def decode(self, tokens, positions, tables, sampling) -> _RemotePending:
    return _RemotePending(self._send(self._rows("decode", tokens, positions, tables,
                                                sampling)))

  def num_programs(self, packed: bool, decode: bool) -> int:
    return (len(self.shape.compiled_packed_shapes()) * packed
            + len(self.shape.compiled_decode_shapes()) * decode)

  def warmup(self, packed, decode, copy_pages, progress) -> None:
    # The KV movers compile with their pairs (`warm_copies`).
    self.warmup_msg = {"op": "warmup", "packed": packed, "decode": decode}
    reply = self._channel.call(self.link, self.warmup_msg, self._channel.connect_timeout_s)
    for _ in range(reply["programs"]):
      progress()

  def prompt_logprobs(self, tokens) -> PromptLogprobs:
    reply = self._channel.call(self.link, {"op": "score", "tokens": list(tokens)},
                               self._channel.command_timeout_s)
    n = max(len(tokens) - 1, 0)
    return PromptLogprobs(np.asarray(reply["logprobs"], np.float32),
                          np.asarray(reply["top_ids"], np.int32).reshape(n, -1),
                          np.asarray(reply["top_logprobs"], np.float32).reshape(n, -1))

  def warm_copies(self, dst: Runner, copy_pages) -> None:
    """A copy from here to `dst` gathers each of this runner's layer groups here and
    scatters each into `dst`'s pool: both compile now, once per worker (an elastic
    group's worker is a source and a destination alike)."""
    dst = _remote(dst)
    self._warm_movers({"gather": True, "scatter": []}, copy_pages)
    dst._warm_movers({"gather": False,
                      "scatter": [[g.start, g.stop] for g in self.layer_groups()]}, copy_pages)

  def _warm_movers(self, what: dict, copy_pages) -> None:
    msg = dict(what, op="warm_movers", page_buckets=list(copy_pages))
    if msg not in self.warm_movers:  # once per worker
      self._channel.call(self.link, msg, self._channel.connect_timeout_s)
      self.warm_movers.append(msg)

  def copy_to(self, dst: Runner, src_pages: np.ndarray, dst_pages: np.ndarray,
              done: Callable[[Optional[BaseException]], None]) -> None:
    """An offer on this worker (`await_pull` under the copy's transfer ids) and, once
    it is made, the pulls on `dst`'s; `done` once they landed, one failed, or
    `copy_timeout_s` passed."""
    copy = _Copy(self, _remote(dst), done)

    def offered(fut):
      if fut.exception() is not None:
        copy.finish(fut.exception(), pulls_sent=False)
      else:
        # Sent even after a time-out (then cancelled first): the pulls drain the
        # offers from the source's memory and land nowhere.
        copy.pull(dst_pages)

    offer = self._channel.request(self.link, {"op": "offer", "uuids": copy.uuids,
                                              "pages": src_pages.tolist()})
    copy.track(self.link, offer)
    offer.add_done_callback(offered)

  def pools_lost(self) -> bool:
    return self.link.pool_reset

  def reset_pools(self) -> None:
    self.link.pool_reset = False  # the worker reset its pool when the command failed


def _remote(dst: Runner) -> RemoteRunner:
  if not isinstance(dst, RemoteRunner):
    raise TypeError(f"a worker copies KV to workers, not {type(dst).__name__}")
  return dst


class _Copy:
  """One request's KV copy between two workers: an offer and a pull per layer group
  of the source (a transfer id each, per destination process), the time-out that
  gives up on it, and `done` called once: when every group landed, or with the
  first failure. A copy given up on cancels its pulls on the destination before
  `done` (and so before the engine reuses the pages): a late one lands nowhere."""

  def __init__(self, src: RemoteRunner, dst: RemoteRunner,
               done: Callable[[Optional[BaseException]], None]):
    self._channel, self._src, self._dst, self._done = src._channel, src, dst, done
    processes = dst.link.info.get("processes", 1)
    self.groups = src.layer_groups()
    # Per group, one transfer id per destination process: each pulls its own copy.
    self.uuids = [[u + i for i in range(processes)] for u in
                  (next(src._copy_ids) * MAX_PROCESSES for _ in self.groups)]
    self._lock = threading.Lock()
    self._settled = False
    self._answered: set = set()  # groups whose pull answered (landed or failed)
    self._calls: List[tuple] = []  # (link, future) of every command sent
    self._timer = threading.Timer(src.copy_timeout_s, self._timed_out)
    self._timer.daemon = True
    self._timer.start()

  def track(self, link: Link, fut: cf.Future) -> None:
    with self._lock:
      self._calls.append((link, fut))

  def pull(self, dst_pages: np.ndarray) -> None:
    """Sends the pull of every group to the destination."""
    for g, (layers, uuids) in enumerate(zip(self.groups, self.uuids)):
      fut = self._channel.request(self._dst.link, {
          "op": "pull", "uuid": uuids[0], "src": self._src.link.info["transfer"],
          "pages": dst_pages.tolist(), "layers": [layers.start, layers.stop]})
      self.track(self._dst.link, fut)
      fut.add_done_callback(functools.partial(self._pulled, g))

  def _pulled(self, group: int, fut: cf.Future) -> None:
    with self._lock:
      self._answered.add(group)
      last = len(self._answered) == len(self.groups)
    if fut.exception() is not None:
      self.finish(fut.exception())
    elif last:
      self.finish(None)

  def _timed_out(self) -> None:
    self.finish(TimeoutError(f"not landed within {self._src.copy_timeout_s:g} s"))

  def finish(self, error: Optional[BaseException], pulls_sent: bool = True) -> None:
    """Settles the copy (once); `pulls_sent=False`: its offer failed, so no pull
    will ever be sent."""
    with self._lock:
      if self._settled:
        return
      self._settled = True
      # Before the engine hears of a failure (and reuses the destination pages): no
      # group still to land may scatter (`cluster.worker`), and no answer is awaited.
      for g, uuids in enumerate(self.uuids):
        if error is not None and pulls_sent and g not in self._answered:
          self._channel.request(self._dst.link, {"op": "cancel_pull", "uuid": uuids[0]})
      for link, fut in self._calls:
        if error is not None and not fut.done():
          self._channel.forget(link, fut, error)
    self._timer.cancel()
    self._done(error)


@dataclasses.dataclass(frozen=True)
class ClusterSettings:
  """The router's timeouts, in seconds (`cli.api`'s `cluster` config block)."""
  heartbeat_s: float = 0.5  # between pings of every worker
  timeout_s: float = 5.0  # silent this long: lost
  command_timeout_s: float = 600.0  # a command unanswered this long: lost
  copy_timeout_s: float = 60.0  # a KV copy not landed this long: recomputed
  connect_timeout_s: float = 120.0  # hello, setup and warm-up of a worker


# The worker role each device group kind needs.
ROLE_OF_GROUP = (("prefill", "prefill"), ("decode", "decode"), ("colocated", "replica"),
                 ("semi_pd", "replica"))


class WorkerPlacement:
  """The executor's `Placement` over worker processes: each device group the
  coordinator asks for is the next free worker of its role."""

  device_count: Optional[int] = None  # the workers' devices are theirs to count

  def __init__(self, model_name: str, attn_impl: str, workers: Dict[str, List[str]],
               settings: ClusterSettings = ClusterSettings()):
    """`workers`: per role ("prefill", "decode", "replica") the control addresses of
    its workers, e.g. "tcp://10.0.0.2:5601", one instance each."""
    self.model_name, self.attn_impl, self.settings = model_name, attn_impl, settings
    self._lost: Dict[int, Callable[[BaseException], None]] = {}
    self._runners: Dict[int, RemoteRunner] = {}
    self._channel = Channel(self._on_lost, settings.heartbeat_s, settings.timeout_s,
                            settings.command_timeout_s, settings.connect_timeout_s,
                            on_answer=self._on_answer)
    self._free = {role: list(addresses) for role, addresses in workers.items()}
    self.copy_timeout_s = settings.copy_timeout_s
    self._copy_ids = itertools.count(1)

  def open(self, group: str, spec: InstanceSpec, shape: RunnerShape,
           lost: Callable[[BaseException], None]) -> Runner:
    role = next((r for prefix, r in ROLE_OF_GROUP if group.startswith(prefix)), None)
    if role is None:
      raise ValueError(f"worker processes serve prefill, decode, colocated and semi-PD "
                       f"instances; got {group!r}")
    if spec.pp != 1:
      raise ValueError("pipeline stages (pp > 1) are not served across processes")
    if not self._free.get(role):
      raise ValueError(f"{group} needs a {role} worker; none is left (give one address "
                       f"per {role} instance)")
    channel = self._channel
    link = channel.connect(self._free[role].pop(0), role)
    setup = {"op": "setup", "spec": wire.spec_json(spec), "shape": dataclasses.asdict(shape),
             "attn_impl": self.attn_impl}
    self._admit(link, setup, returning=False)
    runner = RemoteRunner(channel, link, shape, self.copy_timeout_s, self._copy_ids, setup)
    self._lost[id(link)] = lost
    self._runners[id(link)] = runner
    return runner

  def _admit(self, link: Link, setup: dict, returning: bool, warmup: tuple = ()) -> None:
    """Checks the worker at `link` (role, model) and sets it up; raises ValueError
    when it is not the worker wanted, WorkerLost when it does not answer."""
    channel, timeout = self._channel, self._channel.connect_timeout_s
    info = channel.call(link, {"op": "hello"}, timeout, returning)
    if info["role"] != link.role:
      raise ValueError(f"worker {link.address} serves {info['role']}, not {link.role}")
    if info["model"] != self.model_name:
      raise ValueError(f"worker {link.address} serves model {info['model']!r}, the router "
                       f"{self.model_name!r}")
    link.info = info
    channel.call(link, setup, timeout, returning)
    for msg in warmup:
      channel.call(link, msg, timeout, returning)

  def sibling(self, runner: Runner, shape: RunnerShape) -> Runner:
    raise ValueError("pipeline stages (pp > 1) are not served across processes")

  def _on_lost(self, link: Link) -> None:
    lost = self._lost.get(id(link))
    if lost is not None and link.lost is not None:
      lost(link.lost)

  def _on_answer(self, link: Link) -> None:
    """A lost worker's address answers: take it back on a thread of its own."""
    runner = self._runners.get(id(link))
    if runner is None:
      self._channel.still_lost(link)
      return
    threading.Thread(target=self._readmit, args=(runner,), daemon=True,
                     name=f"pdserve-readmit-{link.address}").start()

  def _readmit(self, runner: RemoteRunner) -> None:
    link, start = runner.link, time.monotonic()
    try:
      warmups = ([runner.warmup_msg] if runner.warmup_msg else []) + runner.warm_movers
      self._admit(link, runner.setup, True, tuple(warmups))
    except Exception as e:  # noqa: BLE001 - it stays lost; the log says why
      logging.error("worker %s answered again but was not taken back: %s", link.address, e)
      self._channel.still_lost(link)
      return
    link.pool_reset = False
    self._channel.back(link)
    logging.warning("worker %s (%s) is back after %.1f s of set-up", link.address, link.role,
                    time.monotonic() - start)
    runner.on_back()

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
