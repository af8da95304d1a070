"""HBM of the engine's programs for Llama-3-8B on a TPU v5e-8, compiled on this CPU
host (libtpu's compile-only devices), and how many KV pages fit beside them.

For tp=8 and tp=4, the packed program at its largest bucket and the decode program
at its largest batch (bfloat16, 16-token pages, the pool of `--pages` pages) are
compiled with the Mosaic kernels; `memory_analysis()` gives each program's per-chip
arguments, outputs, aliased (donated pool) and temporary bytes. The pages that fit:
a chip's HBM less what the arguments hold besides the pool (the weights on that chip,
the replicated embedding included) and the larger program's temporaries, over one
page's K and V bytes on a chip.

  python benchmarks/tpu_programs.py [--pages=4096] [--tp=8,4]
"""

import argparse
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

V5E_HBM = 16 * 2**30


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--pages", type=int, default=4096)
  p.add_argument("--tp", default="8,4")
  args = p.parse_args()
  import jax.numpy as jnp
  from jax.experimental import topologies

  from pdserve_jax.model import sharding
  from pdserve_jax.model.config import get_preset
  from pdserve_jax.runtime.buckets import RunnerShape
  from pdserve_jax.runtime.cost import peak_bytes
  from pdserve_jax.runtime.programs import lower_programs

  cfg = get_preset("llama3-8b")
  devices = topologies.get_topology_desc("v5e:2x4", "tpu").devices
  shape = RunnerShape(page_size=16, num_pages=args.pages, max_rows=64, max_step_tokens=2048,
                      max_seq_len=2048, min_step_tokens=512)
  print(f"llama3-8b bf16 on {devices[0].device_kind} x{len(devices)}; pool "
        f"{args.pages} pages of 16 tokens; packed bucket {shape.token_buckets[-1]} tokens, "
        f"decode batch {shape.decode_batches[-1]}; GiB per chip")
  print(f"{'tp':>3} {'program':<8}{'args':>8}{'outputs':>9}{'aliased':>9}{'temps':>8}"
        f"{'peak':>8}  {'pages that fit':>15}")
  for tp in (int(t) for t in args.tp.split(",")):
    splits = min(tp, cfg.num_kv_heads)  # KV heads split over tp (replicated past 8)
    page_bytes = shape.page_size * cfg.kv_bytes_per_token(2) // splits
    lowered = lower_programs(cfg, sharding.make_mesh(devices[:tp]), shape, jnp.bfloat16)
    temps, resident = 0, 0
    rows = []
    for name, low in lowered.items():
      m = low.compile().memory_analysis()
      peak = peak_bytes(m)
      temps = max(temps, m.temp_size_in_bytes)
      resident = max(resident, m.argument_size_in_bytes - m.alias_size_in_bytes)
      rows.append((name, m, peak))
    fit = int((V5E_HBM - resident - temps) // page_bytes)
    for name, m, peak in rows:
      g = lambda b: f"{b / 2**30:.2f}"
      print(f"{tp:>3} {name:<8}{g(m.argument_size_in_bytes):>8}{g(m.output_size_in_bytes):>9}"
            f"{g(m.alias_size_in_bytes):>9}{g(m.temp_size_in_bytes):>8}{g(peak):>8}  "
            f"{fit if name == 'packed' else '':>15}", flush=True)


if __name__ == "__main__":
  main()
