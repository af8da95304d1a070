"""The configs ship with the package and `--config` finds them by name or by path
(`cli.common.config_file`): every shipped config loads, a name works from any
directory, a path is taken as given, and a missing one is a one-line error."""

import importlib.util
import os
import subprocess
import sys

import ml_collections
import pytest

from pdserve_jax.cli import common

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


def load(path: str):
  spec = importlib.util.spec_from_file_location("_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def test_shipped_configs_are_the_repository_folder():
  # Catches a broken or missing pdserve_jax/configs link: in a checkout the shipped
  # configs are the top-level configs/ folder, every file of it.
  assert os.path.realpath(common.CONFIGS_DIR) == os.path.realpath(os.path.join(ROOT, "configs"))
  on_disk = {os.path.relpath(os.path.join(d, f), os.path.join(ROOT, "configs"))[:-3]
             for d, _, files in os.walk(os.path.join(ROOT, "configs")) for f in files
             if f.endswith(".py") and not f.startswith("_")}
  assert set(common.shipped_configs()) == on_disk
  assert {"serve_demo", "plan_demo", "reproduce/distserve_fig1",
          "latency/tpu_cost_llama3"} <= on_disk


@pytest.mark.parametrize("name", common.shipped_configs())
def test_every_shipped_config_loads_by_name(name, tmp_path, monkeypatch):
  # From another directory: a config that reads a file relative to the current
  # directory instead of to itself fails here.
  monkeypatch.chdir(tmp_path)
  cfg = load(common.config_file(name))
  assert isinstance(cfg, ml_collections.ConfigDict)
  if name.startswith("plan_llama3"):  # the TPU cost table beside it
    assert os.path.isfile(cfg.latency), cfg.latency
  if name == "reproduce":
    assert os.path.isdir(cfg.experiments_dir), cfg.experiments_dir


def test_config_file_takes_a_path_as_given_and_a_name_from_the_package(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  shipped = os.path.join(common.CONFIGS_DIR, "serve_demo.py")
  assert common.config_file("serve_demo") == shipped
  assert common.config_file("reproduce/distserve_fig1") == os.path.join(
      common.CONFIGS_DIR, "reproduce", "distserve_fig1.py")
  assert common.config_file("serve_demo:small") == shipped + ":small"  # get_config's args
  # A file here wins over a shipped config of the same name (a path is a path).
  (tmp_path / "serve_demo").write_text("def get_config(): return {}\n")
  assert common.config_file("serve_demo") == "serve_demo"
  (tmp_path / "mine.py").write_text("def get_config(): return {}\n")
  assert common.config_file("mine.py:x") == "mine.py:x"


def test_config_file_names_what_is_missing(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(common.ConfigError, match=r"no shipped config of that name \(shipped: "
                     r"api_demo, .*serve_demo"):
    common.config_file("nosuch")
  # The repository's path outside the checkout: never looked up among the shipped
  # configs, but the error names the one that would do.
  with pytest.raises(common.ConfigError, match=r"no such file 'configs/serve_demo.py' .*"
                     r"the shipped config of that name is --config=serve_demo"):
    common.config_file("configs/serve_demo.py")
  with pytest.raises(common.ConfigError, match=r"no such file 'x/y.py'"):
    common.config_file("x/y.py")


def run(app, *args, cwd):
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
  return subprocess.run([sys.executable, "-m", f"pdserve_jax.cli.{app}", *args], cwd=cwd,
                        env=env, capture_output=True, text=True, timeout=300)


def test_apps_find_configs_by_name_from_another_directory(tmp_path):
  small = ["--config.num_seeds=1", "--config.workload.num_requests=50"]
  for flag in (["--config=simulate_distserve_fig1"], ["--config", "simulate_distserve_fig1"],
               []):  # the default, by name too
    proc = run("simulate", *flag, *small, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "sim@9.9" in proc.stdout
  # A path still works, relative to the current directory.
  proc = run("simulate", "--config=configs/simulate_distserve_fig1.py", *small, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("args,expected", [
    (["--config=nosuch"], "simulate: error: --config: no config file 'nosuch' here and no "
     "shipped config of that name (shipped: "),
    (["--config", "nosuch"], "simulate: error: --config: no config file 'nosuch'"),
    (["--config=configs/simulate_distserve_fig1.py"], "simulate: error: --config: no such "
     "file 'configs/simulate_distserve_fig1.py' (relative to "),
])
def test_a_missing_config_is_one_line(args, expected, tmp_path):
  proc = run("simulate", *args, cwd=tmp_path)
  assert proc.returncode == 1
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(expected), proc.stderr[-3000:]
