"""`import pdserve_jax` and its jax-free modules must not load jax; the rest load on use.

Each check runs in a fresh interpreter: this test process has jax loaded already.
"""

import os
import subprocess
import sys
import textwrap

import pdserve_jax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_fresh(code: str) -> None:
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
  proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr


# Folders whose every module must import with jax unimportable (the house's rule), and
# single modules outside them that the router process and the planner rely on.
JAX_FREE_FOLDERS = ("pdserve_jax/core", "pdserve_jax/sim")
JAX_FREE_MODULES = ("pdserve_jax", "pdserve_jax.workloads", "pdserve_jax.results",
                    "pdserve_jax.serving.executor", "pdserve_jax.serving.engine",
                    "pdserve_jax.serving.output", "pdserve_jax.serving.config",
                    "pdserve_jax.cluster.router", "pdserve_jax.cluster.wire",
                    "pdserve_jax.api.app", "pdserve_jax.model.card", "pdserve_jax.cli.deployments")


def _modules_under(folder: str) -> list:
  out = []
  for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
    for f in sorted(files):
      if f.endswith(".py"):
        rel = os.path.relpath(os.path.join(dirpath, f), ROOT)[:-3].replace(os.sep, ".")
        out.append(rel.removesuffix(".__init__"))
  return out


def test_core_sim_and_router_modules_import_with_jax_blocked():
  """Catches a jax import (direct or through another module) creeping into the
  decisions, the simulator, or what the router process loads: each module is imported
  in a fresh interpreter where importing jax raises."""
  modules = [m for folder in JAX_FREE_FOLDERS for m in _modules_under(folder)]
  assert "pdserve_jax.core.coordinator" in modules and "pdserve_jax.sim.planner" in modules
  run_fresh(f"""
      import importlib, sys
      class Blocked:
        def find_spec(self, name, path=None, target=None):
          if name == "jax" or name.startswith(("jax.", "jaxlib")):
            raise ImportError(f"{{name}} is blocked: this module must not import jax")
      sys.meta_path.insert(0, Blocked())
      for m in {modules + list(JAX_FREE_MODULES)!r}:
        importlib.import_module(m)
  """)


def test_programs_return_as_many_top_logprobs_as_requests_may_ask():
  # Two constants on either side of the core/runtime line: a mismatch would let a
  # request ask for more top tokens than the programs return.
  from pdserve_jax.core import sampling
  from pdserve_jax.runtime import sampling as device_sampling

  assert sampling.MAX_LOGPROBS == device_sampling.MAX_LOGPROBS


def test_config_names_do_not_import_jax():
  run_fresh("""
      import sys
      import pdserve_jax as p
      p.get_preset('tiny')
      p.SamplingParams().check()
      p.ModelConfig, p.RopeScaling, p.PRESETS
      assert 'jax' not in sys.modules, sorted(m for m in sys.modules if 'jax' in m)
  """)


def test_model_names_resolve_lazily():
  run_fresh("""
      import sys
      import pdserve_jax as p
      assert 'jax' not in sys.modules
      from pdserve_jax.model.model import forward
      assert p.forward is forward
      assert 'jax' in sys.modules
  """)


def test_names_listed():
  for name in ("ModelConfig", "forward", "Engine", "SamplingParams", "EngineOverloaded",
               "Colocated", "Disaggregated", "SemiPD", "InstanceSpec", "PartitionerConfig"):
    assert name in pdserve_jax.__all__
    assert name in dir(pdserve_jax)
  for name in ("ModelConfig", "load_hf", "CheckpointError", "Model", "forward", "load",
               "random_model", "greedy_reference", "Engine", "EngineConfig", "Result",
               "RequestHandle", "PRESETS", "get_preset", "RopeScaling", "SamplingParams"):
    assert getattr(pdserve_jax, name) is not None
  assert not hasattr(pdserve_jax, "no_such_name")
