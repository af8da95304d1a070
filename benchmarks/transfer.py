"""KV-cache bytes per second: between processes with `jax.experimental.transfer`
against a plain loopback TCP copy of the same bytes, and between meshes in one
process with `jax.device_put` against a memcpy of the same bytes. All in one run,
side by side, so the ratios compare like with like on whatever machine runs it.

The buffer is paged KV: [layers, 2 (K and V), pages, page_size, kv_heads * head_dim]
float32 (64 MiB by default). Between processes a child process (this script with
`--child`) offers it with `TransferServer.await_pull` under a request id and serves
the same bytes over a TCP socket; the parent pulls it with `TransferConnection.pull`
into its own device, then reads it over TCP. Each is timed `--reps` times; the
best is reported (the machine's noise only ever adds time). Goal (issue 10): the
transfer server at least 50% of TCP's bytes per second.

  python benchmarks/transfer.py [--mib 64] [--reps 5] [--streams 4]
"""

import argparse
import os
import socket
import subprocess
import sys
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402


def kv_shape(mib: int) -> tuple:
  # 8 layers, K and V, pages of 16 tokens, 8 heads x 16 dims; pages fill the size.
  per_page = 8 * 2 * 16 * 128 * 4
  return (8, 2, max(1, mib * 2**20 // per_page), 16, 128)


def child(mib: int, reps: int, streams: int) -> None:
  """Offers the buffer `reps` times over each channel; prints its addresses."""
  import jax
  from jax.experimental import transfer

  x = np.random.default_rng(0).standard_normal(kv_shape(mib), dtype=np.float32)
  arr = jax.device_put(x, jax.devices()[0])
  server = transfer.start_transfer_server(jax.devices()[0].client, "127.0.0.1:0",
                                          ["127.0.0.1:0"] * streams)
  for uuid in range(reps):
    server.await_pull(uuid, [arr])
  lsock = socket.socket()
  lsock.bind(("127.0.0.1", 0))
  lsock.listen(1)
  print(f"{server.address()} {lsock.getsockname()[1]}", flush=True)
  payload = memoryview(x).cast("B")
  for _ in range(reps):
    conn, _ = lsock.accept()
    with conn:
      conn.recv(1)  # the reader's go
      conn.sendall(payload)
  sys.stdin.readline()  # stay up until the parent is done pulling


def between_processes(mib: int, reps: int, streams: int) -> tuple[float, float, int]:
  """(transfer-server bytes/s, TCP bytes/s, bytes), best of `reps` each."""
  import jax
  from jax.experimental import transfer

  proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--child",
                           f"--mib={mib}", f"--reps={reps}", f"--streams={streams}"],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                          env=dict(os.environ, XLA_FLAGS="--xla_force_host_platform_"
                                   "device_count=1"))
  try:
    address, port = proc.stdout.readline().split()
    shape = kv_shape(mib)
    nbytes = int(np.prod(shape)) * 4
    dev = jax.devices()[0]
    server = transfer.start_transfer_server(dev.client, "127.0.0.1:0",
                                            ["127.0.0.1:0"] * streams)
    conn = server.connect(address)
    spec = jax.ShapeDtypeStruct(shape, np.float32,
                                sharding=jax.sharding.SingleDeviceSharding(dev))
    pulls = []
    for uuid in range(reps):
      t = time.perf_counter()
      (got,) = conn.pull(uuid, [spec])
      got.block_until_ready()
      pulls.append(time.perf_counter() - t)
    want = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
    assert np.array_equal(np.asarray(got), want), "pulled bytes differ"
    buf = bytearray(nbytes)
    view = memoryview(buf)
    tcps = []
    for _ in range(reps):
      t = time.perf_counter()
      with socket.create_connection(("127.0.0.1", int(port))) as s:
        s.sendall(b"g")
        got_n = 0
        while got_n < nbytes:
          n = s.recv_into(view[got_n:])
          if not n:
            raise ConnectionError("TCP sender closed early")
          got_n += n
      tcps.append(time.perf_counter() - t)
    assert np.array_equal(np.frombuffer(buf, np.float32).reshape(shape), want)
    return nbytes / min(pulls), nbytes / min(tcps), nbytes
  finally:
    proc.stdin.write("done\n")
    proc.stdin.flush()
    proc.wait(timeout=60)


def between_meshes(mib: int, reps: int) -> tuple[float, float, int]:
  """(device_put bytes/s from a 4-device mesh to another, memcpy bytes/s, bytes)."""
  import jax
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

  devs = np.array(jax.devices()[:8])
  src = NamedSharding(Mesh(devs[:4], ("tp",)), P(None, None, None, None, "tp"))
  dst = NamedSharding(Mesh(devs[4:8], ("tp",)), P(None, None, None, None, "tp"))
  x = np.random.default_rng(1).standard_normal(kv_shape(mib), dtype=np.float32)
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
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--mib", type=int, default=64)
  p.add_argument("--reps", type=int, default=5)
  p.add_argument("--streams", type=int, default=4,
                 help="transport sockets per transfer server, which the copy spreads over")
  p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.child:
    return child(args.mib, args.reps, args.streams)
  gb = lambda v: f"{v / 1e9:6.2f} GB/s"
  pull, tcp, n = between_processes(args.mib, args.reps, args.streams)
  print(f"between processes, {n / 2**20:.0f} MiB of KV, best of {args.reps}:")
  print(f"  jax.experimental.transfer pull  {gb(pull)}  ({args.streams} streams)")
  print(f"  loopback TCP copy               {gb(tcp)}")
  print(f"  transfer / TCP                  {pull / tcp:6.2f}  (goal >= 0.50: "
        f"{'met' if pull >= 0.5 * tcp else 'missed'})")
  put, cp, n = between_meshes(args.mib, args.reps)
  print(f"in one process, 4-device mesh to another, {n / 2**20:.0f} MiB:")
  print(f"  jax.device_put                  {gb(put)}")
  print(f"  numpy memcpy                    {gb(cp)}")
  print(f"  device_put / memcpy             {put / cp:6.2f}")


if __name__ == "__main__":
  main()
