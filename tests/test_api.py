"""The OpenAI-compatible HTTP front end: a real server process (`pdserve_jax.cli.api`)
answering the official `openai` client, streamed text that is never taken back, and
bad HTTP input refused with a 4xx naming the field while the server keeps serving."""

import concurrent.futures
import json
import os
import re
import signal
import subprocess
import sys
import time

import httpx
import pytest

import pdserve_jax as pdj
from conftest import demo_prompts
from pdserve_jax.api import app as api
from pdserve_jax.model.demo import DEMO_DIR

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- pieces ------------------------------------------------------------------------------


def _bytes_decode(ids):
  return bytes(ids).decode("utf-8", errors="replace")


@pytest.mark.parametrize("body, param, status", [
    ([1, 2], None, 400),
    ({"max_tokens": 4}, "prompt", 400),
    ({"prompt": 5}, "prompt", 400),
    ({"prompt": [1, "a"]}, "prompt", 400),
    ({"prompt": ["a", "b"]}, "prompt", 400),
    ({"prompt": "a", "max_tokens": "8"}, "max_tokens", 400),
    ({"prompt": "a", "max_tokens": True}, "max_tokens", 400),
    ({"prompt": "a", "temperature": "hot"}, "temperature", 400),
    ({"prompt": "a", "stream": "yes"}, "stream", 400),
    ({"prompt": "a", "stop": [1]}, "stop", 400),
    ({"prompt": "a", "echo": True, "stream": True}, "echo", 400),
    ({"prompt": "a", "max_tokens": 0}, "max_tokens", 400),
    ({"prompt": "a", "frobnicate": 1}, "frobnicate", 400),
    ({"prompt": "a", "model": "gpt-4"}, "model", 404),
    ({"prompt": "a", "n": 2, "stream": True}, "n", 400),
    ({"prompt": "a", "stream_options": {"x": 1}}, "stream_options", 400),
])
def test_parse_completion_names_the_bad_field(body, param, status):
  with pytest.raises(api.BadRequest) as e:
    api.parse_completion(body, "demo")
  assert e.value.param == param and e.value.status == status
  assert set(e.value.body()["error"]) == {"message", "type", "param", "code"}


def test_parse_completion_defaults_are_openai_s():
  call = api.parse_completion({"prompt": ["hi"]}, "demo")
  p = call.params
  assert call.prompt == "hi" and not call.stream and not call.include_usage
  assert (p.max_tokens, p.temperature, p.top_p, p.n) == (16, 1.0, 1.0, 1)
  call = api.parse_completion(
      {"prompt": [1, 2], "model": "demo", "stop": "x", "stream": True, "seed": 3,
       "stream_options": {"include_usage": True, "continuous_usage_stats": True},
       "top_k": 5}, "demo")
  p = call.params
  assert p.stop == ("x",) and call.stream and call.include_usage and call.continuous_usage
  assert p.seed == 3 and p.top_k == 5


# --- a real server -----------------------------------------------------------------------

ENGINE = ("--config.engine.max_seq_len=96", "--config.engine.num_pages=96",
          "--config.engine.min_token_bucket=64", "--config.instance.max_batch=8",
          "--config.instance.max_step_tokens=128")


@pytest.fixture(scope="module")
def server():
  proc = subprocess.Popen(
      [sys.executable, "-m", "pdserve_jax.cli.api", "--port=0", *ENGINE],
      cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  line = proc.stdout.readline()  # printed once bound and warmed up
  m = re.search(r"on (http://\S+)", line)
  if not m:
    proc.kill()
    pytest.fail(f"server did not start: {line!r} {proc.stderr.read()[-3000:]}")
  url = m.group(1)
  deadline = time.monotonic() + 60
  while time.monotonic() < deadline:
    try:
      if httpx.get(url + "/health", timeout=5).status_code == 200:
        break
    except httpx.HTTPError:
      time.sleep(0.2)
  yield proc, url
  if proc.poll() is None:
    proc.kill()
    proc.wait()


@pytest.fixture(scope="module")
def prompts():
  return demo_prompts(seed=0, count=32, max_words=7)


@pytest.mark.slow
def test_openai_client_gets_the_engine_s_greedy_tokens(server, prompts):
  openai = pytest.importorskip("openai")
  _, url = server
  client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
  model = client.models.list().data[0].id
  assert model == DEMO_DIR  # the folder, which a client's tokenizer lookup resolves

  def ask(prompt):
    return client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0,
                                     extra_body={"ignore_eos": True})

  with concurrent.futures.ThreadPoolExecutor(16) as pool:  # all 32 in flight together
    answers = list(pool.map(ask, prompts))
  demo = pdj.load_demo()
  tok = demo.tokenizer
  want = pdj.greedy_reference(demo, [tok.encode(p) for p in prompts], 12)
  for a, w in zip(answers, want):
    c = a.choices[0]
    assert c.token_ids == list(w) and c.text == tok.decode(list(w))
    assert c.finish_reason == "length" and a.usage.completion_tokens == 12
  # Streamed: the same text, piece by piece, with the usage at the end.
  for prompt, a in list(zip(prompts, answers))[:4]:
    chunks = list(client.completions.create(
        model=model, prompt=prompt, max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == a.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 12


@pytest.mark.slow
def test_stop_strings_stream_what_the_final_text_keeps(server):
  _, url = server
  body = {"prompt": "And the king said", "max_tokens": 40, "temperature": 0,
          "ignore_eos": True}
  full = httpx.post(url + "/v1/completions", json=body, timeout=60).json()
  text = full["choices"][0]["text"]
  stop = text[len(text) // 2:len(text) // 2 + 3]  # three characters from the middle
  cut = httpx.post(url + "/v1/completions", json=dict(body, stop=[stop]), timeout=60).json()
  want = text[:text.find(stop)]
  assert cut["choices"][0]["text"] == want and cut["choices"][0]["finish_reason"] == "stop"
  streamed = ""
  with httpx.stream("POST", url + "/v1/completions", json=dict(body, stop=[stop], stream=True),
                    timeout=60) as r:
    for line in r.iter_lines():
      if line.startswith("data: ") and line != "data: [DONE]":
        streamed += json.loads(line[6:])["choices"][0]["text"]
  assert streamed == want


@pytest.mark.slow
def test_bad_http_input_gets_a_4xx_and_the_server_keeps_serving(server):
  _, url = server
  post = lambda **kw: httpx.post(url + "/v1/completions", timeout=60, **kw)
  cases = [
      (dict(content=b"{not json"), 400, None),
      (dict(content=b"\xff\xfe"), 400, None),
      (dict(json={"prompt": "a", "max_tokens": "ten"}), 400, "max_tokens"),
      (dict(json={"prompt": "a", "max_tokens": 10_000}), 400, None),  # too long for 96
      (dict(json={"prompt": "a" * 500}), 400, None),  # prompt beyond the context
      (dict(json={"prompt": [1, 2, 10**9]}), 400, None),  # id outside the vocabulary
      (dict(json={"prompt": "a", "temperature": -1}), 400, None),
      (dict(content=b'{"prompt": "a", "temperature": NaN}'), 400, "temperature"),
      (dict(json={"prompt": "a", "top_p": 0}), 400, None),
      (dict(json={"prompt": "a", "unknown": 1}), 400, "unknown"),
      (dict(json={"prompt": "a", "model": "other"}), 404, "model"),
  ]
  for kw, status, param in cases:
    r = post(**kw)
    assert r.status_code == status, (kw, r.text)
    err = r.json()["error"]
    assert err["message"] and (param is None or err["param"] == param), (kw, err)
  assert httpx.get(url + "/v1/nothing", timeout=10).status_code == 404
  assert httpx.get(url + "/v1/completions", timeout=10).status_code == 405
  ok = post(json={"prompt": "And", "max_tokens": 3, "temperature": 0})
  assert ok.status_code == 200 and len(ok.json()["choices"][0]["token_ids"]) >= 1
  health = httpx.get(url + "/health", timeout=10).json()
  assert health["status"] == "ok" and health["pages_in_use"] == 0
  metrics = httpx.get(url + "/metrics", timeout=10).text
  assert re.search(r'pdserve_http_responses_total\{status="400"\} (\d+)', metrics)
  series = ("pdserve_ttft_seconds_bucket", "pdserve_tpot_seconds_count", "pdserve_kv_pages_total")
  assert all(name in metrics for name in series)


@pytest.mark.slow
def test_bench_client_measures_the_server_in_the_result_schema(server, tmp_path):
  from pdserve_jax import results

  _, url = server
  out = tmp_path / "bench.json"
  proc = subprocess.run(
      [sys.executable, "-m", "pdserve_jax.cli.bench", f"--config.url={url}",
       "--config.rates=5,20", "--config.workload.num_requests=8",
       "--config.max_total_tokens=96", "--config.num_devices=2", f"--output_json={out}"],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  doc = json.loads(out.read_text())
  results.validate(doc)
  assert doc["app"] == "bench" and [r["rate_rps"] for r in doc["runs"]] == [5.0, 20.0]
  for run in doc["runs"]:
    assert run["executor"] == "endpoint" and run["failed_requests"] == 0
    assert run["num_devices"] == 2 and run["deployment"] == f"endpoint {url}"
    for q in run["requests"]:  # ignore_eos: every request got its whole output
      assert q["output_tokens"] == q["max_tokens"] and q["finish_reason"] == "length"
      assert 0 <= q["arrival_s"] <= q["first_token_s"] <= q["finish_s"]
  assert "goodput (highest rate with attainment" in proc.stdout
  bad = subprocess.run([sys.executable, "-m", "pdserve_jax.cli.bench", "--config.url=ftp://x"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert bad.returncode == 1 and "url: expected http(s)://host:port" in bad.stderr


@pytest.mark.slow
def test_sigterm_drains_and_exits(server):
  proc, url = server
  with httpx.stream("POST", url + "/v1/completions", timeout=60,
                    json={"prompt": "And", "max_tokens": 40, "stream": True,
                          "temperature": 0}) as r:
    lines = r.iter_lines()
    first = next(lines)
    proc.send_signal(signal.SIGTERM)
    rest = list(lines)
  # The stream in flight ends properly (served to its end or aborted), and the process
  # exits: uvicorn drains, then re-raises the signal it caught (exit by SIGTERM).
  assert first.startswith("data: ") and "data: [DONE]" in rest
  assert proc.wait(timeout=60) in (0, -signal.SIGTERM)
