"""The router (`cluster.router`) and its workers (`cluster.worker`) in one process:
real `Worker`s serving on threads, a real `WorkerPlacement` talking to them over
their ZeroMQ channel, KV moving through `jax.experimental.transfer` on loopback,
and a real `Engine` on top. Each test names the failure path of issues 23 and 24
it reaches and the bug that would make it fail.

One engine (1 prefill + 2 decode workers) serves the module, streaming KV layer by
layer (issue 22: the prefill worker offers each of 2 layer groups as it dispatches
it, the decode worker pulls each with the call; hand-offs that cannot stream move
whole, a group at a time), so every fault below meets streamed and whole copies
alike; the tests run in file order and each leaves it serving (every worker back,
no page held). Losses are made by stopping a worker's socket (it goes silent, as a
killed process does).
"""

import logging
import re
import threading
import time

import pytest

import pdserve_jax as pdj
from pdserve_jax.cluster.router import ClusterSettings, WorkerPlacement
from pdserve_jax.cluster.worker import Worker
from conftest import demo_prompts, wait_for

# A worker silent for TIMEOUT seconds is lost; a KV copy not landed in COPY_TIMEOUT is
# recomputed. Both far above what a loaded 2-core machine takes to answer a ping or
# land a copy of a few pages, so only the injected faults trip them.
TIMEOUT, COPY_TIMEOUT = 6.0, 5.0
MAX_TOKENS = 40
GREEDY = pdj.SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)

pytestmark = pytest.mark.slow


class Served:
  """A worker serving on a thread of its own."""

  def __init__(self, model, role, address="tcp://127.0.0.1:0"):
    self.worker = Worker(model, role, address)
    self.thread = threading.Thread(target=self.worker.serve, daemon=True,
                                   name=f"test-worker-{role}")
    self.thread.start()

  @property
  def address(self):
    return self.worker.address

  def stop(self):
    """Silent from now on (its socket closes, its command thread ends)."""
    self.worker.stop()
    self.thread.join(60)
    assert not self.thread.is_alive()


@pytest.fixture(scope="module")
def demo():
  return pdj.load_demo()


@pytest.fixture(scope="module")
def prompts(demo):
  texts = demo_prompts(seed=3, count=12, max_words=6)
  ids = [demo.tokenizer.encode(p) for p in texts]
  return ids, [list(w) for w in pdj.greedy_reference(demo, ids, MAX_TOKENS)]


@pytest.fixture(scope="module")
def cluster(demo):
  workers = {"prefill": [Served(demo, "prefill")],
             "decode": [Served(demo, "decode"), Served(demo, "decode")]}
  placement = WorkerPlacement(
      demo.config.name, "auto", {k: [w.address for w in v] for k, v in workers.items()},
      ClusterSettings(heartbeat_s=0.2, timeout_s=TIMEOUT, copy_timeout_s=COPY_TIMEOUT))
  spec = pdj.InstanceSpec(tp=1, max_batch=8, max_step_tokens=128)
  dep = pdj.Disaggregated(spec, spec, num_prefill=1, num_decode=2, kv_transfer="layerwise",
                          layer_groups=2)
  ec = pdj.EngineConfig(max_seq_len=96, num_pages=48, page_size=16, min_token_bucket=64)
  engine = pdj.Engine(demo, dep, ec, placement=placement)
  yield engine, workers
  engine.close(timeout=30)
  for ws in workers.values():
    for w in ws:
      w.stop()


def _outcomes(handles):
  """Each handle's token ids, or the exception its request ended with."""
  out = []
  for h in handles:
    try:
      out.append(list(h.result(300).token_ids))
    except Exception as e:  # noqa: BLE001 - the error is what is checked
      out.append(e)
  return out


def _served_after(engine, prompts):
  """Every request after a fault: the reference tokens, and no page left held."""
  ids, want = prompts
  assert _outcomes([engine.submit(p, GREEDY) for p in ids]) == want
  wait_for(lambda: engine.pages_in_use() == 0, 30, "every page freed")


def test_the_workers_serve_the_single_process_tokens(cluster, prompts):
  """Catches: a streamed layer group landing in the wrong layers or pages, or a
  request admitted before its last group landed (other tokens); streams silently
  not used (the count of copies that left with their prefill step)."""
  engine, _ = cluster
  _served_after(engine, prompts)
  assert engine.health() == {"prefill0": "ok", "decode0": "ok", "decode1": "ok"}
  assert engine.stats()["prefix_kv_streams"] > 0


def test_a_decode_that_raises_in_the_worker_fails_its_step_only(cluster, prompts):
  """Issue 23: a worker command that raises. The worker answers with the error and
  keeps its pool: the step's requests end naming it, the other decode instance's
  requests and later ones get the reference tokens. Then a failure that cost the
  worker its pool (a donated pool consumed): every request whose KV was there ends,
  the pool is replaced and serves on. Catches: a worker that dies or stops answering
  on a failed command, an error that fails every request, a lost pool reused."""
  engine, workers = cluster
  ids, want = prompts
  runner = workers["decode"][0].worker.runner
  calls = {"n": 0, "lose_pool": False}
  real_decode, real_lost = runner.decode, runner.pools_lost

  def failing_decode(*args, **kwargs):
    if calls["n"] == 0:
      calls["n"] += 1
      raise RuntimeError("injected decode failure")
    return real_decode(*args, **kwargs)

  runner.decode = failing_decode
  runner.pools_lost = lambda: calls["lose_pool"] or real_lost()
  try:
    for lose_pool in (False, True):
      calls["n"], calls["lose_pool"] = 0, lose_pool
      results = _outcomes([engine.submit(p, GREEDY) for p in ids])
      failed = [r for r in results if isinstance(r, Exception)]
      assert calls["n"] == 1 and failed, "the injected failure was not reached"
      for r in failed:  # the failed step's requests, or (pool lost) others held there
        assert "injected decode failure" in str(r) or (
            lose_pool and "KV pool of decode0 was lost" in str(r)), r
        assert "decode0" in str(r), r
      assert all(r == w for r, w in zip(results, want) if not isinstance(r, Exception))
      calls["lose_pool"] = False
      _served_after(engine, prompts)
  finally:
    runner.decode, runner.pools_lost = real_decode, real_lost
  assert engine.health()["decode0"] == "ok"  # a failed command is no lost worker


def test_a_prefill_that_fails_between_layer_groups_fails_its_streams_at_once(
    cluster, prompts, caplog):
  """Issue 22: a prefill call that raises after its first layer group was dispatched
  and offered. The worker offers an error in place of the group it never offered,
  so the decode worker's pull for it fails at once (its error names the failed
  call) instead of waiting for an offer that never comes; the step's requests end
  with the error, later ones get the reference tokens, no page stays held. Catches:
  a pull that waits for good (a thread and the copy's pages held until the copy
  time-out, or for ever), a stream reported landed without its last group."""
  engine, workers = cluster
  ids, want = prompts
  runner = workers["prefill"][0].worker.runner
  calls = {"n": 0}
  real_packed = runner.packed

  def failing_packed(*args, after_stage=None, **kwargs):
    def after_first_group(pool):
      after_stage(pool)
      if calls["n"] == 0:
        calls["n"] += 1
        raise RuntimeError("injected prefill failure")

    return real_packed(*args, after_stage=after_stage and after_first_group, **kwargs)

  caplog.set_level(logging.WARNING)
  runner.packed = failing_packed
  try:
    results = _outcomes([engine.submit(p, GREEDY) for p in ids])
  finally:
    runner.packed = real_packed
  failed = [r for r in results if isinstance(r, Exception)]
  assert calls["n"] == 1 and failed, "the injected failure was not reached"
  assert all("injected prefill failure" in str(r) for r in failed), failed
  assert all(r == w for r, w in zip(results, want) if not isinstance(r, Exception))
  # The decode worker's log (its threads run here): the pull failed on the error
  # offered, whichever of the call's and the pull's answers the router saw first.
  assert re.search(r"KV pull \d+ failed: .*the prefill call failed: injected prefill "
                   "failure", caplog.text), caplog.text
  wait_for(lambda: engine.pages_in_use() == 0, 30, "every page freed")
  _served_after(engine, prompts)


def test_a_pull_past_the_copy_timeout_is_recomputed_and_lands_nowhere(cluster, prompts):
  """Issue 23/24: a KV pull that blocks past `copy_timeout_s`. The request is
  recomputed (its prompt prefilled again, copied again) and gets the reference
  tokens; the late pull, when it lands, is not scattered (the router gave its pages
  to others by then), and the decode worker is not declared lost for the pull it
  never answered. Catches: a copy time-out that fails the request, or a stale
  scatter over reused pages (later requests would get other tokens)."""
  engine, workers = cluster
  ids, want = prompts
  blocked, lock = [], threading.Lock()
  for served in workers["decode"]:
    real = served.worker._pull_own

    def slow_pull(msg, real=real):
      with lock:
        first = not blocked
        blocked.append(msg["uuid"])
      if first:
        time.sleep(COPY_TIMEOUT + 3)
      return real(msg)

    served.worker._pull_own = slow_pull
  try:
    skipped = sum(s.worker.skipped_scatters for s in workers["decode"])
    results = _outcomes([engine.submit(p, GREEDY) for p in ids])
    assert blocked, "no pull was delayed"
    assert results == want
    wait_for(lambda: sum(s.worker.skipped_scatters for s in workers["decode"]) > skipped,
              60, "the late pull lands and is skipped")
  finally:
    for served in workers["decode"]:
      del served.worker._pull_own
  _served_after(engine, prompts)
  assert engine.health() == {"prefill0": "ok", "decode0": "ok", "decode1": "ok"}


def test_a_lost_decode_worker_s_requests_are_recomputed_and_it_comes_back(
    cluster, prompts, demo, caplog):
  """Issue 24: a decode worker goes silent while it provably holds requests. They
  are recomputed on the other decode instance (prefill again, nothing streamed
  twice) and get the reference tokens; the instance is lost. A worker of the wrong
  role answering at its address is refused (it stays lost: issue 23's refused
  registration); the right worker started there is set up and taken back, and
  serves. Catches: requests of a lost instance failed although another could serve
  them, a token streamed twice, a wrong worker admitted, a returning one ignored."""
  engine, workers = cluster
  ids, want = prompts
  caplog.set_level(logging.ERROR)
  d0 = engine.coordinator.decodes[0]
  handles = [engine.submit(p, GREEDY) for p in ids]
  wait_for(lambda: d0.num_running >= 2, 120, "decode0 holds requests")
  old = workers["decode"][0]
  old.stop()
  results = [h.result(300) for h in handles]
  assert [list(r.token_ids) for r in results] == want  # each token once, the right one
  assert any(r.num_preemptions for r in results), "no request was recomputed"
  assert engine.health()["decode0"] == "lost"
  assert engine.unavailable() is None  # decode1 serves on
  # Seen when the connection closed, not TIMEOUT seconds of silence later.
  assert "closed its connection" in caplog.text

  wrong = Served(demo, "prefill", old.address)
  wait_for(lambda: "serves prefill, not decode" in caplog.text, 120,
            "the wrong worker is refused")
  assert engine.health()["decode0"] == "lost"
  wrong.stop()
  workers["decode"][0] = Served(demo, "decode", old.address)
  wait_for(lambda: engine.health()["decode0"] == "ok", 300, "decode0 is taken back")
  _served_after(engine, prompts)


class _Hangs:
  """A worker's socket whose reads block while `hang` is set: its process looks hung
  (the connection open, nothing answered), as a SIGSTOPped one does."""

  def __init__(self, sock):
    self.sock, self.hang, self.resume = sock, threading.Event(), threading.Event()

  def recv_multipart(self, *args, **kwargs):
    if self.hang.is_set():
      self.resume.wait()
    return self.sock.recv_multipart(*args, **kwargs)

  def __getattr__(self, name):
    return getattr(self.sock, name)


def test_a_hung_decode_worker_is_lost_then_taken_back_when_it_answers(cluster, prompts,
                                                                      caplog):
  """Issue 24's flapping worker: a decode worker stops answering (hung, connection
  open) while it holds requests. After `timeout_s` of silence it is lost and its
  requests are recomputed on the other decode instance (the reference tokens); when
  it answers again the router sets it up afresh and takes it back, and the commands
  its old connection left behind are refused (they must not touch the new pool).
  Catches: a hung worker never declared lost (its requests would hang), a resumed
  one not taken back, or taken back with the old pool and page tables."""
  engine, workers = cluster
  ids, want = prompts
  caplog.set_level(logging.ERROR)
  worker = workers["decode"][1].worker
  hangs = worker._sock = _Hangs(worker._sock)
  d1 = engine.coordinator.decodes[1]
  handles = [engine.submit(p, GREEDY) for p in ids]
  wait_for(lambda: d1.num_running >= 2, 120, "decode1 holds requests")
  hangs.hang.set()
  results = [h.result(300) for h in handles]
  assert [list(r.token_ids) for r in results] == want
  assert any(r.num_preemptions for r in results), "no request was recomputed"
  assert engine.health()["decode1"] == "lost"
  assert "decode1 lost" in caplog.text and "sent nothing for" in caplog.text
  hangs.resume.set()
  wait_for(lambda: engine.health()["decode1"] == "ok", 300, "decode1 is taken back")
  _served_after(engine, prompts)


def test_a_worker_of_the_wrong_role_or_model_is_refused_at_start(cluster, demo):
  """Issue 23: the router refuses a worker of the wrong role or model, naming it,
  before anything is served (and the refused worker serves on for a right router).
  Catches: a decode worker run as a prefill instance, weights of another model."""
  _, workers = cluster
  spec = pdj.InstanceSpec(tp=1, max_batch=4, max_step_tokens=64)
  dep = pdj.Disaggregated(spec, spec)
  ec = pdj.EngineConfig(max_seq_len=64, num_pages=16, page_size=16, warmup=False)
  decode_address = workers["decode"][1].address
  swapped = WorkerPlacement(demo.config.name, "auto",
                            {"prefill": [decode_address], "decode": [decode_address]})
  with pytest.raises(ValueError, match="serves decode, not prefill"):
    pdj.Engine(demo, dep, ec, placement=swapped)
  other = Served(pdj.random_model(pdj.get_preset("tiny"), seed=0), "prefill")
  try:
    placement = WorkerPlacement(demo.config.name, "auto",
                                {"prefill": [other.address], "decode": [decode_address]})
    with pytest.raises(ValueError, match="serves model 'tiny'"):
      pdj.Engine(demo, dep, ec, placement=placement)
  finally:
    other.stop()


def test_elastic_roles_move_a_decode_worker_to_prefill_with_the_greedy_tokens(cluster, prompts,
                                                                             demo):
  """Issue 22, elastic roles across processes: the module's three workers serve a new
  router's elastic deployment (a worker takes a new router's set-up; the module's
  engine is idle from here on). With a TTFT SLO no step can meet, the controller
  moves a decode group to prefill once 4 requests were seen: the requests it holds
  migrate to the other decode worker (a KV copy between two decode workers), and
  then its worker prefills on the same weights and pool. Catches: a worker that
  cannot run its other role's program, a migration that lands in the wrong pages
  (other tokens), a page leaked over the move. (Whole copies and no warm-up keep it
  short: programs compile on first use, only the shapes used; the module's engine
  streams.)"""
  from pdserve_jax.core.elastic import ElasticConfig

  _, workers = cluster
  ids, want = (p[:8] for p in prompts)
  placement = WorkerPlacement(
      demo.config.name, "auto", {k: [w.address for w in v] for k, v in workers.items()},
      ClusterSettings(heartbeat_s=0.2, timeout_s=TIMEOUT, copy_timeout_s=120.0))
  spec = pdj.InstanceSpec(tp=1, max_batch=4, max_step_tokens=128)  # 3 decode shapes
  dep = pdj.Disaggregated(spec, spec, num_decode=2, elastic=ElasticConfig(window=4))
  ec = pdj.EngineConfig(max_seq_len=96, num_pages=48, page_size=16, min_token_bucket=64,
                        warmup=False, ttft_slo=1e-4, tpot_slo=10.0)
  engine = pdj.Engine(demo, dep, ec, placement=placement)
  try:
    copies, start_copy = [], engine.executor.start_copy

    def recorded(req, src, dst, now):  # the engine thread's copies, as it starts them
      copies.append((src.phase, dst.phase))
      start_copy(req, src, dst, now)

    engine.executor.start_copy = recorded
    assert _outcomes([engine.submit(p, GREEDY) for p in ids]) == want
    assert [h[1:] for h in engine.coordinator.role_history] == [(1, 2), (2, 1)]
    assert ("decode", "decode") in copies, copies  # a migration between decode workers
    wait_for(lambda: engine.pages_in_use() == 0, 30, "every page freed")
  finally:
    engine.close(timeout=30)
