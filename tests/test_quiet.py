"""Quiet by default: importing the package and querying jax's devices prints nothing
on a machine without a TPU, even with libtpu installed (`pdserve_jax.tpu_probe`); an
app prints its report and no orbax, absl INFO or libtpu line unless `-v` asks for
logs; an explicit TPU request still fails loudly.

Run without JAX_PLATFORMS (which conftest sets for the other tests): with it set,
jax never asks libtpu and these checks could not fail. With no libtpu installed
there is nothing to silence, and the libtpu checks hold trivially.
"""

import importlib.util
import os
import re
import subprocess
import sys

import pytest

from pdserve_jax import tpu_probe

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
# Lines no ordinary run may print: absl's INFO format, orbax, libtpu's start-up errors.
NOISE = re.compile(r"^I\d{4} |orbax|libtpu|TPU_|jellyfish|InitGoogle|host bounds", re.M)


def run(args, cwd=ROOT, **extra):
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  env.update(PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p),
             **extra)
  return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
                        text=True, timeout=600)


@pytest.mark.parametrize("code", [
    "import jax, pdserve_jax; jax.devices()",
    "import pdserve_jax, jax; jax.devices()",
    "import pdserve_jax as p; p.load_demo(); import jax; jax.devices()"])
def test_jax_with_the_package_prints_nothing(code, tmp_path):
  # Catches libtpu's start-up errors (jax probing a TPU backend that is not there),
  # whichever of jax and the package is imported first, and orbax's INFO lines.
  proc = run(["-c", code], cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout + proc.stderr == ""


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None or tpu_probe._tpu_attached(),
                    reason="needs libtpu installed and no TPU attached")
def test_an_explicit_tpu_request_still_fails_loudly(tmp_path):
  # No silent fallback: asking for the TPU on a machine without one is an error.
  proc = run(["-c", "import pdserve_jax, jax; jax.devices()"], cwd=tmp_path,
             JAX_PLATFORMS="tpu")
  assert proc.returncode != 0
  assert "Unable to initialize backend 'tpu'" in proc.stderr


@pytest.mark.slow  # compiles an engine (twice from one cache)
def test_serve_prints_its_report_and_logs_only_with_v(tmp_path):
  # The demo model (orbax reads it) and the engine's warm-up (it logs each instance).
  args = ["-m", "pdserve_jax.cli.serve", "--config.modes=colocated_prefill_first",
          "--config.workload.num_requests=2", "--config.instance.replicas=1",
          "--config.instance.max_batch=2", "--config.instance.max_step_tokens=128",
          "--config.prompts=()",
          f"--compilation_cache={tmp_path / 'cache'}"]
  proc = run(args)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "colocated_prefill_first met both SLOs" in proc.stdout
  assert not NOISE.search(proc.stdout + proc.stderr), (proc.stdout + proc.stderr)[-3000:]
  # -v 0 (INFO) brings the third-party lines back: the pattern above sees them.
  proc = run([*args, "-v", "0"])
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert re.search(r"^I\d{4} .*orbax", proc.stderr, re.M), proc.stderr[-3000:]
  assert re.search(r"^I\d{4} .*warm-up", proc.stderr, re.M), proc.stderr[-3000:]
