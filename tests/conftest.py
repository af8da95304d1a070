"""Test set-up: 8 virtual CPU devices, set before jax is imported anywhere."""

import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
  os.environ["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count=8").strip()

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


def wait_for(cond, seconds, what):
  """Polls `cond` every 50 ms; fails the test naming `what` if it is not true in time."""
  deadline = time.monotonic() + seconds
  while time.monotonic() < deadline:
    if cond():
      return
    time.sleep(0.05)
  pytest.fail(f"not within {seconds} s: {what}")
