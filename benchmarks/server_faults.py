"""Load and faults: a router and its worker processes under a steady client load while
workers are killed (SIGKILL) and restarted on a schedule; every request accounted for.

Starts a router (`cli.serve --role=router`) over `--num_prefill` prefill and
`--num_decode` decode worker processes of the demo model on 127.0.0.1, then sends
greedy streamed completions with Poisson arrivals at `--rate` per second for
`--duration` seconds from client threads (httpx; a request that sees no byte for
`--hang_s` seconds counts as hung). Each `--faults` entry `name@at+down` kills that
worker `at` seconds into the run and starts it again, with the same command and
port, `down` seconds later. A thread polls `/health` to time when the router saw
the loss and when it took the worker back.

Printed: requests sent, succeeded (and how many got the single-process greedy
tokens: all must), failed with a clear error (an OpenAI error body naming why,
grouped by message), failed otherwise, hung (must be 0); per fault the time to
see the loss and the time from restart to re-admission; goodput (requests per
second that succeeded within the TTFT and TPOT SLOs, by arrival time) before the
first kill, while any worker was out, and after the last one came back.

  python benchmarks/server_faults.py [--rate=2] [--duration=120] \
      [--faults=decode0@15+5,prefill0@45+5]

The machine it ran on and its load change every figure; run it on a quiet machine
to compare builds.
"""

from __future__ import annotations

import collections
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time

from absl import app, flags
from absl import logging as absl_logging

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

flags.DEFINE_integer("num_prefill", 1, "prefill worker processes")
flags.DEFINE_integer("num_decode", 2, "decode worker processes")
flags.DEFINE_float("rate", 2.0, "Poisson arrivals per second")
flags.DEFINE_float("duration", 120.0, "seconds of arrivals")
flags.DEFINE_integer("max_tokens", 32, "output tokens per request (EOS ignored)")
flags.DEFINE_list("faults", ["decode0@15+5", "prefill0@45+5"],
                  "name@at+down: kill worker `name` at `at` s, restart it `down` s later")
flags.DEFINE_float("hang_s", 120.0, "a request silent this long is hung")
flags.DEFINE_float("ttft_slo", 5.0, "seconds, for goodput")
flags.DEFINE_float("tpot_slo", 1.0, "seconds per token, for goodput")
flags.DEFINE_integer("seed", 0, "arrivals and prompts")
flags.DEFINE_list("config", ["--config.engine.max_seq_len=128", "--config.engine.num_pages=128",
                             "--config.instance.max_batch=8",
                             "--config.instance.max_step_tokens=128",
                             "--config.cluster.timeout_s=30"],
                  "config overrides given to every process (configs/cluster_demo.py)")
FLAGS = flags.FLAGS

WORDS = ["And", "the", "king", "said", "unto", "them", "In", "beginning", "LORD", "land"]


def start(role: str, port: int = 0, args=()):
  """A `cli.serve` process and the address it printed once ready."""
  log = tempfile.TemporaryFile("w+")
  proc = subprocess.Popen(
      [sys.executable, "-m", "pdserve_jax.cli.serve", f"--role={role}", f"--port={port}",
       "--config=configs/cluster_demo.py", *FLAGS.config, *args],
      cwd=ROOT, stdout=subprocess.PIPE, stderr=log, text=True,
      env=dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8"))
  for line in proc.stdout:
    m = re.search(r"on ((?:tcp|http)://\S+)", line)
    if m:
      # Keep reading its stdout so a chatty process never blocks on a full pipe.
      threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
      return proc, m.group(1)
  log.seek(0)
  raise RuntimeError(f"{role} did not start: {log.read()[-3000:]}")


class Outcome:
  """One request as the client saw it."""

  def __init__(self, arrival: float, prompt: int):
    self.arrival, self.prompt = arrival, prompt
    self.tokens: list = []
    self.times: list = []
    self.kind = "hung"  # until it ends otherwise: "ok", "clear", "other", "hung"
    self.message = ""


def request(url: str, prompt: str, out: Outcome) -> None:
  import httpx

  body = {"model": "demo", "prompt": prompt, "max_tokens": FLAGS.max_tokens,
          "temperature": 0, "ignore_eos": True, "stream": True}
  try:
    with httpx.stream("POST", url + "/v1/completions", json=body,
                      timeout=httpx.Timeout(FLAGS.hang_s)) as r:
      if r.status_code != 200:
        r.read()
        out.kind, out.message = _error(r.text, r.status_code)
        return
      for line in r.iter_lines():
        if not line.startswith("data: ") or line == "data: [DONE]":
          continue
        chunk = json.loads(line[6:])
        if "error" in chunk:
          out.kind, out.message = "clear", chunk["error"]["message"]
          return
        ids = chunk["choices"][0]["token_ids"] if chunk.get("choices") else []
        if ids:
          out.tokens += ids
          out.times.append(time.monotonic())
    out.kind = "ok"
  except httpx.TimeoutException:
    out.kind = "hung"
  except Exception as e:  # noqa: BLE001 - counted as an unclear failure
    out.kind, out.message = "other", f"{type(e).__name__}: {e}"


def _error(text: str, status: int):
  try:
    return "clear", f"{status} " + json.loads(text)["error"]["message"]
  except (ValueError, KeyError, TypeError):
    return "other", f"{status} {text[:200]}"


def shorten(message: str) -> str:
  """A failure message without addresses and ids, to group alike ones."""
  message = re.sub(r"tcp://\S+", "<worker>", message)
  message = re.sub(r"\d+\.\d+ s", "<t> s", message)
  return re.sub(r"request \d+", "request <n>", message)[:150]


def main(_):
  absl_logging.set_verbosity(absl_logging.WARNING)  # no line per health poll or request
  import httpx
  import numpy as np

  import pdserve_jax as pdj

  faults = []
  for spec in FLAGS.faults:
    m = re.fullmatch(r"(prefill|decode)(\d+)@([\d.]+)\+([\d.]+)", spec)
    if not m:
      raise app.UsageError(f"--faults: {spec!r} is not name@at+down (e.g. decode0@20+5)")
    faults.append((m.group(1), int(m.group(2)), float(m.group(3)), float(m.group(4))))

  rng = np.random.default_rng(FLAGS.seed)
  prompts = [" ".join(rng.choice(WORDS, size=rng.integers(1, 7))) for _ in range(24)]
  demo = pdj.load_demo()
  want = [list(w) for w in pdj.greedy_reference(
      demo, [demo.tokenizer.encode(p) for p in prompts], FLAGS.max_tokens)]

  workers = {"prefill": [start("prefill") for _ in range(FLAGS.num_prefill)],
             "decode": [start("decode") for _ in range(FLAGS.num_decode)]}
  router, url = start("router", args=[
      "--prefill=" + ",".join(a for _, a in workers["prefill"]),
      "--decode=" + ",".join(a for _, a in workers["decode"])])
  health: list = []  # (time, {instance: state})
  stop = threading.Event()

  def watch():
    while not stop.is_set():
      try:
        health.append((time.monotonic(), httpx.get(url + "/health", timeout=5).json()
                       ["instances"]))
      except httpx.HTTPError:
        pass
      time.sleep(0.1)

  try:
    threading.Thread(target=watch, daemon=True).start()
    t0 = time.monotonic()
    marks: dict = {}  # (role, k) -> {"kill": t, "start": t, "ready": t}

    def fault(role, k, at, down):
      time.sleep(max(0.0, t0 + at - time.monotonic()))
      proc, address = workers[role][k]
      mark = marks[(role, k)] = {"kill": time.monotonic()}
      proc.send_signal(signal.SIGKILL)
      proc.wait()
      time.sleep(max(0.0, mark["kill"] + down - time.monotonic()))
      mark["start"] = time.monotonic()
      workers[role][k] = start(role, port=int(address.rsplit(":", 1)[1]))
      mark["ready"] = time.monotonic()  # it loaded the model and listens

    faulters = [threading.Thread(target=fault, args=f) for f in faults]
    for f in faulters:
      f.start()
    outcomes, threads = [], []
    arrival = 0.0
    while True:
      arrival += rng.exponential(1.0 / FLAGS.rate)
      if arrival > FLAGS.duration:
        break
      time.sleep(max(0.0, t0 + arrival - time.monotonic()))
      k = int(rng.integers(len(prompts)))
      out = Outcome(time.monotonic(), k)
      outcomes.append(out)
      threads.append(threading.Thread(target=request, args=(url, prompts[k], out)))
      threads[-1].start()
    for t in threads + faulters:
      t.join()
    # The last worker back: wait for its re-admission, to time it.
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and (not health or "lost" in health[-1][1].values()):
      time.sleep(0.2)
  finally:
    stop.set()
    for proc, _ in [(router, None)] + [w for ws in workers.values() for w in ws]:
      if proc.poll() is None:
        proc.kill()
      proc.wait()

  kinds = collections.Counter(o.kind for o in outcomes)
  right = sum(o.kind == "ok" and o.tokens == want[o.prompt] for o in outcomes)
  print(f"{FLAGS.num_prefill} prefill + {FLAGS.num_decode} decode workers, Poisson "
        f"{FLAGS.rate:g}/s for {FLAGS.duration:g} s, {FLAGS.max_tokens} tokens each, "
        f"faults {','.join(FLAGS.faults)}")
  print(f"requests sent            {len(outcomes)}")
  print(f"succeeded                {kinds['ok']} (single-process greedy tokens: {right})")
  print(f"failed, clear error      {kinds['clear']}")
  for msg, n in collections.Counter(shorten(o.message) for o in outcomes
                                    if o.kind == "clear").most_common(6):
    print(f"    {n:4d} x {msg}")
  print(f"failed, other            {kinds['other']}")
  for msg, n in collections.Counter(shorten(o.message) for o in outcomes
                                    if o.kind == "other").most_common(3):
    print(f"    {n:4d} x {msg}")
  print(f"hung (> {FLAGS.hang_s:g} s silent)   {kinds['hung']}")

  spans = []
  for (role, k), m in sorted(marks.items()):
    name = f"{role}{k}"
    seen = next((t for t, s in health if t >= m["kill"] and s.get(name) == "lost"), None)
    back = next((t for t, s in health if t >= m.get("start", float("inf"))
                 and s.get(name) == "ok"), None)
    print(f"{name}: killed at {m['kill'] - t0:.1f} s, seen lost after "
          + (f"{seen - m['kill']:.2f} s" if seen else "never")
          + f", restarted at {m['start'] - t0:.1f} s, re-admitted "
          + (f"{back - m['start']:.1f} s after its restart ({back - m['ready']:.1f} s "
             "after it listened)" if back else "never"))
    spans.append((m["kill"], back if back else float("inf")))

  def goodput(lo: float, hi: float) -> str:
    if hi <= lo:
      return "-"
    good = 0
    for o in outcomes:
      if not lo <= o.arrival < hi or o.kind != "ok" or not o.times:
        continue
      ttft = o.times[0] - o.arrival
      tpot = (o.times[-1] - o.times[0]) / max(len(o.tokens) - 1, 1)
      good += ttft <= FLAGS.ttft_slo and tpot <= FLAGS.tpot_slo
    return f"{good / (hi - lo):.2f}"

  end = t0 + FLAGS.duration
  first = min((a for a, _ in spans), default=end)
  last = max((b for _, b in spans), default=first)
  print(f"goodput, requests/s within TTFT <= {FLAGS.ttft_slo:g} s and TPOT <= "
        f"{FLAGS.tpot_slo:g} s (by arrival): before {goodput(t0, first)}, during "
        f"{goodput(first, min(last, end))}, after {goodput(last, end)}")
  if kinds["hung"] or right != kinds["ok"]:
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
