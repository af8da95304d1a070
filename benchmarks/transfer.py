"""KV-cache bytes per second between processes, with `jax.experimental.transfer` against
a plain loopback TCP copy of the same bytes, and where the worker's hand-off spends its
time; and between meshes in one process, `jax.device_put` against a memcpy. All in one
run, side by side, so the ratios compare like with like on whatever machine runs it.

The bytes are a request's KV pages in the pool's layout: K and V, each
[layers, kv_heads, pages, page_size, head_dim] float32 (64 MiB together by default).
A child process (this script with `--child`) holds them and serves them three ways:

1. The transport alone: a ready buffer on one device, offered (`await_pull`) on
   transfer servers started as the worker starts its own
   (`cluster.worker.start_transfer_server`), one per chunk size of `--chunks` (the
   worker's, and jax's default of 256 MiB, unless told), and written to a TCP socket.
   The parent pulls each onto one device through a server of the same chunk size and
   reads the socket, all interleaved. This is the floor under the worker's hand-off:
   nothing else runs.
2. The worker's hand-off, stage by stage, with the worker's own functions on real
   page pools: the child's pool on a tp-device mesh gathers the pages (`pool.gather`)
   and stages them on one device (`stage_pages`), the parent pulls them
   (`pull_pages`), lays them out on its own tp mesh and scatters them into its pool
   (`land_pages`); each stage is timed on its own, and the landed pages are checked
   against the offered ones.
3. In one process, `jax.device_put` of the same bytes from a 4-device mesh to another.

Each figure is the best of `--reps` (the machine's noise only ever adds time).
Goal (issue 22): the transfer at least 0.7 of TCP's bytes per second.

  python benchmarks/transfer.py [--mib 64] [--reps 5] [--streams 4] [--tp 2]
                                [--chunks 0.25,1,4,16,256]
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402

if __package__ is None and __name__ == "__main__":
  # Run from a checkout without an install: use the repo root.
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

LAYERS, KV_HEADS, PAGE_SIZE, HEAD_DIM = 8, 8, 16, 128
PAGE_BYTES = 2 * LAYERS * KV_HEADS * PAGE_SIZE * HEAD_DIM * 4  # K and V of one page
SPARE_PAGES = 8  # pool pages besides the transferred ones, so page ids are scattered
HANDOFF_UUIDS = 1 << 20  # transfer ids of part 2, apart from part 1's


def num_pages(mib: int) -> int:
  return max(1, mib * 2**20 // PAGE_BYTES)


def page_pool(tp: int, pages: int):
  """A zeroed `PagePool` of the benchmark's shape on the first `tp` devices."""
  import jax

  from pdserve_jax.kv.pool import PagePool
  from pdserve_jax.model import sharding
  from pdserve_jax.model.config import ModelConfig

  cfg = ModelConfig(name="transfer-bench", arch="llama", vocab_size=256, hidden_size=1024,
                    intermediate_size=1024, num_layers=LAYERS, num_heads=KV_HEADS,
                    num_kv_heads=KV_HEADS, head_dim=HEAD_DIM)
  return PagePool(cfg, sharding.make_mesh(jax.devices()[:tp]), pages, PAGE_SIZE)


def pool_bytes(shape: tuple) -> dict:
  """The pool contents both processes agree on (a seeded draw)."""
  rng = np.random.default_rng(0)
  return {k: rng.standard_normal(shape, dtype=np.float32) for k in ("k", "v")}


def page_lists(pages: int, reps: int) -> list:
  """Per repetition, (source pages, destination pages): shuffled, none shared."""
  rng = np.random.default_rng(1)
  return [(rng.permutation(pages + SPARE_PAGES)[:pages].tolist(),
           rng.permutation(pages + SPARE_PAGES)[:pages].tolist()) for _ in range(reps)]


def child(mib: int, reps: int, streams: int, tp: int, chunks: list) -> None:
  """The offering side: serves parts 1 and 2 until the parent says "done"."""
  import jax

  from pdserve_jax.cluster import worker

  pages = num_pages(mib)
  dev = jax.devices()[0]
  pool = page_pool(tp, pages + SPARE_PAGES)
  data = pool_bytes(pool.shape)
  pool.arrays = jax.device_put(data, pool.pool_shardings)
  # Part 1: the same bytes as the hand-off moves, ready on one device.
  ready = {k: np.ascontiguousarray(a[:, :, :pages]) for k, a in data.items()}
  arrays = [jax.device_put(ready["k"], dev), jax.device_put(ready["v"], dev)]
  servers = [worker.start_transfer_server(dev, "127.0.0.1", streams, chunk)
             for chunk in chunks]
  for server in servers:
    for uuid in range(reps):
      server.await_pull(uuid, arrays)
  ours = worker.start_transfer_server(dev, "127.0.0.1", streams)  # for part 2
  lsock = socket.socket()
  lsock.bind(("127.0.0.1", 0))
  lsock.listen(1)
  payload = memoryview(np.concatenate([ready["k"].ravel(), ready["v"].ravel()])).cast("B")

  def serve_tcp():
    for _ in range(reps):
      conn, _ = lsock.accept()
      with conn:
        conn.recv(1)  # the reader's go
        conn.sendall(payload)

  threading.Thread(target=serve_tcp, daemon=True).start()
  print(json.dumps({"chunks": [server.address() for server in servers],
                    "ours": ours.address(), "tcp": lsock.getsockname()[1]}), flush=True)
  # Part 2: one offer per line from the parent, timed stage by stage.
  for line in sys.stdin:
    cmd = json.loads(line)
    if "offer" not in cmd:
      return
    src_pages = np.asarray(cmd["pages"], np.int32)
    # The two steps of `stage_pages` one at a time, then the worker's offer itself.
    t = time.perf_counter()
    gathered = jax.block_until_ready(pool.gather(src_pages))
    gather = time.perf_counter() - t
    t = time.perf_counter()
    jax.block_until_ready(jax.device_put(gathered, dev))
    stage = time.perf_counter() - t
    t = time.perf_counter()
    buf = jax.block_until_ready(worker.stage_pages(pool, src_pages, dev))
    ours.await_pull(cmd["offer"], [buf["k"], buf["v"]])
    offer = time.perf_counter() - t
    print(json.dumps({"gather": gather, "stage": stage, "offer": offer}), flush=True)


def transport_alone(addresses: dict, pages: int, reps: int, streams: int, chunks: list):
  """Part 1: (bytes/s of a pull at each chunk size, bytes/s over TCP)."""
  import jax

  from pdserve_jax.cluster import worker

  dev = jax.devices()[0]
  shape = (LAYERS, KV_HEADS, pages, PAGE_SIZE, HEAD_DIM)
  spec = jax.ShapeDtypeStruct(shape, np.float32,
                              sharding=jax.sharding.SingleDeviceSharding(dev))
  # Each pulls through a server of its own chunk size, as two workers would.
  conns = [worker.start_transfer_server(dev, "127.0.0.1", streams, chunk).connect(address)
           for chunk, address in zip(chunks, addresses["chunks"])]
  nbytes = pages * PAGE_BYTES
  buf = bytearray(nbytes)
  view = memoryview(buf)
  pulls: list = [[] for _ in chunks]
  tcps = []
  want = {k: a[:, :, :pages] for k, a in pool_bytes(shape[:2] + (pages + SPARE_PAGES,)
                                                     + shape[3:]).items()}
  for uuid in range(reps):
    for times, conn, chunk in zip(pulls, conns, chunks):
      t = time.perf_counter()
      got = conn.pull(uuid, [spec, spec])
      jax.block_until_ready(got)
      times.append(time.perf_counter() - t)
      for a, key in zip(got, ("k", "v")):
        assert np.array_equal(np.asarray(a), want[key]), f"{chunk} B chunks: bytes differ"
    t = time.perf_counter()
    with socket.create_connection(("127.0.0.1", addresses["tcp"])) as s:
      s.sendall(b"g")
      got_n = 0
      while got_n < nbytes:
        n = s.recv_into(view[got_n:])
        if not n:
          raise ConnectionError("TCP sender closed early")
        got_n += n
    tcps.append(time.perf_counter() - t)
  flat = np.frombuffer(buf, np.float32)
  assert np.array_equal(flat[:flat.size // 2].reshape(shape), want["k"]), "TCP bytes differ"
  return [nbytes / min(times) for times in pulls], nbytes / min(tcps)


def handoff(proc, address: str, pages: int, reps: int, streams: int, tp: int) -> dict:
  """Part 2: the best time of each stage, and of the whole hand-off, in seconds."""
  import jax

  from pdserve_jax.cluster import worker

  dev = jax.devices()[0]
  pool = page_pool(tp, pages + SPARE_PAGES)
  conn = worker.start_transfer_server(dev, "127.0.0.1", streams).connect(address)
  want = pool_bytes(pool.shape)
  stages: dict = {k: [] for k in ("gather", "stage", "pull", "layout", "scatter", "total")}
  for rep, (src_pages, dst_pages) in enumerate(page_lists(pages, reps)):
    proc.stdin.write(json.dumps({"offer": HANDOFF_UUIDS + rep, "pages": src_pages}) + "\n")
    proc.stdin.flush()
    offered = json.loads(proc.stdout.readline())
    t = time.perf_counter()
    buf = worker.pull_pages(conn, HANDOFF_UUIDS + rep, pool, pages, dev)
    pull = time.perf_counter() - t
    # The two steps of `land_pages` one at a time, then `land_pages` itself.
    t = time.perf_counter()
    laid_out = jax.block_until_ready(jax.device_put(buf, pool.pool_shardings))
    layout = time.perf_counter() - t
    t = time.perf_counter()
    pool.scatter(laid_out, np.asarray(dst_pages, np.int32))
    jax.block_until_ready(pool.arrays)
    scatter = time.perf_counter() - t
    t = time.perf_counter()
    worker.land_pages(pool, buf, dst_pages, spans_processes=False)
    land = time.perf_counter() - t
    got = pool.read_pages(dst_pages)
    for key in ("k", "v"):
      assert np.array_equal(got[key], want[key][:, :, src_pages]), "landed pages differ"
    stages["gather"].append(offered["gather"])
    stages["stage"].append(offered["stage"])
    stages["pull"].append(pull)
    stages["layout"].append(layout)
    stages["scatter"].append(scatter)
    stages["total"].append(offered["offer"] + pull + land)
  return {k: min(v) for k, v in stages.items()}


def between_processes(mib: int, reps: int, streams: int, tp: int, chunks: list):
  pages = num_pages(mib)
  proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--child",
                           f"--mib={mib}", f"--reps={reps}", f"--streams={streams}",
                           f"--tp={tp}", "--chunks=" + ",".join(map(str, chunks))],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                          env=dict(os.environ, XLA_FLAGS="--xla_force_host_platform_"
                                   f"device_count={tp}"))
  try:
    addresses = json.loads(proc.stdout.readline())
    alone = transport_alone(addresses, pages, reps, streams, chunks)
    stages = handoff(proc, addresses["ours"], pages, reps, streams, tp)
    return alone, stages, pages * PAGE_BYTES
  finally:
    proc.stdin.write("{}\n")
    proc.stdin.flush()
    proc.wait(timeout=60)


def between_meshes(mib: int, reps: int) -> tuple[float, float, int]:
  """(device_put bytes/s from a 4-device mesh to another, memcpy bytes/s, bytes)."""
  import jax
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

  devs = np.array(jax.devices()[:8])
  src = NamedSharding(Mesh(devs[:4], ("tp",)), P(None, "tp"))
  dst = NamedSharding(Mesh(devs[4:8], ("tp",)), P(None, "tp"))
  shape = (LAYERS, KV_HEADS, 2 * num_pages(mib), PAGE_SIZE, HEAD_DIM)  # K and V's bytes
  x = np.random.default_rng(1).standard_normal(shape, dtype=np.float32)
  a = jax.device_put(x, src).block_until_ready()
  puts, copies = [], []
  for _ in range(reps):
    t = time.perf_counter()
    jax.device_put(a, dst).block_until_ready()
    puts.append(time.perf_counter() - t)
    out = np.empty_like(x)
    t = time.perf_counter()
    np.copyto(out, x)
    copies.append(time.perf_counter() - t)
  return x.nbytes / min(puts), x.nbytes / min(copies), x.nbytes


def main():
  from pdserve_jax.cluster import worker

  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--mib", type=int, default=64)
  p.add_argument("--reps", type=int, default=5)
  p.add_argument("--streams", type=int, default=4,
                 help="transport sockets per transfer server, which the copy spreads over")
  p.add_argument("--tp", type=int, default=2, help="both pools' tp in the hand-off")
  p.add_argument("--chunks", default=f"{worker.TRANSFER_CHUNK_BYTES},{256 << 20}",
                 help="transfer servers' chunk sizes to pull with in part 1: bytes, "
                      "comma-separated (default: the worker's, and jax's default)")
  p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  args = p.parse_args()
  chunks = [int(float(c)) for c in args.chunks.split(",")]
  if args.child:
    return child(args.mib, args.reps, args.streams, args.tp, chunks)

  gb = lambda v: f"{v / 1e9:6.2f} GB/s"
  ms = lambda s: f"{s * 1e3:8.1f} ms"
  mib = lambda b: f"{b / 2**20:g} MiB"
  (pulls, tcp), stages, n = between_processes(args.mib, args.reps, args.streams, args.tp,
                                              chunks)
  print(f"between processes, {n / 2**20:.0f} MiB of KV, best of {args.reps}:")
  print(f"  the transport alone (a ready buffer, one device to one device, "
        f"{args.streams} streams):")
  for chunk, pull in zip(chunks, pulls):
    what = {worker.TRANSFER_CHUNK_BYTES: " (the worker's)", 256 << 20: " (jax's default)"}
    print(f"  jax.experimental.transfer pull  {gb(pull)}  / TCP {pull / tcp:5.2f}  "
          f"chunks of {mib(chunk)}{what.get(chunk, '')}")
  print(f"  loopback TCP copy               {gb(tcp)}")
  if worker.TRANSFER_CHUNK_BYTES in chunks:
    ours = pulls[chunks.index(worker.TRANSFER_CHUNK_BYTES)]
    print(f"  transfer / TCP                  {ours / tcp:6.2f}  (the worker's chunks; "
          f"goal >= 0.70: {'met' if ours >= 0.7 * tcp else 'missed'})")
  print(f"  the worker's hand-off, tp {args.tp} -> tp {args.tp}, stage by stage:")
  for key, what in (("gather", "gather on the prefill mesh"),
                    ("stage", "stage on one device"),
                    ("pull", "pull (the transport)"),
                    ("layout", "lay out on the decode mesh"),
                    ("scatter", "scatter into the pool")):
    print(f"    {what:<30}{ms(stages[key])}")
  total = stages["total"]
  print(f"  hand-off end to end             {ms(total)}  {gb(n / total)}; "
        f"/ TCP {n / total / tcp:5.2f}")
  put, cp, n = between_meshes(args.mib, args.reps)
  print(f"in one process, 4-device mesh to another, {n / 2**20:.0f} MiB:")
  print(f"  jax.device_put                  {gb(put)}")
  print(f"  numpy memcpy                    {gb(cp)}")
  print(f"  device_put / memcpy             {put / cp:6.2f}")


if __name__ == "__main__":
  main()
