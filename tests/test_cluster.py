"""Prefill and decode instances as processes of their own: real worker processes,
a real router process, KV over `jax.experimental.transfer`, control over ZeroMQ, and
the official `openai` client; then workers killed with SIGKILL mid-run."""

import concurrent.futures
import os
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest

import pdserve_jax as pdj

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = ["--config=configs/cluster_demo.py", "--config.engine.max_seq_len=128",
          "--config.engine.num_pages=128", "--config.instance.max_batch=8",
          "--config.instance.max_tokens=128"]
MAX_TOKENS = 12

pytestmark = pytest.mark.slow


def _start(role, *args):
  """A `cli.serve --role=...` process and the address it printed once ready."""
  proc = subprocess.Popen([sys.executable, "-m", "pdserve_jax.cli.serve", f"--role={role}",
                           "--port=0", *CONFIG, *args],
                          cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  line = proc.stdout.readline()
  m = re.search(r"on ((?:tcp|http)://\S+)", line)
  if not m:
    proc.kill()
    pytest.fail(f"{role} did not start: {line!r} {proc.stderr.read()[-3000:]}")
  return proc, m.group(1)


class Cluster:
  def __init__(self, num_prefill, num_decode):
    self.workers = {"prefill": [_start("prefill") for _ in range(num_prefill)],
                    "decode": [_start("decode") for _ in range(num_decode)]}
    addresses = {k: ",".join(a for _, a in v) for k, v in self.workers.items()}
    self.router, self.url = _start("router", f"--prefill={addresses['prefill']}",
                                   f"--decode={addresses['decode']}")

  def health(self):
    return httpx.get(self.url + "/health", timeout=10).json()

  def client(self):
    import openai

    return openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0,
                         timeout=120)

  def close(self):
    for proc, _ in [(self.router, None)] + [w for ws in self.workers.values() for w in ws]:
      if proc.poll() is None:
        proc.kill()
      proc.wait()


@pytest.fixture(scope="module")
def prompts_and_tokens():
  rng = np.random.default_rng(1)
  words = ["And", "the", "king", "said", "unto", "them", "In", "beginning", "LORD", "land"]
  prompts = [" ".join(rng.choice(words, size=rng.integers(1, 9))) for _ in range(32)]
  demo = pdj.load_demo()
  want = pdj.greedy_reference(demo, [demo.tokenizer.encode(p) for p in prompts], MAX_TOKENS)
  return prompts, [list(w) for w in want]


def _ask_all(client, prompts, stream=False):
  def ask(prompt):
    kw = dict(model="demo", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
              extra_body={"ignore_eos": True})
    if not stream:
      return client.completions.create(**kw).choices[0].token_ids
    text = "".join(c.choices[0].text for c in client.completions.create(stream=True, **kw)
                   if c.choices)
    return text

  with concurrent.futures.ThreadPoolExecutor(16) as pool:  # all in flight together
    return list(pool.map(ask, prompts))


@pytest.mark.parametrize("num_prefill", [1, 2])
def test_router_and_workers_give_the_single_process_tokens(prompts_and_tokens, num_prefill):
  prompts, want = prompts_and_tokens
  tok = pdj.load_demo().tokenizer
  cluster = Cluster(num_prefill, 1)
  try:
    client = cluster.client()
    assert _ask_all(client, prompts) == want
    assert _ask_all(client, prompts[:8], stream=True) == [tok.decode(w) for w in want[:8]]
    h = cluster.health()
    assert h["status"] == "ok" and h["pages_in_use"] == 0 and h["failed"] == 0
    assert sorted(h["instances"]) == [f"decode0"] + [f"prefill{i}" for i in range(num_prefill)]
  finally:
    cluster.close()


def _wait_for(cond, seconds, what):
  deadline = time.monotonic() + seconds
  while time.monotonic() < deadline:
    if cond():
      return
    time.sleep(0.2)
  pytest.fail(f"not within {seconds} s: {what}")


def test_killed_workers_end_their_requests_and_the_rest_go_on(prompts_and_tokens):
  """SIGKILL a prefill worker mid-run: its requests end with an error naming it, the
  other prefill worker serves the rest and later requests. Then SIGKILL the decode
  worker mid-run: every request in flight ends with an error within the heartbeat
  timeout, nothing hangs, no page stays held, and /health names the lost instances."""
  prompts, want = prompts_and_tokens
  cluster = Cluster(2, 1)
  try:
    client = cluster.client()
    long = dict(model="demo", max_tokens=60, temperature=0, extra_body={"ignore_eos": True})

    def ask(prompt):
      try:
        return client.completions.create(prompt=prompt, **long).choices[0].token_ids
      except Exception as e:  # noqa: BLE001 - the error is what is checked
        return e

    # A prefill worker dies while 24 requests are in flight.
    with concurrent.futures.ThreadPoolExecutor(24) as pool:
      futures = [pool.submit(ask, p) for p in prompts[:24]]
      time.sleep(1.0)
      os.kill(cluster.workers["prefill"][0][0].pid, signal.SIGKILL)
      results = [f.result(timeout=120) for f in futures]
    errors = [r for r in results if isinstance(r, Exception)]
    assert all("prefill0" in str(e) or "lost" in str(e) for e in errors), errors
    _wait_for(lambda: cluster.health()["instances"]["prefill0"] == "lost", 30,
              "the router reports prefill0 lost")
    # The rest of the cluster serves on, with the single-process tokens.
    assert _ask_all(client, prompts[24:]) == want[24:]
    assert cluster.health()["pages_in_use"] == 0

    # The decode worker dies while requests decode: killed once tokens stream.
    decoding = threading.Event()

    def stream(prompt):
      n = 0
      try:
        for c in client.completions.create(prompt=prompt, stream=True, **dict(
            long, max_tokens=110)):
          n += 1
          if n >= 2:
            decoding.set()
        return n
      except Exception as e:  # noqa: BLE001 - the error is what is checked
        return e

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
      futures = [pool.submit(stream, "And the") for _ in range(8)]
      assert decoding.wait(60)
      started = time.monotonic()
      os.kill(cluster.workers["decode"][0][0].pid, signal.SIGKILL)
      results = [f.result(timeout=120) for f in futures]
      ended_within = time.monotonic() - started
    assert ended_within < 60  # bounded by the 5 s heartbeat timeout, not by a hang
    assert all(isinstance(r, Exception) and "decode0" in str(r) for r in results), results
    h = cluster.health()
    assert h["lost_instances"] == ["decode0", "prefill0"] and h["status"] == "degraded"
    assert h["pages_in_use"] == 0 and h["unfinished"] == 0
    # With no decode instance left, a new request is refused at once, naming why.
    r = httpx.post(cluster.url + "/v1/completions", timeout=30,
                   json={"prompt": "And", "max_tokens": 4})
    assert r.status_code >= 500 and "every decode instance is lost" in r.text
  finally:
    cluster.close()
