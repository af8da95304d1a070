"""Accelerator specs for the latency models and the planner.

Peak figures per device, from vendor datasheets and the Cloud TPU docs; measured
performance is lower, and the latency models apply their own efficiency factors.
Bandwidths are per device and per direction. `intra_node_bw` is the fast link
between devices of one node (NVLink, or ICI within a TPU host); `inter_node_bw` is
what one device gets to a device in another node of the same cluster or slice: its
share of the node's InfiniBand NICs on GPU systems, and ICI again on TPU slices,
which span hosts. Capacities are bytes as the vendor counts them.
"""

from __future__ import annotations

import dataclasses

GB = 1e9
GiB = 2**30
TFLOPS = 1e12


@dataclasses.dataclass(frozen=True)
class HardwareSpec:
  name: str
  peak_flops: float       # dense bf16 FLOP/s
  hbm_bandwidth: float    # bytes/s
  hbm_bytes: float        # bytes
  intra_node_bw: float    # bytes/s per direction
  inter_node_bw: float    # bytes/s per direction
  devices_per_node: int
  # Fixed seconds per KV copy beside its bytes / bandwidth (launching the copy and
  # the programs around it); 0 in the datasheet specs, profiled for a host.
  link_latency_s: float = 0.0

  def link_bandwidth(self, same_node: bool) -> float:
    return self.intra_node_bw if same_node else self.inter_node_bw


SPECS = {s.name: s for s in [
    # NVIDIA A100 Tensor Core GPU datasheet (SXM): BF16 312 TFLOPS dense; 40GB HBM2 at
    # 1,555 GB/s, 80GB HBM2e at 2,039 GB/s; NVLink 600 GB/s both directions together.
    # DGX A100 user guide: 8 GPUs and 8x 200 Gb/s HDR InfiniBand, i.e. 25 GB/s a GPU.
    HardwareSpec("a100-40gb", 312 * TFLOPS, 1555 * GB, 40 * GiB, 300 * GB, 25 * GB, 8),
    HardwareSpec("a100-80gb", 312 * TFLOPS, 2039 * GB, 80 * GiB, 300 * GB, 25 * GB, 8),
    # NVIDIA H100 Tensor Core GPU datasheet (SXM): BF16 1,979 TFLOPS with sparsity,
    # so 989 dense; 80GB HBM3 at 3.35 TB/s; NVLink 900 GB/s both directions.
    # DGX H100: 8 GPUs and 8x 400 Gb/s ConnectX-7, i.e. 50 GB/s a GPU.
    HardwareSpec("h100-sxm", 989 * TFLOPS, 3350 * GB, 80 * GB, 450 * GB, 50 * GB, 8),
    # NVIDIA H200 Tensor Core GPU datasheet (SXM): BF16 989 TFLOPS dense; 141GB HBM3e
    # at 4.8 TB/s; NVLink 900 GB/s. HGX H200 nodes: 8 GPUs, 400 Gb/s a GPU.
    HardwareSpec("h200", 989 * TFLOPS, 4800 * GB, 141 * GB, 450 * GB, 50 * GB, 8),
    # Cloud TPU docs, "TPU v4": 275 TFLOPS bf16, 32 GiB HBM2 at 1,200 GBps; 4 chips a
    # host. ICI (Jouppi et al., ISCA 2023, "TPU v4"): 6 links of 50 GB/s a direction.
    HardwareSpec("tpu-v4", 275 * TFLOPS, 1200 * GB, 32 * GiB, 300 * GB, 300 * GB, 4),
    # Cloud TPU docs, "TPU v5e": 197 TFLOPS bf16, 16 GB HBM2 at 819 GBps, ICI 1,600
    # Gbps (400 GBps both directions), 8 chips a host.
    HardwareSpec("tpu-v5e", 197 * TFLOPS, 819 * GB, 16 * GB, 200 * GB, 200 * GB, 8),
    # Cloud TPU docs, "TPU v5p": 459 TFLOPS bf16, 95 GB HBM2e at 2,765 GBps, ICI 4,800
    # Gbps; 4 chips a host (the 2x2x1 slice is one host).
    HardwareSpec("tpu-v5p", 459 * TFLOPS, 2765 * GB, 95 * GB, 600 * GB, 600 * GB, 4),
    # Cloud TPU docs, "TPU v6e": 918 TFLOPS bf16, 32 GB HBM at 1,638 GBps, ICI 800 GBps
    # both directions, 8 chips a host.
    HardwareSpec("tpu-v6e", 918 * TFLOPS, 1638 * GB, 32 * GB, 400 * GB, 400 * GB, 8),
]}

_ALIASES = {"a100": "a100-80gb", "h100": "h100-sxm", "h200-sxm": "h200",
            "v4": "tpu-v4", "v5e": "tpu-v5e", "v5p": "tpu-v5p", "v6e": "tpu-v6e",
            "trillium": "tpu-v6e"}


def get_hardware(name: str) -> HardwareSpec:
  """The spec named `name` (case-insensitive; a few short aliases accepted)."""
  key = name.lower()
  key = _ALIASES.get(key, key)
  if key not in SPECS:
    raise ValueError(f"unknown hardware {name!r}; known: {sorted(SPECS)}")
  return SPECS[key]
