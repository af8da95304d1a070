"""absl app: a serving benchmark client for any OpenAI-compatible endpoint.

  python -m pdserve_jax.cli.bench --config=bench \
      --config.url=http://127.0.0.1:8000 --config.rates=2,4,8 --output_json=bench.json

Replays the workload block (`workloads.DEFAULTS`: Poisson or gamma arrivals at each
of `rates`, or a trace's recorded arrivals at rate 0) against `url`'s
`/v1/completions`, streaming: each request is a token-id prompt of its length (random
ids below `vocab_size`) asking for its output length with `ignore_eos` (honoured
by this server and vLLM's), so the workload's lengths hold. TTFT and TPOT come from
the arrival times of the streamed chunks. Writes the result file of every app
(executor "endpoint", one run per rate), so one workload can be read beside the
simulator's and the engine's runs; prints the table, the attainment per rate and
the goodput (the highest rate with attainment >= `target`).

Limits: a chunk is counted as one token (true of this server and of vLLM's
per-token streaming); times include the client's own HTTP overhead.
"""

import asyncio
import json
import time

import numpy as np

from pdserve_jax import results, workloads
from pdserve_jax.cli import common, figures
from pdserve_jax.core.prefix import block_tokens

RULES = {**common.RULES, "target": common.fraction, "vocab_size": common.at_least(2),
         "timeout": common.positive, "concurrency": common.at_least(1)}


class Endpoint:
  """What the result file's run records say of a deployment it cannot see."""

  def __init__(self, url: str, num_devices: int):
    self.url, self.num_devices = url, num_devices

  def describe(self) -> str:
    return f"endpoint {self.url}"


async def _one(client, cfg, req, prompt, start, sem):
  """Sends one request at its arrival time; fills its token times (seconds on the
  benchmark's clock) and how it ended."""
  await asyncio.sleep(max(0.0, start + req.arrival_time - time.perf_counter()))
  req.arrival_time = time.perf_counter() - start
  body = {"prompt": prompt, "max_tokens": req.max_tokens, "temperature": 0.0, "stream": True,
          "ignore_eos": True}
  if cfg.model_name:
    body["model"] = cfg.model_name
  async with sem:
    try:
      async with client.stream("POST", cfg.url.rstrip("/") + "/v1/completions", json=body,
                               timeout=cfg.timeout) as r:
        if r.status_code != 200:
          req.end_reason = "error"
          req.payload = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
        else:
          async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
              continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
              req.end_reason, req.payload = "error", chunk["error"].get("message")
              continue
            choice = (chunk.get("choices") or [None])[0]
            if choice is None:
              continue
            if choice.get("text") or choice.get("token_ids"):
              req.token_times.append(time.perf_counter() - start)
              req.num_output += 1
            if choice.get("finish_reason"):
              req.stopped = choice["finish_reason"] == "stop"
    except Exception as e:  # noqa: BLE001 - a failed request is a result, not a crash
      req.end_reason, req.payload = "error", repr(e)
  req.finish_time = time.perf_counter() - start


async def _run(cfg, requests, prompts):
  import httpx

  sem = asyncio.Semaphore(cfg.concurrency)
  limits = httpx.Limits(max_connections=cfg.concurrency)
  async with httpx.AsyncClient(limits=limits, timeout=cfg.timeout) as client:
    start = time.perf_counter()
    await asyncio.gather(*[_one(client, cfg, r, p, start, sem)
                           for r, p in zip(requests, prompts)])


def main(cfg, out: common.Outputs):
  start = time.perf_counter()
  common.check(cfg, RULES)
  if not cfg.url.startswith(("http://", "https://")):
    raise common.ConfigError(f"url: expected http(s)://host:port, got {cfg.url!r}")
  rates = sorted(set(common.numbers("rates", cfg.rates, low=0.0, strict=False)))
  make = workloads.from_config(cfg.workload, cfg.max_total_tokens)
  endpoint = Endpoint(cfg.url, cfg.num_devices)
  runs = []
  for rate in rates:
    reqs = [r.fresh() for r in make(rate)]
    rng = np.random.default_rng([cfg.workload.seed, 3])
    # Requests with prefix structure (a Mooncake trace, shared-prefix workloads) get
    # prompts made from their blocks, so shared blocks are shared tokens.
    prompts = [rng.integers(0, cfg.vocab_size, r.prompt_len).tolist() if r.blocks is None
               else block_tokens(r.blocks, r.prompt_len, cfg.vocab_size, cfg.workload.seed)
               for r in reqs]
    asyncio.run(_run(cfg, reqs, prompts))
    failed = [r for r in reqs if r.end_reason == "error"]
    for r in failed[:3]:
      print(f"request {r.request_id} failed: {r.payload}")
    runs.append(results.run_record(cfg.mode or "unknown", "endpoint", endpoint, rate or None,
                                   reqs, cfg.ttft_slo, cfg.tpot_slo, label=cfg.url,
                                   failed_requests=len(failed)))
  print(common.table(runs))
  good = [r["rate_rps"] for r in runs if r["rate_rps"] is not None
          and r["summary"]["attainment"] >= cfg.target]
  print(f"goodput (highest rate with attainment >= {cfg.target:.0%}): "
        + (f"{max(good):g} req/s" if good else "none of the rates"))
  plots = (figures.write(out.plots_dir, runs, cfg.ttft_slo, cfg.tpot_slo, cfg.url, cfg.target)
           if out.plots_dir else [])
  common.save("bench", cfg, out, runs, plots, start)


if __name__ == "__main__":
  common.run(main, "bench")
