"""The HTTP front end under hostile and ordinary clients, in one process: the app
(`api.app`) over a real engine, served by a real uvicorn on a loopback socket, hit
with raw sockets, httpx, the official `openai` client, guidellm and lm-eval.

Each test names the defect of issue 24 it catches. One engine and one server serve
the whole module; the last test closes the engine (503s after close)."""

import json
import os
import re
import socket
import subprocess
import sys
import threading

import httpx
import numpy as np
import pytest

import pdserve_jax as pdj
from pdserve_jax.api import app as api
from pdserve_jax.model.demo import DEMO_DIR
from conftest import wait_for

MAX_QUEUED = 6
BODY_LIMIT = 64 << 10
BODY_TIMEOUT = 1.5
DIRECT = []  # requests submitted to the engine, not over HTTP
LONG = {"prompt": "And the king", "max_tokens": 80, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def served():
  import uvicorn

  demo = pdj.load_demo()
  dep = pdj.Colocated(pdj.InstanceSpec(tp=1, max_batch=8, max_step_tokens=128))
  ec = pdj.EngineConfig(max_seq_len=96, num_pages=64, page_size=16, min_token_bucket=64,
                        max_queued=MAX_QUEUED)
  engine = pdj.Engine(demo, dep, ec)
  app = api.create_app(engine, DEMO_DIR, api.ApiConfig(
      max_body_bytes=BODY_LIMIT, body_timeout_s=BODY_TIMEOUT), aliases=["demo"], root=DEMO_DIR)
  sock = socket.socket()
  sock.bind(("127.0.0.1", 0))
  server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
  thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
  thread.start()
  url = "http://127.0.0.1:%d" % sock.getsockname()[1]
  wait_for(lambda: _get(url + "/health") == 200, 60, "the server answers")
  yield engine, app, url, demo
  server.should_exit = True
  thread.join(30)
  engine.close()


def _get(url):
  try:
    return httpx.get(url, timeout=10).status_code
  except httpx.HTTPError:
    return None


def _raw(url, head: bytes, body: bytes = b"") -> socket.socket:
  host, port = url.split("//")[1].split(":")
  s = socket.create_connection((host, int(port)), timeout=60)
  s.sendall(head + body)
  return s


def _read_all(s: socket.socket) -> bytes:
  out = b""
  while chunk := s.recv(65536):
    out += chunk
  return out


def _post_head(path: str, length: int) -> bytes:
  return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
          f"Content-Length: {length}\r\n\r\n").encode()


# --- defect 1: a huge body froze the server -----------------------------------------------


def test_an_oversized_body_gets_413_before_it_is_sent(served):
  """Defect 1 (a 50 MB body parsed on the event loop): the 413 arrives although
  only 1 KB of a declared 50 MB was sent, and the server serves others meanwhile."""
  engine, _, url, _ = served
  s = _raw(url, _post_head("/v1/completions", 50 << 20), b"{" + b" " * 1023)
  assert httpx.get(url + "/health", timeout=10).status_code == 200  # not frozen
  reply = _read_all(s)  # the server answered and closed: the rest is never read
  s.close()
  assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
  assert b"connection: close" in reply.lower()  # not held open until keep-alive ends
  err = json.loads(reply.split(b"\r\n\r\n", 1)[1])["error"]
  assert "exceeds the limit" in err["message"] and err["code"] == 413
  # Without a Content-Length (chunked), the limit holds as bytes arrive.
  big = httpx.post(url + "/v1/completions", content=iter([b"[" * (BODY_LIMIT // 2)] * 4),
                   timeout=30)
  assert big.status_code == 413 and big.json()["error"]["type"] == "invalid_request_error"


def test_a_stalled_body_is_closed_at_the_deadline(served):
  """Defect 6 (connections that sent less than their Content-Length held forever):
  the server answers 408 and closes the connection."""
  _, _, url, _ = served
  s = _raw(url, _post_head("/v1/completions", 1000), b'{"prompt": ')
  reply = _read_all(s)  # returns only because the server closed the connection
  s.close()
  assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
  assert b"connection: close" in reply.lower()
  assert b"did not arrive within" in reply


def test_deep_json_gets_a_json_400(served):
  """Defect 7 (an uncaught RecursionError gave a plain-text 500)."""
  _, _, url, _ = served
  r = httpx.post(url + "/v1/completions", content=b"[" * 30_000 + b"]" * 30_000, timeout=30)
  assert r.status_code == 400 and "nested too deeply" in r.json()["error"]["message"]


def test_every_failure_is_a_json_error(served):
  """Unknown routes, wrong methods and bad fields all answer OpenAI's error schema."""
  _, _, url, _ = served
  for r in (httpx.get(url + "/nothing", timeout=10),
            httpx.get(url + "/v1/completions", timeout=10),
            httpx.post(url + "/v1/completions", json={"prompt": "a", "max_tokens": 0},
                       timeout=10),
            httpx.post(url + "/v1/chat/completions", json={"messages": []}, timeout=10)):
    err = r.json()["error"]
    assert r.status_code in (400, 404, 405) and set(err) == {"message", "type", "param",
                                                             "code"}


# --- defects 4 and 10: disconnects abort; metrics count every outcome ---------------------


def _counts(engine):
  return dict(engine.stats())


def test_a_non_streamed_request_is_aborted_when_its_client_leaves(served):
  """Defect 4 (16 of 16 ran to completion): the request is aborted and its pages
  freed, and /metrics counts the disconnect."""
  engine, _, url, _ = served
  before = _counts(engine)
  body = json.dumps(LONG).encode()
  s = _raw(url, _post_head("/v1/completions", len(body)), body)
  wait_for(lambda: engine.stats()["unfinished"] == 1, 60, "the request runs")
  s.close()
  wait_for(lambda: engine.stats()["unfinished"] == 0, 60, "the request ends")
  after = _counts(engine)
  assert after["aborted"] == before["aborted"] + 1 and after["finished"] == before["finished"]
  assert after["pages_in_use"] == 0
  assert "pdserve_client_disconnects_total" in httpx.get(url + "/metrics", timeout=10).text


def test_a_stream_dropped_after_its_first_chunk_is_aborted(served):
  engine, _, url, _ = served
  before = _counts(engine)
  with httpx.stream("POST", url + "/v1/completions", json=dict(LONG, stream=True),
                    timeout=60) as r:
    first = next(r.iter_lines())
    assert first.startswith("data: ")
  wait_for(lambda: engine.stats()["unfinished"] == 0, 60, "the stream's request ends")
  after = _counts(engine)
  assert after["aborted"] == before["aborted"] + 1 and after["pages_in_use"] == 0


def test_streamed_chunks_carry_logprobs(served):
  """Defect 8 (every chunk had "logprobs": null)."""
  _, _, url, _ = served
  chunks = []
  with httpx.stream("POST", url + "/v1/completions", timeout=60, json={
      "prompt": "And the", "max_tokens": 6, "temperature": 0, "ignore_eos": True,
      "logprobs": 2, "stream": True,
      "stream_options": {"include_usage": True, "continuous_usage_stats": True}}) as r:
    for line in r.iter_lines():
      if line.startswith("data: {"):
        chunks.append(json.loads(line[6:]))
  tokens = [c for c in chunks if c["choices"] and c["choices"][0]["token_ids"]]
  assert len(tokens) == 6
  for c in tokens:
    lp = c["choices"][0]["logprobs"]
    assert lp["token_logprobs"][0] <= 0 and len(lp["top_logprobs"][0]) >= 1
  # continuous_usage_stats (defect 5): every chunk counts the tokens so far.
  assert [c["usage"]["completion_tokens"] for c in tokens] == list(range(1, 7))
  assert chunks[-1]["usage"]["completion_tokens"] == 6 and chunks[-1]["choices"] == []


def test_a_full_queue_gets_429_with_retry_after(served):
  """Defect 3 (a 429 with no Retry-After): with max_queued requests unfinished."""
  engine, _, url, _ = served
  # Held through the engine itself (an HTTP request would end before the next one
  # is sent): the metrics test leaves them out of its sums.
  held = [engine.submit("And", pdj.SamplingParams(max_tokens=80, ignore_eos=True))
          for _ in range(MAX_QUEUED)]
  DIRECT.extend(held)
  try:
    r = httpx.post(url + "/v1/completions", json={"prompt": "a", "max_tokens": 2}, timeout=30)
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
    assert r.json()["error"]["type"] == "rate_limit_error"
  finally:
    for h in held:
      h.cancel()
  wait_for(lambda: engine.stats()["unfinished"] == 0, 60, "the held requests end")


# --- defect 5: the surface clients use ------------------------------------------------------


def test_openai_chat_streamed_text_equals_non_streamed(served):
  openai = pytest.importorskip("openai")
  engine, _, url, demo = served
  client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
  model = client.models.list().data[0].id
  assert model == DEMO_DIR  # a name `AutoTokenizer.from_pretrained` resolves
  messages = [{"role": "system", "content": "A psalm."},
              {"role": "user", "content": "Who is the king of glory?"}]
  full = client.chat.completions.create(model=model, messages=messages, max_tokens=24,
                                        temperature=0, logprobs=True, top_logprobs=2)
  text = full.choices[0].message.content
  chunks = list(client.chat.completions.create(
      model="demo", messages=messages, max_tokens=24, temperature=0, stream=True,
      stream_options={"include_usage": True}))
  assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
  assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
  # The prompt is the chat template's rendering, and greedy tokens are the reference's.
  ids = demo.tokenizer.encode(demo.tokenizer.bos_token + "A psalm.\n\nUser: Who is the king "
                              "of glory?\nAssistant:", add_special_tokens=False)
  assert full.usage.prompt_tokens == len(ids)
  want = pdj.greedy_reference(demo, [ids], full.usage.completion_tokens)[0]
  assert full.choices[0].token_ids == want
  assert len(full.choices[0].logprobs.content) == len(want)


def test_echo_logprobs_are_the_forward_pass_log_softmax(served):
  """lm-eval's loglikelihood request (echo, logprobs, max_tokens 0 or 1): each prompt
  token's logprob equals `pdj.forward`'s log-softmax at the position before it."""
  _, _, url, demo = served
  ids = demo.tokenizer.encode("And the king said unto them")
  for max_tokens in (0, 1):
    r = httpx.post(url + "/v1/completions", timeout=60, json={
        "model": "demo", "prompt": [ids], "max_tokens": max_tokens, "temperature": 0,
        "logprobs": 1, "echo": True})
    lp = r.json()["choices"][0]["logprobs"]
    assert len(lp["token_logprobs"]) == len(ids) + max_tokens and lp["token_logprobs"][0] is None
    logits = np.asarray(pdj.forward(demo, np.asarray([ids])))[0].astype(np.float64)
    lsm = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1,
                                                                            keepdims=True)) \
        - logits.max(-1, keepdims=True)
    want = [lsm[i - 1, ids[i]] for i in range(1, len(ids))]
    np.testing.assert_allclose(lp["token_logprobs"][1:len(ids)], want, atol=2e-4)
    best = [lsm[i - 1].max() for i in range(1, len(ids))]
    np.testing.assert_allclose([max(d.values()) for d in lp["top_logprobs"][1:len(ids)]],
                               best, atol=2e-4)


def test_tokenize_and_detokenize_as_vllm(served):
  _, _, url, demo = served
  r = httpx.post(url + "/tokenize", json={"prompt": "And the"}, timeout=10).json()
  assert r["tokens"] == demo.tokenizer.encode("And the") and r["count"] == len(r["tokens"])
  assert r["max_model_len"] == 96
  chat = httpx.post(url + "/tokenize", timeout=10, json={
      "messages": [{"role": "user", "content": "Hi"}]}).json()
  assert demo.tokenizer.decode(chat["tokens"]) == "User: Hi\nAssistant:"
  back = httpx.post(url + "/detokenize", json={"tokens": r["tokens"]}, timeout=10).json()
  assert back["prompt"] == "And the"
  bad = httpx.post(url + "/detokenize", json={"tokens": [10**6]}, timeout=10)
  assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"


@pytest.mark.slow
def test_guidellm_runs_against_the_server_with_only_its_url(served, tmp_path):
  """Defect 5: guidellm looked the tokenizer up on the hub by the model name, posted
  to /v1/chat/completions and sent continuous_usage_stats. Now its defaults work."""
  pytest.importorskip("guidellm")
  _, _, url, _ = served
  out = tmp_path / "guidellm.json"
  proc = subprocess.run(
      [sys.executable, "-m", "guidellm", "run", "--backend", f"kind=openai_http,target={url}",
       "--profile", "kind=synchronous", "--constraint", "kind=max_requests,count=4",
       "--data", "kind=synthetic_text,prompt_tokens=16,output_tokens=8",
       "--output", f"kind=json,path={out}", "--disable-console-interactive"],
      capture_output=True, text=True, timeout=600,
      env=dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1"))
  assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
  report = json.loads(out.read_text())
  totals = report["benchmarks"][0]["metrics"]["request_totals"]
  assert totals["successful"] == 4 and totals["errored"] == 0, totals


@pytest.mark.slow
def test_lm_eval_local_completions_loglikelihood(served, tmp_path, monkeypatch):
  """lm-eval's `local-completions` loglikelihood task, built from local data: the
  server's answers give the same log-likelihoods as `pdj.forward`."""
  pytest.importorskip("lm_eval")
  _, _, url, demo = served
  # lm-eval joins context and choice with its target_delimiter, " ".
  docs = [{"context": "And the king", "choices": ["said", "sat"], "label": 0},
          {"context": "In the beginning", "choices": ["God", "LORD"], "label": 0}]
  (tmp_path / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
  (tmp_path / "pdj_tiny.yaml").write_text(
      "task: pdj_tiny\ndataset_path: json\n"
      f"dataset_kwargs:\n  data_files:\n    test: {tmp_path / 'docs.jsonl'}\n"
      "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{context}}'\n"
      "doc_to_choice: '{{choices}}'\ndoc_to_target: label\n"
      "metric_list:\n  - metric: acc\n")
  # In this process, over the built-in tasks not indexed (the CLI indexes all of
  # them on every run: most of its time here). The requests are the same.
  for offline in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    monkeypatch.setenv(offline, "1")
  from lm_eval import simple_evaluate
  from lm_eval.tasks import TaskManager

  results = simple_evaluate(
      model="local-completions",
      model_args=f"model={DEMO_DIR},base_url={url}/v1/completions,num_concurrent=1",
      tasks=["pdj_tiny"], log_samples=True,
      task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False))
  samples = results["samples"]["pdj_tiny"]
  assert len(samples) == 2
  tok = demo.tokenizer
  for s in samples:
    doc = s["doc"]
    for choice, got in zip(doc["choices"], s["resps"]):
      # lm-eval's tokens: context and continuation encoded without special tokens.
      ctx = tok.encode(doc["context"], add_special_tokens=False)
      full = ctx + tok.encode(" " + choice, add_special_tokens=False)
      logits = np.asarray(pdj.forward(demo, np.asarray([full])))[0].astype(np.float64)
      m = logits.max(-1, keepdims=True)
      lsm = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
      want = sum(lsm[i - 1, full[i]] for i in range(len(ctx), len(full)))
      assert abs(float(got[0][0]) - want) < 1e-3, (doc, choice, got, want)


# --- defect 10 and 2: counts, and the server that cannot serve -----------------------------


def _metric(text, name, label):
  m = re.search(rf'^{name}\{{{label}\}} (\d+)$', text, re.M)
  return int(m.group(1)) if m else 0


def test_metrics_counts_equal_the_engine_s(served):
  """Defect 10 (/metrics showed 409 where the engine counted 436 + 73)."""
  engine, _, url, _ = served
  wait_for(lambda: engine.stats()["unfinished"] == 0, 60, "nothing in flight")
  httpx.post(url + "/v1/completions", json={"prompt": "a", "max_tokens": 2}, timeout=60)
  text = httpx.get(url + "/metrics", timeout=10).text
  stats = engine.stats()
  direct = [o for h in DIRECT for o in h.outcomes()]
  out = lambda o: _metric(text, "pdserve_responses_total", f'outcome="{o}"') + direct.count(o)
  assert out("stop") + out("length") == stats["finished"] > 0
  assert out("aborted") == stats["aborted"] >= 2
  assert out("failed") == stats["failed"] + stats["rejected"]
  for status in ("200", "400", "404", "405", "408", "413", "429"):
    assert _metric(text, "pdserve_http_responses_total", f'status="{status}"') >= 1, status


def test_after_close_requests_get_503_and_health_503(served):
  """Defect 2's second half: a server that cannot serve says 503 with Retry-After
  (not 500), and /health says 503 so a load balancer stops sending."""
  engine, _, url, _ = served
  assert httpx.get(url + "/health", timeout=10).json()["status"] == "ok"
  engine.close()
  r = httpx.post(url + "/v1/completions", json={"prompt": "a", "max_tokens": 2}, timeout=30)
  assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
  assert r.json()["error"]["type"] == "service_unavailable"
  h = httpx.get(url + "/health", timeout=10)
  assert h.status_code == 503 and h.json()["status"] == "unavailable"
