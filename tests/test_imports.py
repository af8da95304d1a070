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


def test_package_and_planning_modules_do_not_import_jax():
  run_fresh("""
      import sys, pdserve_jax, pdserve_jax.sim.latency, pdserve_jax.sim.hardware
      import pdserve_jax.workloads, pdserve_jax.core.metrics
      import pdserve_jax.core.sampling, pdserve_jax.sim.planner, pdserve_jax.sim.simulator
      import pdserve_jax.sim.goodput, pdserve_jax.core.coordinator, pdserve_jax.core.deploy
      assert 'jax' not in sys.modules, sorted(m for m in sys.modules if 'jax' in m)
  """)


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
