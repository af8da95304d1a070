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

import httpx
import pytest

import pdserve_jax as pdj
from conftest import demo_prompts, wait_for, xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A busy 2-core machine running four JAX processes can leave a worker silent for
# seconds: the tests give it 30 s before declaring it lost (a kill is still seen
# within that, and nothing hangs).
# Lifetime page reservation over 64 pages: a decode instance holds at most 7
# requests of 80 tokens, and the kill test's hand-offs provably wait in prefill memory.
CONFIG = ["--config=configs/cluster_demo.py", "--config.engine.max_seq_len=128",
          "--config.engine.num_pages=64", "--config.instance.page_policy=reserve",
          "--config.instance.max_batch=8", "--config.instance.max_step_tokens=128",
          "--config.cluster.timeout_s=30"]
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
                          env=dict(os.environ, XLA_FLAGS=xla_flags(devices)))
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


def _client(url):
  """The official `openai` client on our server at `url`."""
  import openai

  return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class Cluster:
  """A router over prefill and decode worker processes; `processes` > 1 makes each
  instance span that many processes x 8 / `processes` devices (one 8-device mesh,
  jax.distributed with gloo collectives)."""

  def __init__(self, num_prefill, num_decode, processes=1, router_args=()):
    self.workers = {"prefill": [], "decode": []}
    extra = list(router_args)
    for role, count in (("prefill", num_prefill), ("decode", num_decode)):
      for _ in range(count):
        if processes == 1:
          self.workers[role].append(_start(role))
          continue
        extra.append(f"--config.disaggregated.{role}_tp=8")
        span = [f"--num_processes={processes}", f"--coordinator=127.0.0.1:{_free_port()}",
                f"--peers=tcp://127.0.0.1:{_free_port()}", f"--config.disaggregated.{role}_tp=8"]
        followers = [_start(role, *span, f"--process_id={i}", devices=8 // processes,
                            wait=False) for i in range(1, processes)]
        self.workers[role].append(_start(role, *span, "--process_id=0",
                                         devices=8 // processes))
        self.workers[role] += followers
    addresses = {k: ",".join(a for _, a in v if a) for k, v in self.workers.items()}
    self.router, self.url = _start("router", f"--prefill={addresses['prefill']}",
                                   f"--decode={addresses['decode']}", *extra)

  def health(self):
    return httpx.get(self.url + "/health", timeout=10).json()

  def client(self):
    return _client(self.url)

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


@pytest.fixture(scope="class")
def cluster():
  """One prefill and one decode worker behind a router, shared by the tests of
  `TestOnePrefillOneDecode` (each leaves it serving, every worker up)."""
  c = Cluster(1, 1)
  yield c
  c.close()


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
  before = _responses(cluster)
  assert _ask_all(client, prompts) == want
  assert _ask_all(client, prompts[:8], stream=True) == [tok.decode(w) for w in want[:8]]
  h = cluster.health()
  assert h["status"] == "ok" and h["pages_in_use"] == 0 and h["failed"] == 0
  assert sorted(h["instances"]) == ["decode0"] + [f"prefill{i}" for i in range(num_prefill)]
  assert _responses(cluster) == before + 40
  metrics = httpx.get(cluster.url + "/metrics", timeout=10).text
  assert re.search(r"^pdserve_kv_pages_in_use 0$", metrics, re.M), metrics


def _responses(cluster) -> int:
  """The router's count of requests that ended with finish reason "length"."""
  metrics = httpx.get(cluster.url + "/metrics", timeout=10).text
  m = re.search(r'^pdserve_responses_total\{outcome="length"\} (\d+)$', metrics, re.M)
  return int(m.group(1)) if m else 0


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


def _kill_while_serving(client, health, name, proc, prompts):
  """16 greedy requests of 80 tokens streamed at once; `proc`, the worker of instance
  `name`, is SIGKILLed once tokens stream and `health()` counts pages `name` holds.
  Checks each request got the single-process tokens or an error naming `name`, and
  returns those errors and all the outcomes."""
  demo = pdj.load_demo()
  # 80 tokens: the longest prompt (43 tokens) + 80 fits max_seq_len=128.
  ids = [demo.tokenizer.encode(p) for p in prompts[:16]]
  want = [list(w) for w in pdj.greedy_reference(demo, ids, 80)]
  started = threading.Event()
  with concurrent.futures.ThreadPoolExecutor(16) as pool:
    futures = [pool.submit(_stream_tokens, client, p, 80, started) for p in prompts[:16]]
    assert started.wait(300)
    wait_for(lambda: health()["instance_pages"][name] > 0, 60, f"{name} holds requests",
             every=0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    results = [f.result(timeout=300) for f in futures]  # a hang fails here
  for r, w in zip(results, want):
    if isinstance(r, Exception):
      assert name in str(r), r
    else:
      assert r == w
  return [r for r in results if isinstance(r, Exception)], results


class TestOnePrefillOneDecode:
  """One router, one prefill and one decode worker process for every test here."""

  def test_router_and_one_prefill_one_decode_give_the_single_process_tokens(
      self, cluster, prompts_and_tokens):
    _check_tokens(cluster, *prompts_and_tokens, 1)

  @pytest.mark.parametrize("role", ["decode", "prefill"])
  def test_a_killed_worker_restarted_is_taken_back(self, cluster, prompts_and_tokens,
                                                    role):
    """Issue 24 item 2 and issue 23's kill test. 16 long requests: the decode instance
    reserves each one's whole life (page_policy=reserve, 64 pages), so it holds about 8
    and the others wait as hand-offs in prefill memory. A worker is SIGKILLed only once it
    provably holds requests (/health counts its pages; tokens stream). With one
    instance per role nothing can recompute them: every request it held ends with an
    error naming it (with the decode worker, all of them: none can decode), every
    other request gets the single-process tokens, none hangs; killing the prefill
    worker, at least one of each happens. /health goes 503;
    the same command restarts the worker, the router takes it back (/health 200) and
    later requests get the reference tokens; meanwhile a request is refused with 503,
    Retry-After and the lost instance's name. Catches: a lost worker never taken back
    (issue 24's defect 2), /health 200 or a 500 while nothing can serve, a hang, an
    error that does not say which instance, a wrong token after recomputation."""
    prompts, want = prompts_and_tokens
    client = cluster.client()
    name = f"{role}0"
    proc, address = cluster.workers[role][0]
    errors, results = _kill_while_serving(client, cluster.health, name, proc, prompts)
    assert errors, "no request was held by the killed worker"
    if role == "prefill":  # those already decoding finish
      assert len(errors) < len(results), results
    wait_for(lambda: httpx.get(cluster.url + "/health", timeout=10).status_code == 503, 60,
             f"/health says 503 with {name} lost", every=0.2)
    assert cluster.health()["lost_instances"] == [name]
    # Refused at once while it is out: 503 (not 500), when to retry, and why.
    r = httpx.post(cluster.url + "/v1/completions", timeout=30,
                   json={"model": "demo", "prompt": "And", "max_tokens": 4})
    assert r.status_code == 503 and "retry-after" in r.headers, r.text
    assert f"every {role} instance is lost" in r.text and f"instance {name} was lost" in r.text
    cluster.workers[role][0] = _start(role, port=_port(address))
    wait_for(lambda: httpx.get(cluster.url + "/health", timeout=10).status_code == 200, 300,
             f"the router takes {name} back", every=0.2)
    assert _ask_all(client, prompts) == want
    h = cluster.health()
    assert h["status"] == "ok" and h["pages_in_use"] == 0 and h["unfinished"] == 0


def test_prefill_and_decode_instances_over_two_processes_give_the_same_tokens(
    prompts_and_tokens):
  """Each instance spans 2 processes x 4 virtual CPU devices (one 8-device mesh,
  gloo collectives), and KV streams layer by layer (issue 22; the worker processes
  of `TestOnePrefillOneDecode` copy it whole): the prefill instance offers each of
  its 2 layer groups as that group's program is dispatched, all-gathered to its
  leader, and every decode process pulls its own copy of each group and scatters
  it into those layers' pages; hand-offs that could not stream move whole, a
  group at a time. Catches: a group offered under the wrong transfer id or layers
  (wrong tokens, or a pull that never lands: a hang), a request admitted before
  its last group landed, streams silently not used (`prefix_kv_streams` counts
  those that left with their prefill step)."""
  prompts, want = prompts_and_tokens
  cluster = Cluster(1, 1, processes=2, router_args=[
      "--config.disaggregated.kv_transfer=layerwise", "--config.disaggregated.layer_groups=2"])
  try:
    assert _ask_all(cluster.client(), prompts) == want
    h = cluster.health()
    assert h["deployment"] == "1x prefill tp8pp1 + 1x decode tp8pp1, KV layerwise x2"
    assert h["status"] == "ok" and h["pages_in_use"] == 0
    assert h["prefix_kv_streams"] > 0, h
  finally:
    cluster.close()


def test_elastic_roles_from_the_command_line_move_a_decode_worker_to_prefill(
    prompts_and_tokens):
  """Elastic roles set from the command line (issue 22): a router started with
  `--config.disaggregated.elastic=True` over 1 prefill and 2 decode worker processes,
  its TTFT SLO unmeetable (1 us, TPOT's 100 s) and the controller's window 4: once 4
  requests have their first token, every TTFT sample has missed, so one decode group
  moves to prefill (what it holds migrates by KV copy to the other decode worker),
  and no more (one decode instance is the minimum). The 32 greedy requests get the
  single-process tokens; /health counts 2 prefill and 1 decode instances after 1
  move, and no page held. Catches: the flags not reaching the router's deployment,
  a move across worker processes that loses or corrupts a request, pages left held."""
  prompts, want = prompts_and_tokens
  c = Cluster(1, 2, router_args=["--config.disaggregated.elastic=True",
                                 "--config.disaggregated.elastic_controller.window=4",
                                 "--config.ttft_slo=0.000001", "--config.tpot_slo=100"])
  try:
    assert _ask_all(c.client(), prompts) == want
    h = c.health()
    assert (h["elastic_moves"], h["elastic_prefill"], h["elastic_decode"]) == (1, 2, 1), h
    assert h["status"] == "ok" and h["pages_in_use"] == 0 and h["unfinished"] == 0
  finally:
    c.close()


@pytest.fixture(scope="module")
def replica_workers():
  """Two replica workers, served in turn by a colocated and a semi-PD router (a
  worker takes a new router's set-up: the mode lives in the router)."""
  workers = [_start("replica") for _ in range(2)]
  yield workers
  for proc, _ in workers:
    proc.kill()
    proc.wait()


@pytest.mark.parametrize("mode", ["colocated_prefill_first", "semi_pd"])
def test_colocated_and_semi_pd_replicas_behind_the_router(replica_workers, prompts_and_tokens,
                                                          mode):
  """Issue 24: colocated and semi-PD deployments served by the router over replica
  worker processes return the single-process greedy tokens. Catches: a mode the
  router cannot place on workers, a replica's phases scheduled on the wrong pool."""
  prompts, want = prompts_and_tokens
  router, url = _start("router", "--replicas=" + ",".join(a for _, a in replica_workers),
                       f"--config.mode={mode}")
  try:
    client = _client(url)
    assert _ask_all(client, prompts) == want
    h = httpx.get(url + "/health", timeout=10).json()
    assert h["status"] == "ok" and h["pages_in_use"] == 0
    assert len(h["instances"]) == (4 if mode == "semi_pd" else 2)
  finally:
    router.kill()
    router.wait()


def test_a_killed_replica_worker_fails_only_its_requests_and_is_taken_back(
    replica_workers, prompts_and_tokens):
  """Issue 24 for replicas (run last on these workers: it kills one). 16 long streamed
  requests over two colocated replicas; replica worker 0 is SIGKILLed once it
  provably holds some. A replica's requests cannot move (their KV died with it), so
  each it held ends with an error naming it; the other replica's requests get the
  single-process tokens, none hangs; the router keeps serving (/health 200, the lost
  instance listed), later requests get the reference tokens on the survivor and no
  page stays held; the same command restarts the worker and the router takes it
  back. Catches: a loss that fails the survivor's requests or the router, an error
  that does not say which instance, a hang, pages of the lost replica counted as held,
  a restarted replica never taken back."""
  prompts, want = prompts_and_tokens
  router, url = _start("router", "--replicas=" + ",".join(a for _, a in replica_workers),
                       "--config.mode=colocated_prefill_first")
  try:
    client = _client(url)
    health = lambda: httpx.get(url + "/health", timeout=10).json()
    proc, address = replica_workers[0]
    errors, results = _kill_while_serving(client, health, "colocated0", proc, prompts)
    assert errors and len(errors) < len(results), results
    wait_for(lambda: health()["lost_instances"] == ["colocated0"], 60, "colocated0 lost",
             every=0.2)
    assert httpx.get(url + "/health", timeout=10).status_code == 200  # colocated1 serves
    assert _ask_all(client, prompts) == want
    wait_for(lambda: health()["pages_in_use"] == 0, 30, "every page freed", every=0.2)
    replica_workers[0] = _start("replica", port=_port(address))
    wait_for(lambda: health()["lost_instances"] == [], 300, "the router takes it back",
             every=0.2)
    assert _ask_all(client, prompts) == want
    h = health()
    assert h["status"] == "ok" and h["pages_in_use"] == 0 and h["unfinished"] == 0
  finally:
    router.kill()
    router.wait()
