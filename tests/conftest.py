"""Test set-up: 8 virtual CPU devices, set before jax is imported anywhere."""

import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Compiling, not running, is most of a test's time on these tiny models: LLVM's
# optimisation level 0 cuts the CPU compiler's work by about a third
# (test_warmup[colocated_chunked]: 36 s of CPU at the default level, 24 s at 0). It
# does not change results: XLA fixes the order of every reduction and fast-math is off.
# Subprocesses (workers, notebook kernels, apps) inherit it.
FAST_COMPILE_FLAG = "--xla_backend_optimization_level=0"


def xla_flags(devices: int) -> str:
  """XLA_FLAGS for a test process of `devices` virtual CPU devices."""
  return f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE_FLAG}"


flags = os.environ.get("XLA_FLAGS", "")
for flag in xla_flags(8).split():
  if flag.split("=")[0] not in flags:
    flags = f"{flags} {flag}".strip()
os.environ["XLA_FLAGS"] = flags
# libtpu serves compile-only TPU topologies here (no chip): its lockfile would let
# only the first process of the run load it, and the test files that compile for
# TPU run in two pytest workers.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import pytest  # noqa: E402

SHARED_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


@pytest.fixture(scope="session")
def shared_data():
  """Path of ../shared/data; skips the test when the folder is absent."""
  if not os.path.isdir(SHARED_DATA):
    pytest.skip(f"shared data folder not found at {os.path.abspath(SHARED_DATA)}")
  return os.path.abspath(SHARED_DATA)


def demo_prompts(seed: int, count: int, max_words: int) -> list:
  """`count` prompts of 1 to `max_words` words the demo model's tokenizer knows."""
  import numpy as np

  rng = np.random.default_rng(seed)
  words = ["And", "the", "king", "said", "unto", "them", "In", "beginning", "LORD", "land"]
  return [" ".join(rng.choice(words, size=rng.integers(1, max_words + 1)))
          for _ in range(count)]


def pytest_report_header(config):
  return f"jax {jax.__version__}, devices: {jax.device_count()} x {jax.devices()[0].platform}"


def wait_for(cond, seconds, what, every=0.05):
  """Polls `cond` every `every` seconds; fails the test naming `what` if it is not
  true in time."""
  deadline = time.monotonic() + seconds
  while time.monotonic() < deadline:
    if cond():
      return
    time.sleep(every)
  pytest.fail(f"not within {seconds} s: {what}")
