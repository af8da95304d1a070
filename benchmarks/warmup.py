"""Engine warm-up per mode: seconds, programs compiled, and memory mappings added.

Builds one engine per mode in this one process, as a notebook comparing modes would,
and reports for each the wall time of `Engine(...)` (its warm-up compiles every
program bucket), the XLA compilations counted while it ran (per instance too), and
the growth of the process's memory mappings (`/proc/self/maps`; Linux's default
`vm.max_map_count` is 65,530, and each XLA:CPU executable holds about 200). Issue
13's goal is at most 16 programs per instance for the default configuration.

  python benchmarks/warmup.py                      # the demo engine config, 2 devices
  python benchmarks/warmup.py --default_config     # EngineConfig() (minutes per mode)
  python benchmarks/warmup.py --compilation_cache=/tmp/jaxcache   # a second run loads
"""

import argparse
import importlib.util
import os
import sys
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
                 help="JAX's persistent compilation cache folder ('' : none)")
  args = p.parse_args()
  if args.compilation_cache:
    from pdserve_jax.cli.common import use_compilation_cache
    use_compilation_cache(args.compilation_cache)

  import pdserve_jax as pdj
  from pdserve_jax.cli import modes as M
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
  print(f"{'mode':<26}{'instances':>10}{'warm-up s':>11}{'programs':>10}{'per inst':>10}"
        f"{'maps added':>12}{'maps now':>10}")
  for mode in args.modes.split(","):
    if args.default_config:
      dep = {"colocated_prefill_first": pdj.Colocated(),
             "colocated_chunked": pdj.Colocated(pdj.InstanceSpec(max_tokens=512),
                                                policy="chunked"),
             "disaggregated": pdj.Disaggregated(),
             "semi_pd": pdj.SemiPD()}[mode]
      cfg = pdj.EngineConfig()
    else:
      dep = M.deployment(demo, mode)
      cfg = pdj.EngineConfig(**demo.engine.to_dict(), ttft_slo=demo.ttft_slo,
                             tpot_slo=demo.tpot_slo)
    before = map_count()
    with CompileCounter() as c:
      t = time.perf_counter()
      engine = pdj.Engine(model, dep, cfg)
      seconds = time.perf_counter() - t
    instances = len(engine.coordinator.instances)
    engine.close()
    after = map_count()
    print(f"{mode:<26}{instances:>10}{seconds:>11.1f}{c.count:>10}"
          f"{c.count / instances:>10.1f}{after - before:>12}{after:>10}", flush=True)


if __name__ == "__main__":
  main()
