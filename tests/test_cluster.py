"""Prefill and decode instances as processes of their own: real worker processes,
a real router process, KV over `jax.experimental.transfer`, control over ZeroMQ, and
the official `openai` client; then workers killed with SIGKILL mid-run."""

import concurrent.futures
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import httpx
import pytest

import pdserve_jax as pdj
from conftest import demo_prompts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A busy 2-core machine running four JAX processes can leave a worker silent for
# seconds: the tests give it 30 s before declaring it lost (a kill is still seen
# within that, and nothing hangs).
CONFIG = ["--config=configs/cluster_demo.py", "--config.engine.max_seq_len=128",
          "--config.engine.num_pages=128", "--config.instance.max_batch=8",
          "--config.instance.max_step_tokens=128", "--config.cluster.timeout_s=30"]
MAX_TOKENS = 12

pytestmark = pytest.mark.slow


def _start(role, *args, devices=8, wait=True, port=0):
  """A `cli.serve --role=...` process and the address it printed once ready."""
  # stderr to a file: a pipe nobody reads would stall a process that logs much.
  log = tempfile.TemporaryFile("w+")
  proc = subprocess.Popen([sys.executable, "-m", "pdserve_jax.cli.serve", f"--role={role}",
                           f"--port={port}", *CONFIG, *args],
                          cwd=ROOT, stdout=subprocess.PIPE if wait else subprocess.DEVNULL,
                          stderr=log, text=True,
                          env=dict(os.environ, XLA_FLAGS="--xla_force_host_platform_"
                                   f"device_count={devices}"))
  if not wait:
    return proc, None
  for _ in range(100):  # gloo prints its connections to stdout first
    line = proc.stdout.readline()
    m = re.search(r"on ((?:tcp|http)://\S+)", line)
    if m or not line:
      break
  if not m:
    proc.kill()
    proc.wait()
    log.seek(0)
    pytest.fail(f"{role} did not start: {line!r} {log.read()[-3000:]}")
  return proc, m.group(1)


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class Cluster:
  def __init__(self, num_prefill, num_decode, decode_processes=1):
    self.workers = {"prefill": [_start("prefill") for _ in range(num_prefill)], "decode": []}
    extra = []
    for _ in range(num_decode):
      if decode_processes == 1:
        self.workers["decode"].append(_start("decode"))
        continue
      # One instance over 2 processes x 4 devices: one 8-device mesh (jax.distributed).
      extra = ["--config.disaggregated.decode_tp=8"]
      span = [f"--num_processes={decode_processes}",
              f"--coordinator=127.0.0.1:{_free_port()}", f"--peers=tcp://127.0.0.1:{_free_port()}"]
      followers = [_start("decode", *span, *extra, f"--process_id={i}", devices=4, wait=False)
                   for i in range(1, decode_processes)]
      self.workers["decode"].append(_start("decode", *span, *extra, "--process_id=0",
                                           devices=4))
      self.workers["decode"] += followers
    addresses = {k: ",".join(a for _, a in v if a) for k, v in self.workers.items()}
    self.router, self.url = _start("router", f"--prefill={addresses['prefill']}",
                                   f"--decode={addresses['decode']}", *extra)

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
  prompts = demo_prompts(seed=1, count=32, max_words=8)
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


def _check_tokens(cluster, prompts, want, num_prefill):
  """32 greedy requests at once, then 8 streamed: the single-process tokens."""
  tok = pdj.load_demo().tokenizer
  client = cluster.client()
  assert _ask_all(client, prompts) == want
  assert _ask_all(client, prompts[:8], stream=True) == [tok.decode(w) for w in want[:8]]
  h = cluster.health()
  assert h["status"] == "ok" and h["pages_in_use"] == 0 and h["failed"] == 0
  assert sorted(h["instances"]) == ["decode0"] + [f"prefill{i}" for i in range(num_prefill)]
  metrics = httpx.get(cluster.url + "/metrics", timeout=10).text
  assert re.search(r'^pdserve_responses_total\{outcome="length"\} 40$', metrics, re.M), metrics
  assert re.search(r"^pdserve_kv_pages_in_use 0$", metrics, re.M), metrics


def test_router_and_one_prefill_one_decode_give_the_single_process_tokens(
    prompts_and_tokens):
  cluster = Cluster(1, 1)
  try:
    _check_tokens(cluster, *prompts_and_tokens, 1)
  finally:
    cluster.close()


def test_a_decode_instance_over_two_processes_gives_the_same_tokens(prompts_and_tokens):
  """The decode instance spans 2 processes x 4 virtual CPU devices (one 8-device
  mesh, gloo collectives); each pulls its own copy of every KV hand-off."""
  prompts, want = prompts_and_tokens
  cluster = Cluster(1, 1, decode_processes=2)
  try:
    assert _ask_all(cluster.client(), prompts) == want
    h = cluster.health()
    assert h["deployment"] == "1x prefill tp1pp1 + 1x decode tp8pp1"
    assert h["status"] == "ok" and h["pages_in_use"] == 0
  finally:
    cluster.close()


def _wait_for(cond, seconds, what):
  deadline = time.monotonic() + seconds
  while time.monotonic() < deadline:
    if cond():
      return
    time.sleep(0.2)
  pytest.fail(f"not within {seconds} s: {what}")


def test_two_prefill_one_decode_then_killed_workers(prompts_and_tokens):
  """Router + 2 prefill + 1 decode give the single-process tokens. Then SIGKILL a
  prefill worker mid-run: its requests end with an error naming it, the other prefill
  worker serves the rest and later requests. Then SIGKILL the decode worker mid-run:
  every request in flight ends with an error within the heartbeat timeout, nothing
  hangs, no page stays held, and /health names the lost instances."""
  prompts, want = prompts_and_tokens
  cluster = Cluster(2, 1)
  try:
    _check_tokens(cluster, prompts, want, 2)
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
        for _ in client.completions.create(prompt=prompt, stream=True, **dict(
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
      os.kill(cluster.workers["decode"][0][0].pid, signal.SIGKILL)
      # Each ends once the 5 s heartbeat timeout names the loss; a hang would time out.
      results = [f.result(timeout=120) for f in futures]
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


def _port(address):
  return int(address.rsplit(":", 1)[1])


def _stream_tokens(client, prompt, max_tokens, started):
  """Streams one greedy completion; its token ids, or the exception it ended with."""
  ids = []
  try:
    for c in client.completions.create(model="demo", prompt=prompt, max_tokens=max_tokens,
                                       temperature=0, stream=True,
                                       extra_body={"ignore_eos": True}):
      if c.choices:
        ids += c.choices[0].token_ids
        if len(ids) >= 2:
          started.set()
    return ids
  except Exception as e:  # noqa: BLE001 - the error is what is checked
    return e


@pytest.mark.parametrize("role", ["decode", "prefill"])
def test_a_killed_worker_restarted_is_taken_back(prompts_and_tokens, role):
  """Issue 24 item 2 and issue 23's kill test: SIGKILL a worker once it provably holds
  requests (each has streamed 2 tokens: with one decode instance, they decode there;
  a prefill worker is killed while prompts are queued on it). Every request in flight
  either finishes with the single-process tokens (recomputed on the other side) or
  ends with an error naming the lost instance; none hangs. /health goes 503; the
  same command restarts the worker, the router takes it back (/health 200) and
  later requests get the reference tokens."""
  prompts, want = prompts_and_tokens
  cluster = Cluster(1, 1)
  try:
    client = cluster.client()
    demo = pdj.load_demo()
    # 80 tokens: the longest prompt (43 tokens) + 80 fits max_seq_len=128.
    long_want = pdj.greedy_reference(demo, [demo.tokenizer.encode(p) for p in prompts[:8]], 80)
    started = threading.Event()
    proc, address = cluster.workers[role][0]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
      futures = [pool.submit(_stream_tokens, client, p, 80, started) for p in prompts[:8]]
      assert started.wait(120)
      assert cluster.health()["unfinished"] >= 1  # requests are in flight: held there
      os.kill(proc.pid, signal.SIGKILL)
      proc.wait()
      results = [f.result(timeout=300) for f in futures]  # a hang fails here
    name = f"{role}0"
    for r, w in zip(results, long_want):
      if isinstance(r, Exception):
        assert name in str(r), r
      else:
        assert r == list(w)  # recomputed: the same greedy tokens, none streamed twice
    _wait_for(lambda: httpx.get(cluster.url + "/health", timeout=10).status_code == 503, 60,
              f"/health says 503 with {name} lost")
    cluster.workers[role][0] = _start(role, port=_port(address))
    _wait_for(lambda: httpx.get(cluster.url + "/health", timeout=10).status_code == 200, 300,
              f"the router takes {name} back")
    assert _ask_all(client, prompts) == want
    h = cluster.health()
    assert h["status"] == "ok" and h["pages_in_use"] == 0 and h["unfinished"] == 0
  finally:
    cluster.close()


@pytest.mark.parametrize("mode", ["colocated_prefill_first", "semi_pd"])
def test_colocated_and_semi_pd_replicas_behind_the_router(prompts_and_tokens, mode):
  """Issue 24: colocated and semi-PD deployments served by the router over replica
  worker processes return the single-process greedy tokens."""
  prompts, want = prompts_and_tokens
  extra = [f"--config.mode={mode}"]
  workers = [_start("replica", *extra) for _ in range(2)]
  router = None
  try:
    router, url = _start("router", "--replicas=" + ",".join(a for _, a in workers), *extra)
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
    assert _ask_all(client, prompts) == want
    h = httpx.get(url + "/health", timeout=10).json()
    assert h["status"] == "ok" and h["pages_in_use"] == 0 and len(h["instances"]) >= 2
  finally:
    for proc, _ in workers + ([(router, None)] if router else []):
      if proc.poll() is None:
        proc.kill()
      proc.wait()
