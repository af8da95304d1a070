"""The package as a user installs it: the wheel built from this checkout, installed
into a fresh virtual environment outside it, runs `serve` (the demo model), `simulate`
and `plan` with their default configs from another directory, quietly.

Installing jax and the rest from the index would take minutes, so the fresh
environment borrows this interpreter's installed packages through a `.pth` file and
gets only the wheel itself (`pip install --no-deps`); `pdserve_jax` must then import
from the fresh environment, not from the checkout. Catches: a config or a demo-model
file left out of the wheel (an app's default config, or the model, would fail to
load), an app default that resolves only inside the checkout, and third-party log
lines (orbax, absl INFO, libtpu) in ordinary runs of the installed package.
"""

import glob
import os
import re
import shutil
import site
import subprocess
import sys
import types
import zipfile

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
# What `pip wheel .` reads from a clone: the project file and the packages.
SOURCES = ("pyproject.toml", "README.md", "LICENSE", "pdserve_jax", "pallas_kernels", "configs")
# Lines no ordinary run may print: absl's INFO format, orbax, libtpu's start-up errors.
NOISE = re.compile(r"^I\d{4} |orbax|libtpu|TPU_|jellyfish|InitGoogle|host bounds", re.M)


def _sh(*cmd, **kw):
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)
  assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
  return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
  """A fresh venv with the wheel installed: its python, an env to run it in, its
  folder, a folder outside the checkout to run in, and the wheel."""
  tmp = tmp_path_factory.mktemp("wheel")
  # No PYTHONPATH: a checkout on it would shadow the wheel (and show pip an installed
  # pdserve_jax). No JAX_PLATFORMS: the installed package chooses, as a user's would.
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "JAX_PLATFORMS")}
  env["XDG_CACHE_HOME"] = str(tmp / "cache")  # not the user's compilation cache
  src = tmp / "src"
  src.mkdir()
  for name in SOURCES:  # a copy, so the build writes nothing into the checkout
    path = os.path.join(ROOT, name)
    if os.path.isdir(path):
      shutil.copytree(path, src / name, symlinks=True,
                      ignore=shutil.ignore_patterns("__pycache__"))
    else:
      shutil.copy(path, src / name)
  _sh(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
      "-w", str(tmp / "dist"), str(src), env=env)
  (wheel,) = glob.glob(str(tmp / "dist" / "pdserve_jax-*.whl"))
  venv = tmp / "venv"
  _sh(sys.executable, "-m", "venv", "--without-pip", str(venv), env=env)
  python = str(venv / "bin" / "python")
  # This pip installs into the fresh venv; before the .pth below, so that it sees no
  # other pdserve_jax there.
  _sh(sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", wheel,
      env=env)
  (fresh_site,) = glob.glob(str(venv / "lib" / "python*" / "site-packages"))
  with open(os.path.join(fresh_site, "_borrowed.pth"), "w") as f:
    f.write("\n".join(site.getsitepackages()) + "\n")
  work = tmp / "elsewhere"
  work.mkdir()
  return types.SimpleNamespace(python=python, env=env, venv=str(venv), work=str(work),
                               wheel=wheel)


def _app(installed, app, *args):
  proc = _sh(installed.python, "-m", f"pdserve_jax.cli.{app}", *args, cwd=installed.work,
             env=installed.env)
  out = proc.stdout + proc.stderr
  assert not NOISE.search(out), f"{app} printed third-party lines:\n{out[-3000:]}"
  return proc.stdout


def _files(folder: str) -> set:
  return {os.path.relpath(os.path.join(d, f), folder) for d, _, files in os.walk(folder)
          for f in files if "__pycache__" not in d}


@pytest.mark.slow  # builds a wheel (the engine test below compiles one)
def test_wheel_holds_every_config_and_the_demo_model(installed):
  names = set(zipfile.ZipFile(installed.wheel).namelist())
  configs = {f"pdserve_jax/configs/{f}" for f in _files(os.path.join(ROOT, "configs"))}
  assert configs and configs <= names, sorted(configs - names)
  demo = os.path.join(ROOT, "pdserve_jax", "assets", "demo_model")
  model = {f"pdserve_jax/assets/demo_model/{f}" for f in _files(demo)}
  assert model and model <= names, sorted(model - names)


@pytest.mark.slow
def test_wheel_imports_from_the_fresh_venv(installed):
  proc = _sh(installed.python, "-c", "import pdserve_jax; print(pdserve_jax.__file__)",
             cwd=installed.work, env=installed.env)
  assert proc.stdout.strip().startswith(installed.venv), proc.stdout


@pytest.mark.slow
def test_serve_default_config_outside_the_checkout(installed):
  # The demo model from the wheel, one mode, few requests and programs.
  out = _app(installed, "serve", "--config.modes=colocated_prefill_first",
             "--config.workload.num_requests=3", "--config.instance.replicas=1",
             "--config.instance.max_batch=2", "--config.instance.max_step_tokens=128",
             "--config.generation.max_tokens=8",
             "--config.prompts=('Once upon a time',)")
  assert "[colocated_prefill_first] 'Once upon a time' -> '" in out
  assert "colocated_prefill_first met both SLOs" in out


@pytest.mark.slow
def test_simulate_and_plan_default_configs_outside_the_checkout(installed):
  out = _app(installed, "simulate", "--config.num_seeds=1", "--config.workload.num_requests=100")
  assert "disaggregated" in out and "sim@9.9" in out
  out = _app(installed, "plan")
  assert "The planner's pick: " in out
  # A shipped config by name, and one whose data file ships beside it.
  out = _app(installed, "plan", "--config=plan_llama3_tpu", "--config.workload.source=synthetic",
             "--config.tp_options=4", "--config.pp_options=1", "--config.workload.num_requests=50",
             "--config.modes=colocated_prefill_first")
  assert "The planner's pick: colocated_prefill_first" in out
