"""`benchmarks/transfer.py` moves KV bytes between two real processes with
`jax.experimental.transfer` (a ready buffer, and the worker's own hand-off functions
between two tp-2 page pools) and over TCP, and between meshes with `device_put`; the
script itself checks the bytes that arrive (and the pages that land) equal those
offered. No speed is asserted here (the ratios are the benchmark's output)."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_transfer_benchmark_moves_the_bytes_intact():
  proc = subprocess.run([sys.executable, "benchmarks/transfer.py", "--mib=2", "--reps=2",
                         "--streams=2"], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  for line in ("jax.experimental.transfer pull", "loopback TCP copy", "transfer / TCP",
               "scatter into the pool", "hand-off end to end", "jax.device_put",
               "device_put / memcpy"):
    assert line in proc.stdout
