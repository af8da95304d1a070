"""A short soak (`benchmarks/soak.py`) in-process: requests above capacity through
every serving mode with a small KV pool, some cancelled mid-way, some refused as
overloaded; every request must be accounted for and no KV page left in use.
No timing assertions: how many finish, abort or are refused depends on the machine."""

import importlib.util
import os
import sys

import pytest

import pdserve_jax as pdj

ROOT = os.path.join(os.path.dirname(__file__), "..")


def _soak_module():
  spec = importlib.util.spec_from_file_location("soak", os.path.join(ROOT, "benchmarks",
                                                                     "soak.py"))
  mod = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = mod  # dataclasses look their module up while building
  spec.loader.exec_module(mod)
  return mod


soak = _soak_module()


@pytest.fixture(scope="module")
def model():
  return pdj.random_model(pdj.get_preset("tiny"), seed=0, std=0.1)


@pytest.mark.parametrize("mode", soak.MODES)
def test_every_request_is_accounted_for(model, mode):
  c = soak.SoakConfig(requests=150, rate=600.0, abort_fraction=0.2, abort_within=0.02,
                      max_queued=32, result_timeout=120.0,
                      # fewer program shapes to compile than the benchmark's engines
                      max_batch=4, num_pages=16)
  r = soak.run_mode(model, mode, c)
  print(soak.format_row(r))
  assert r.problems() == []
  s = r.stats
  assert s["finished"] + s["aborted"] + s["failed"] + r.rejected == r.submitted == 150
  assert r.pages_in_use == 0 and s["pages_in_use"] == 0 and s["unfinished"] == 0
  assert r.stuck == 0 and s["failed"] == 0
  assert s["finished"] > 0
  assert len(r.memory) == 4 and r.memory[-1][0] == 150
