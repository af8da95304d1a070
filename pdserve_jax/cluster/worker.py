"""A prefill, decode or replica instance as a process of its own, driven by a router.

Roles: "prefill" and "decode" (the disaggregated mode's instances, which move KV
between them), "replica" (a colocated replica or a semi-PD instance: both phases
on one pool, no KV copies). The role names the instance the router first gives a
worker; the worker runs whatever programs and copies it is sent, so an elastic
group (`Disaggregated.elastic`) serves the other phase on it later, and its
requests migrate out as any KV copy does.

The worker holds one instance's devices, mesh, weights, KV pool and programs (an
`InstanceRunner`) and does what the router's `WorkerPlacement` asks over a ZeroMQ
ROUTER socket, one JSON message per command: build the runner, warm it up, run a
packed or decode call on rows the router scheduled (its page tables included: the
router's schedulers own every page), offer a request's KV pages to a peer, or pull
a peer's offer into its own pages. KV moves with `jax.experimental.transfer`: the
prefill side gathers the pages into a buffer and offers it under the request's
transfer id (`await_pull`); the decode side pulls it, lays it out on its own mesh
and scatters it into its pool. The buffer is staged on one device of each side, so
any tp meets any tp. A runner whose layers run as groups (`layer_groups`) offers
each group's pages as an offer of its own, under a transfer id per (request,
group), and the decode side pulls and scatters each group on its own.

Layer-wise KV streaming: a packed call may carry streams (the router's
`RemoteRunner.packed`): right after each layer group's program is dispatched, the
worker gathers that group's pages of each stream and offers them (`await_pull`
takes the buffer before it is computed, so the offer costs the dispatch nothing
and the copy overlaps the later groups). The router has sent the decode worker
its pulls with the call: each waits for its offer (a pull may come before it) and
scatters its group as soon as it lands. A call that fails offers an error in
place of each group it did not offer, so no pull waits for good.

Three kinds of threads: the socket thread answers heartbeats at once (a busy
worker still proves it is alive) and sends every reply; the command thread runs
commands in arrival order, so the pool sees them as the router sent them; each
pull runs on a thread of its own, so a pull from a dead peer cannot stall the
steps, and its scatter joins the command queue. A pull the router gave up on
(`cancel_pull`, sent when the copy timed out, before the router reuses its pages),
or one begun before a new "setup" (a router that lost this worker, say while it
hung, and took it back), lands nowhere: its scatter is skipped, so late KV never
overwrites pages that another request holds by then. On "stop" (or `stop()`) the
socket closes and the command thread ends once its command is done, so no thread
is left inside jax when the process exits (CPython would end it mid-call: a
native abort).

One instance may span several processes (hosts): each calls
`jax.distributed.initialize` (on CPU with the gloo collectives) and the instance's
mesh covers all their devices. Process 0 (the leader) talks to the router and
forwards every device command, in its order, to the followers over a ZeroMQ channel
of its own; every process then runs the same programs (multi-controller JAX), and
the leader answers. For a KV pull each process pulls its own copy of the offer
(the source offers it once per destination process), the followers inside the
scatter command, so every process scatters at the same point of the sequence. To
offer KV, every process gathers the pages and all-gathers them (one program over
the instance's mesh), so the leader holds the whole buffer and offers it alone.

Limits: one router per worker; no authentication on any port, so bind them to
loopback or a private network; pipeline stages (pp > 1) are not served across
processes; an instance spanning processes stages each offer whole on every one of
its devices (the all-gather's cost, fine at research sizes).
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Optional

import jax
import numpy as np
import zmq

from pdserve_jax.cluster import wire
from pdserve_jax.cluster.wire import decode, encode
from pdserve_jax.core import deploy
from pdserve_jax.model import sharding
from pdserve_jax.runtime.programs import InstanceRunner
from pdserve_jax.runtime.buckets import RunnerShape

ROLES = ("prefill", "decode", "replica")


# Commands that run programs or move pool data: every process of an instance runs them.
DEVICE_OPS = ("setup", "warmup", "packed", "decode", "scatter", "score", "offer",
              "warm_movers")


def _host(a) -> np.ndarray:
  # Outputs are replicated: this process's copy is the whole array (and the only one
  # it can read when the mesh spans processes).
  return np.asarray(a.addressable_data(0))


def sampled_to_json(out, n: int) -> dict:
  """The first `n` rows of a call's `Sampled` output (device arrays), as lists."""
  return wire.sampled_json({k: _host(v)[:n] for k, v in out._asdict().items()})


class Worker:
  """One instance process; `serve()` runs until a "stop" command or the process ends."""

  def __init__(self, model, role: str, control: str = "tcp://127.0.0.1:0",
               transfer_host: str = "127.0.0.1", transfer_streams: int = 4,
               peers: str = ""):
    """`peers`: with several processes (`jax.distributed` initialized), the address
    the leader binds for its followers and they connect to."""
    if role not in ROLES:
      raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    self.process, self.processes = jax.process_index(), jax.process_count()
    if self.processes > 1 and not peers:
      raise ValueError("a worker spanning processes needs the leader's peers address")
    self.model, self.role = model, role
    self._ctx = zmq.Context()
    self._followers: list = []
    if self.processes > 1 and self.process > 0:
      self.address = None  # a follower: the leader talks to the router
      self._sock = self._ctx.socket(zmq.DEALER)
      self._sock.setsockopt(zmq.LINGER, 0)
      self._sock.connect(peers)
      self._sock.send_multipart([b"", encode({"op": "follow", "process": self.process})])
    else:
      self._sock = self._ctx.socket(zmq.ROUTER)
      self._sock.setsockopt(zmq.LINGER, 0)
      self._sock.bind(control)
      self.address = self._sock.getsockopt(zmq.LAST_ENDPOINT).decode()
      if self.processes > 1:
        self._peers = self._ctx.socket(zmq.ROUTER)
        self._peers.setsockopt(zmq.LINGER, 0)
        self._peers.bind(peers)
        while len(self._followers) < self.processes - 1:
          ident, _, raw = self._peers.recv_multipart()
          self._followers.append(ident)
    self._device = jax.local_devices()[0]  # its own: the global list starts with process 0
    self._transfer = start_transfer_server(self._device, transfer_host, transfer_streams)
    self.transfer_address = self._transfer.address()
    self._conns: dict = {}
    self.runner: Optional[InstanceRunner] = None
    self._replicate = None
    self._setups = 0  # pools set up so far: a pull lands only in the one it began in
    self._commands: "queue.Queue" = queue.Queue()
    self._replies: "queue.Queue" = queue.Queue()
    self._stop = threading.Event()
    self._pulls_lock = threading.Lock()
    self._cancelled: set = set()  # transfer ids of pulls the router gave up on
    self.skipped_scatters = 0  # late pulls that landed nowhere (tests read it)

  def stop(self) -> None:
    """Ends `serve()` (as a "stop" command does), from any thread."""
    self._stop.set()

  # -- the socket thread ---------------------------------------------------------

  def serve(self) -> None:
    if self.address is None:
      return self._follow()
    commands = threading.Thread(target=self._run_commands, name="pdserve-worker-commands",
                                daemon=True)
    commands.start()
    poller = zmq.Poller()
    poller.register(self._sock, zmq.POLLIN)
    router = None  # the connection of the router that set this worker up last
    while not self._stop.is_set():
      if poller.poll(5):
        ident, raw = self._sock.recv_multipart()
        msg = decode(raw)
        if msg["op"] == "setup":
          router = ident
        if msg["op"] == "ping":
          self._sock.send_multipart([ident, encode({"id": msg["id"], "ok": True})])
        elif msg["op"] == "stop":
          self._sock.send_multipart([ident, encode({"id": msg["id"], "ok": True})])
          self._stop.set()
        elif msg["op"] != "hello" and ident != router:
          # A connection the router replaced (it lost this worker, e.g. while the
          # process hung, and took it back): its late commands must not touch the
          # pool set up since.
          self._sock.send_multipart([ident, encode({
              "id": msg["id"], "ok": False, "error": "this worker was set up again by "
              "another connection; commands of this one are refused"})])
        else:
          self._commands.put((ident, msg))
      while True:
        try:
          ident, reply = self._replies.get_nowait()
        except queue.Empty:
          break
        self._sock.send_multipart([ident, encode(reply)])
    self._sock.close()
    self._commands.put(None)  # after the command it runs, if any
    commands.join()
    if self._followers:
      for ident in self._followers:
        self._peers.send_multipart([ident, b"", encode({"op": "stop"})])
      self._peers.close()
    self._ctx.term()

  # -- the command thread --------------------------------------------------------

  def _follow(self) -> None:
    """A follower: runs the leader's device commands in its order; answers nothing."""
    while True:
      _, raw = self._sock.recv_multipart()
      msg = decode(raw)
      if msg["op"] == "stop":
        return
      try:
        getattr(self, "_op_" + msg["op"])(None, msg)
      except Exception:  # noqa: BLE001 - the leader meets the same error and reports it
        logging.exception("follower command %s failed", msg.get("op"))
        self._reset_if_lost()

  def _forward(self, msg: dict) -> None:
    """The leader sends a device command to every follower before running it."""
    if not self._followers:
      return
    wire = encode({k: v for k, v in msg.items() if k != "buffer"})
    for ident in self._followers:
      self._peers.send_multipart([ident, b"", wire])

  def _run_commands(self) -> None:
    while (item := self._commands.get()) is not None:
      ident, msg = item
      # A pull the router gave up on, or one started before the pool was set up
      # again (a router that lost this worker and took it back), lands nowhere.
      if msg["op"] == "scatter" and (self._cancelled_pull(msg["uuid"])
                                     or msg["setup"] != self._setups):
        self.skipped_scatters += 1
        logging.warning("KV pull %d landed after the router gave up on it: not scattered",
                        msg["uuid"])
        self._replies.put((ident, {"id": msg["id"], "ok": False, "error": "pull cancelled"}))
        continue
      if msg["op"] in DEVICE_OPS:
        self._forward(msg)
      try:
        reply = getattr(self, "_op_" + msg["op"])(ident, msg)
      except Exception as e:  # noqa: BLE001 - the router learns why; the worker goes on
        logging.exception("command %s failed", msg.get("op"))
        reply = {"ok": False, "error": f"{type(e).__name__}: {e}",
                 "pool_reset": self._reset_if_lost()}
      if reply is not None:
        self._replies.put((ident, {"id": msg["id"], "ok": True, **reply}))

  def _reset_if_lost(self) -> bool:
    if self.runner is not None and self.runner.pools_lost():
      self.runner.reset_pools()
      return True
    return False

  def _op_hello(self, ident, msg) -> dict:
    return {"role": self.role, "devices": jax.device_count(), "processes": self.processes,
            "transfer": self.transfer_address, "model": self.model.config.name,
            "layers": self.model.config.num_layers}

  def _op_setup(self, ident, msg) -> dict:
    spec = deploy.InstanceSpec(**msg["spec"])
    shape = RunnerShape(**msg["shape"])
    if spec.pp != 1:
      raise ValueError("pipeline stages (pp > 1) are not served across processes")
    if spec.tp > jax.device_count():
      raise ValueError(f"tp={spec.tp} needs {spec.tp} devices; this worker has "
                       f"{jax.device_count()}")
    mesh = sharding.make_mesh(jax.devices()[:spec.tp])
    self.runner = InstanceRunner(self.model, mesh, shape, msg["attn_impl"])
    self._replicate = None  # `_gathered`'s all-gather, compiled for this mesh
    self._setups += 1
    return {"num_pages": self.runner.shape.num_pages}

  def _op_warmup(self, ident, msg) -> dict:
    return {"programs": self.runner.warmup(msg["packed"], msg["decode"])}

  def _op_warm_movers(self, ident, msg) -> dict:
    """Compiles KV movers for transfers of each of `page_buckets` pages: with
    `gather`, the offers' gathers of each of this runner's layer groups; the
    scatters of a peer's layer groups (`scatter`: [first, end) each)."""
    for size in msg["page_buckets"]:
      scratch = np.zeros(size, np.int32)
      for pool in self.runner.pools if msg["gather"] else ():
        jax.block_until_ready(self._gathered(scratch, pool))
      for lo, hi in msg["scatter"]:
        self._warm_scatter(self._pool_of(range(lo, hi)), range(lo, hi), scratch)
    jax.block_until_ready([pool.arrays for pool in self.runner.pools])
    return {}

  def _warm_scatter(self, pool, layers: range, scratch: np.ndarray) -> None:
    zeros = np.zeros((len(layers),) + pool.shape[1:2] + scratch.shape + pool.shape[3:],
                     pool.dtype)
    pool.scatter(jax.device_put({"k": zeros, "v": zeros}, pool.pool_shardings), scratch,
                 layers)

  def _pool_of(self, layers: range):
    """The pool that holds every layer of `layers` (a peer's layer group)."""
    for pool in self.runner.pools:
      if pool.layers.start <= layers.start and layers.stop <= pool.layers.stop:
        return pool
    held = [(p.layers.start, p.layers.stop) for p in self.runner.pools]
    raise ValueError(f"no pool of this worker holds layers [{layers.start}, {layers.stop}) "
                     f"whole; its pools hold {held}")

  def _op_packed(self, ident, msg) -> dict:
    """A packed call; with `streams` ({"pages", "uuids": per layer group, the transfer
    ids of each destination process}), each group's pages of each stream are offered
    as soon as the group's program is dispatched."""
    streams = msg.get("streams", [])
    offered = [0]  # layer groups offered so far

    def offer(pool):
      for s in streams:
        buf = self._gathered(np.asarray(s["pages"], np.int32), pool)
        if self.process == 0:
          for uuid in s["uuids"][offered[0]]:
            self._transfer.await_pull(uuid, [buf["k"], buf["v"]])
      offered[0] += 1

    try:
      out = self.runner.packed(msg["chunks"], msg["starts"], msg["tables"],
                               wire.sampling_from_json(msg["sampling"]),
                               after_stage=offer if streams else None)
    except Exception as e:
      self._offer_errors(streams, offered[0], e)
      raise
    return sampled_to_json(out, len(msg["chunks"]))

  def _offer_errors(self, streams: list, first: int, error: BaseException) -> None:
    """Offers an error in place of each layer group from `first` on that a failed call
    did not offer: the decode worker's pulls for them fail now instead of waiting."""
    if self.process != 0 or not streams:
      return
    from jax.experimental import transfer

    for group in range(first, len(self.runner.pools)):
      pool = self.runner.pools[group]
      for s in streams:
        spec = jax.ShapeDtypeStruct(
            (pool.shape[0], pool.shape[1], len(s["pages"])) + pool.shape[3:], pool.dtype,
            sharding=jax.sharding.SingleDeviceSharding(self._device))
        failed = transfer.make_error_array(spec, f"the prefill call failed: {error}")
        for uuid in s["uuids"][group]:
          self._transfer.await_pull(uuid, [failed, failed])

  def _op_decode(self, ident, msg) -> dict:
    out = self.runner.decode(msg["tokens"], msg["positions"], msg["tables"],
                             wire.sampling_from_json(msg["sampling"]))
    return sampled_to_json(out, len(msg["tokens"]))

  def _op_score(self, ident, msg) -> dict:
    """The prompt logprobs of `tokens` (`runtime.scoring`)."""
    from pdserve_jax.runtime.scoring import prompt_logprobs

    return wire.sampled_json(prompt_logprobs(self.runner, msg["tokens"])._asdict())

  def _gathered(self, pages: np.ndarray, pool) -> dict:
    """The pages' KV in `pool` (one layer group's) as one buffer on this process's
    first device. Across processes every process runs this (an all-gather over the
    instance's mesh)."""
    if self.processes == 1:
      return stage_pages(pool, pages, self._device)
    if self._replicate is None:
      whole = jax.sharding.NamedSharding(pool.sharding.mesh, jax.sharding.PartitionSpec())
      self._replicate = jax.jit(lambda b: b, out_shardings=whole)
    buf = {k: a.addressable_data(0) for k, a in self._replicate(pool.gather(pages)).items()}
    return jax.device_put(buf, self._device)

  def _op_offer(self, ident, msg) -> dict:
    """Gathers the pages of each layer group and offers them under each of its
    transfer ids (`uuids`: per group, one per destination process); the pages may be
    reused at once (the buffers are copies). A follower only takes its part in the
    gathers."""
    pages = np.asarray(msg["pages"], np.int32)
    bufs = [self._gathered(pages, pool) for pool in self.runner.pools]
    jax.block_until_ready(bufs)  # a failed gather fails this command, not a later pull
    if self.process == 0:
      for buf, uuids in zip(bufs, msg["uuids"]):
        for uuid in uuids:
          self._transfer.await_pull(uuid, [buf["k"], buf["v"]])
    return {}

  def _cancelled_pull(self, uuid: int) -> bool:
    with self._pulls_lock:
      if uuid in self._cancelled:
        self._cancelled.discard(uuid)
        return True
      return False

  def _op_cancel_pull(self, ident, msg) -> dict:
    """The router gave up on the copy under `uuid` (it timed out): its pull, landed
    later or not yet sent, must not scatter (the pages are the router's again)."""
    with self._pulls_lock:
      self._cancelled.add(msg["uuid"])
    return {}

  def _op_pull(self, ident, msg) -> None:
    """Pulls a peer's offer on a thread of its own; the scatter comes back here."""
    threading.Thread(target=self._pull, args=(ident, dict(msg, setup=self._setups)),
                     daemon=True, name=f"pdserve-pull-{msg['uuid']}").start()
    return None

  def _pull_own(self, msg) -> dict:
    """This process's copy of the offer, on its first device."""
    conn = self._conns.get(msg["src"])
    if conn is None:
      conn = self._conns[msg["src"]] = self._transfer.connect(msg["src"])
    layers = range(*msg["layers"])
    return pull_pages(conn, msg["uuid"] + self.process, self._pool_of(layers),
                      len(msg["pages"]), self._device, layers)

  def _pull(self, ident, msg) -> None:
    try:
      buf = self._pull_own(msg)
    except Exception as e:  # noqa: BLE001 - the router fails this request only
      logging.warning("KV pull %d failed: %s", msg["uuid"], e)
      self._cancelled_pull(msg["uuid"])
      self._replies.put((ident, {"id": msg["id"], "ok": False,
                                 "error": f"pull failed: {type(e).__name__}: {e}"}))
      return
    self._commands.put((ident, dict(msg, op="scatter", buffer=buf)))

  def _op_scatter(self, ident, msg) -> dict:
    buf = msg["buffer"] if "buffer" in msg else self._pull_own(msg)  # a follower pulls now
    layers = range(*msg["layers"])
    land_pages(self._pool_of(layers), buf, msg["pages"], self.processes > 1, layers)
    return {}


# -- moving KV between workers (the offer, pull and scatter above; benchmarks/transfer.py
# times each stage with these same functions) ----------------------------------------

# The transfer server moves a buffer in chunks of this size, up to 8 in flight over its
# streams. With jax's default (256 MiB) a KV buffer under 256 MiB is one chunk: copied
# whole into the server's staging memory, sent whole over one socket, copied whole out,
# one step after another, so extra streams idle. Chunks of 1 MiB overlap those steps:
# 2-4.8x the bytes per second on CPU (benchmarks/transfer.py prints both; README,
# "Measured figures"). It also sizes the address space each server maps for staging
# (3 x 8 parallel copies x chunk): 0.1 GiB instead of 6 GiB.
TRANSFER_CHUNK_BYTES = 1 << 20


def start_transfer_server(device, host: str, streams: int,
                          chunk_bytes: int = TRANSFER_CHUNK_BYTES):
  """A transfer server on `device`'s client, listening on `host` with `streams`
  transport sockets, moving buffers in chunks of `chunk_bytes`."""
  from jax.experimental import transfer

  return transfer.start_transfer_server(device.client, f"{host}:0", [f"{host}:0"] * streams,
                                        transfer_size=chunk_bytes)


def stage_pages(pool, pages, device) -> dict:
  """The listed pages of every layer of `pool`, gathered on the pool's mesh and staged
  whole on `device` (one buffer each for K and V, which any tp on the other side can
  take). Returns at once (async dispatch)."""
  return jax.device_put(pool.gather(np.asarray(pages, np.int32)), device)


def pull_pages(conn, uuid: int, pool, num_pages: int, device,
               layers: Optional[range] = None) -> dict:
  """Pulls an offer of `num_pages` pages of `layers` (default: all of `pool`'s) in
  `pool`'s layout onto `device`; returns once the bytes have landed."""
  num_layers = pool.shape[0] if layers is None else len(layers)
  shape = (num_layers, pool.shape[1], num_pages, pool.shape[3], pool.shape[4])
  spec = jax.ShapeDtypeStruct(shape, pool.dtype,
                              sharding=jax.sharding.SingleDeviceSharding(device))
  k, v = conn.pull(uuid, [spec, spec])
  jax.block_until_ready((k, v))
  return {"k": k, "v": v}


def land_pages(pool, buf: dict, pages, spans_processes: bool,
               layers: Optional[range] = None) -> None:
  """Lays a pulled buffer (of `layers`, default all of `pool`'s) out on the pool's
  mesh and scatters it into `pages`; returns once the pool is written."""
  if spans_processes:  # onto the global mesh from each process's host copy
    buf = {k: np.asarray(a) for k, a in buf.items()}
  pool.scatter(jax.device_put(buf, pool.pool_shardings), np.asarray(pages, np.int32),
               layers)
  jax.block_until_ready(pool.arrays)
