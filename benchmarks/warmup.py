"""Engine warm-up per mode: programs per instance, seconds cold and with the cache
warm, and memory mappings.

Builds engines of every mode one after another in this one process, as a notebook
comparing modes would. For each mode it reports the programs each instance
compiles, the wall time of `Engine(...)` (its warm-up runs every program bucket)
cold and again with JAX's persistent compilation cache warm (a second engine of the
same mode: new jitted functions, their executables loaded from the cache), the XLA
compilations counted each time, and the process's memory mappings after each
(`/proc/self/maps`; Linux's default `vm.max_map_count` is 65,530, and each
XLA:CPU executable holds about 200). Issue 13's goal: at most 16 programs per
instance for the default configuration.

  python benchmarks/warmup.py                      # the demo engine config
  python benchmarks/warmup.py --default_config     # EngineConfig() and default instances
"""

import argparse
import importlib.util
import os
import sys
import tempfile
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if importlib.util.find_spec("pdserve_jax") is None:
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MODES = ("colocated_prefill_first", "colocated_chunked", "disaggregated", "semi_pd")


def map_count() -> int:
  try:
    with open("/proc/self/maps") as f:
      return sum(1 for _ in f)
  except OSError:
    return -1


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--modes", default=",".join(MODES))
  p.add_argument("--default_config", action="store_true",
                 help="EngineConfig() and default instances instead of the demo's")
  p.add_argument("--compilation_cache", default="",
                 help="the persistent compilation cache folder (default: a fresh "
                      "temporary one, so the first engine of each mode is cold)")
  args = p.parse_args()
  from pdserve_jax.cli.common import use_compilation_cache
  use_compilation_cache(args.compilation_cache or tempfile.mkdtemp(prefix="pdserve-warmup-"))

  import pdserve_jax as pdj
  from pdserve_jax.cli import deployments as M
  from pdserve_jax.runtime.programs import CompileCounter

  demo = None
  if not args.default_config:
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "configs", "serve_demo.py")
    spec = importlib.util.spec_from_file_location("serve_demo", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    demo = module.get_config()
  model = pdj.load_demo()
  print(f"process memory mappings at start: {map_count()}")
  print(f"{'mode':<26}{'programs per instance':>24}{'cold s':>8}{'compiles':>9}"
        f"{'maps':>8}{'warm s':>8}{'compiles':>9}{'maps':>8}")
  for mode in args.modes.split(","):
    if args.default_config:
      dep = {"colocated_prefill_first": pdj.Colocated(),
             "colocated_chunked": pdj.Colocated(policy="chunked"),
             "disaggregated": pdj.Disaggregated(num_prefill=2),
             "semi_pd": pdj.SemiPD()}[mode]
      cfg = pdj.EngineConfig()
    else:
      dep = M.deployment(demo, mode)
      cfg = pdj.EngineConfig(**demo.engine.to_dict(), ttft_slo=demo.ttft_slo,
                             tpot_slo=demo.tpot_slo)
    row = []
    for _ in ("cold", "warm"):
      with CompileCounter() as c:
        t = time.perf_counter()
        engine = pdj.Engine(model, dep, cfg)
        seconds = time.perf_counter() - t
      per = list(engine.executor.program_counts().values())
      engine.close()
      row.append((seconds, c.count, map_count()))
    print(f"{mode:<26}{' '.join(map(str, per)):>24}"
          + "".join(f"{s:>8.1f}{n:>9}{m:>8}" for s, n, m in row), flush=True)


if __name__ == "__main__":
  main()
