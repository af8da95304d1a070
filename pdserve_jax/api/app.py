"""An OpenAI-compatible HTTP front end over one `Engine`, on Starlette (ASGI).

Routes: `POST /v1/completions` (a text or token-id prompt; `max_tokens`,
`temperature`, `top_p`, `top_k` and `stop_token_ids` / `ignore_eos` (extensions),
`seed`, `stop`, `n`, `logprobs`, `stream` by server-sent events, usage counts),
`GET /v1/models`, `GET /health` and `GET /metrics` (Prometheus text format: requests
by outcome, queue and pool gauges, TTFT and TPOT histograms).

Every choice also carries `token_ids` (an extension): a model without a tokenizer
answers with ids and empty text. Streamed text comes from the engine's output
processor (`serving.output`): decoded incrementally and held back while it could
still be the start of a stop string, or end inside a multi-byte character, so no
streamed text is ever taken back and the chunks add up to the final text.

Bad input gets a 4xx and a JSON error naming the field, and costs nothing else:
the body is checked before anything is queued, and the engine's own checks
(`Engine.submit`) raise before it queues. Limits: completions only (no chat
template), one prompt per request, no authentication; the CLI binds loopback by
default (`pdserve_jax.cli.api`).
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, List, Optional

from pdserve_jax.serving.engine import Engine, EngineOverloaded
from pdserve_jax.core.sampling import SamplingParams
from pdserve_jax.core import sampling as validate

log = logging.getLogger(__name__)

# OpenAI's defaults where the request leaves a field out.
DEFAULTS = dict(max_tokens=16, temperature=1.0, top_p=1.0, top_k=0, n=1, stream=False)
FIELDS = ("model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop",
          "stop_token_ids", "ignore_eos", "n", "logprobs", "stream", "stream_options", "user")
UNSUPPORTED = ("echo", "best_of", "suffix", "presence_penalty", "frequency_penalty",
               "logit_bias")
# Seconds; the upper bounds of the TTFT and TPOT histograms' buckets.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class BadRequest(ValueError):
  """A request the API refuses: HTTP `status`, the field it names (`param`)."""

  def __init__(self, message: str, param: Optional[str] = None, status: int = 400,
               kind: str = "invalid_request_error"):
    super().__init__(message)
    self.param, self.status, self.kind = param, status, kind


# --- the request body --------------------------------------------------------------------


def _int(body: dict, key: str) -> Optional[int]:
  v = body.get(key)
  if v is None:
    return None
  if not validate.is_int(v):
    raise BadRequest(f"{key}: expected an integer, got {json.dumps(v)}", key)
  return int(v)


def _float(body: dict, key: str) -> Optional[float]:
  v = body.get(key)
  if v is None:
    return None
  if not validate.is_real(v):  # NaN and inf pass here; the engine's checks refuse them
    raise BadRequest(f"{key}: expected a number, got {json.dumps(v)}", key)
  return float(v)


def parse_completion(body: Any, model_name: str) -> tuple[Any, SamplingParams, bool, bool]:
  """(prompt, params, stream, include_usage) from a /v1/completions body; raises
  BadRequest naming the first bad field. Range checks are the engine's
  (`validate`), whose messages name the field too."""
  if not isinstance(body, dict):
    raise BadRequest("the body must be a JSON object")
  for key in body:
    if key in UNSUPPORTED:
      raise BadRequest(f"{key}: not supported by this server", key)
    if key not in FIELDS:
      raise BadRequest(f"{key}: unknown field; known: {', '.join(FIELDS)}", key)
  model = body.get("model")
  if model is not None and model != model_name:
    raise BadRequest(f"model: {model!r} is not served here; this server serves "
                     f"{model_name!r}", "model", 404, "model_not_found")
  if "prompt" not in body:
    raise BadRequest("prompt: required", "prompt")
  prompt = body["prompt"]
  if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
    if len(prompt) != 1:
      raise BadRequest(f"prompt: one prompt per request, got {len(prompt)}", "prompt")
    prompt = prompt[0]
  if not isinstance(prompt, (str, list)):
    raise BadRequest(f"prompt: expected a string or a list of token ids, got "
                     f"{type(prompt).__name__}", "prompt")
  if isinstance(prompt, list) and not all(validate.is_int(t) for t in prompt):
    raise BadRequest("prompt: a token-id prompt must hold integers only", "prompt")
  stream = body.get("stream", DEFAULTS["stream"])
  if not isinstance(stream, bool):
    raise BadRequest(f"stream: expected true or false, got {json.dumps(stream)}", "stream")
  opts = body.get("stream_options") or {}
  if not isinstance(opts, dict) or set(opts) - {"include_usage"}:
    raise BadRequest("stream_options: only {\"include_usage\": bool} is supported",
                     "stream_options")
  ignore_eos = body.get("ignore_eos", False)
  if not isinstance(ignore_eos, bool):
    raise BadRequest(f"ignore_eos: expected true or false, got {json.dumps(ignore_eos)}",
                     "ignore_eos")
  stop = body.get("stop")
  if stop is None:
    stop = ()
  elif isinstance(stop, str):
    stop = (stop,)
  elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
    stop = tuple(stop)
  else:
    raise BadRequest("stop: expected a string or a list of strings", "stop")
  stop_ids = body.get("stop_token_ids") or []
  if not isinstance(stop_ids, list) or not all(validate.is_int(t) for t in stop_ids):
    raise BadRequest("stop_token_ids: expected a list of integers", "stop_token_ids")
  pick = lambda v, key: DEFAULTS[key] if v is None else v
  params = SamplingParams(
      max_tokens=pick(_int(body, "max_tokens"), "max_tokens"),
      temperature=pick(_float(body, "temperature"), "temperature"),
      top_k=pick(_int(body, "top_k"), "top_k"), top_p=pick(_float(body, "top_p"), "top_p"),
      seed=_int(body, "seed"), stop_token_ids=tuple(stop_ids), stop=stop,
      ignore_eos=ignore_eos, n=pick(_int(body, "n"), "n"), logprobs=_int(body, "logprobs"))
  if stream and params.n != 1:
    raise BadRequest("n: streaming serves one completion per request (n=1)", "n")
  return prompt, params, stream, bool(opts.get("include_usage", False))


# --- metrics -----------------------------------------------------------------------------


class Histogram:
  """Cumulative buckets, Prometheus style."""

  def __init__(self, buckets=BUCKETS):
    self.buckets = tuple(buckets)
    self.counts = [0] * (len(self.buckets) + 1)
    self.sum = 0.0

  def observe(self, v: float) -> None:
    self.sum += v
    for i, b in enumerate(self.buckets):
      if v <= b:
        self.counts[i] += 1
        return
    self.counts[-1] += 1

  def lines(self, name: str) -> List[str]:
    out, acc = [], 0
    for b, c in zip(self.buckets, self.counts):
      acc += c
      out.append(f'{name}_bucket{{le="{b}"}} {acc}')
    acc += self.counts[-1]
    out += [f'{name}_bucket{{le="+Inf"}} {acc}', f"{name}_sum {self.sum}",
            f"{name}_count {acc}"]
    return out


class Metrics:
  def __init__(self):
    self.responses = {}  # outcome -> count
    self.ttft, self.tpot = Histogram(), Histogram()

  def count(self, outcome: str) -> None:
    self.responses[outcome] = self.responses.get(outcome, 0) + 1

  def observe(self, result) -> None:
    for c in result.outputs:
      self.count(c.finish_reason)
    if result.ttft is not None:
      self.ttft.observe(result.ttft)
    if len(result.outputs) == 1 and result.tpot is not None:
      self.tpot.observe(result.tpot)

  def text(self, engine: Engine) -> str:
    stats = engine.stats()
    lines = ["# HELP pdserve_responses_total Completions by how they ended, and refused "
             "requests by HTTP status.", "# TYPE pdserve_responses_total counter"]
    lines += [f'pdserve_responses_total{{outcome="{k}"}} {v}'
              for k, v in sorted(self.responses.items())]
    gauges = {"pdserve_unfinished_requests": ("Requests queued or running.",
                                              stats["unfinished"]),
              "pdserve_kv_pages_in_use": ("KV pages held, all pools.", stats["pages_in_use"]),
              "pdserve_kv_pages_total": ("KV pages, all pools.",
                                         sum(a.capacity for a in engine.allocators()))}
    for name, (help_, v) in gauges.items():
      lines += [f"# HELP {name} {help_}", f"# TYPE {name} gauge", f"{name} {v}"]
    lines += ["# HELP pdserve_preemptions_total Requests preempted for KV pages.",
              "# TYPE pdserve_preemptions_total counter",
              f"pdserve_preemptions_total {stats['preemptions']}"]
    for name, hist, what in (("pdserve_ttft_seconds", self.ttft, "Time to first token."),
                             ("pdserve_tpot_seconds", self.tpot, "Time per output token.")):
      lines += [f"# HELP {name} {what}", f"# TYPE {name} histogram"] + hist.lines(name)
    return "\n".join(lines) + "\n"


# --- the app -----------------------------------------------------------------------------


def _error(e: BadRequest):
  from starlette.responses import JSONResponse

  return JSONResponse({"error": {"message": str(e), "type": e.kind, "param": e.param,
                                 "code": e.status}}, status_code=e.status)


def _logprobs(engine: Engine, ids, logprobs, tops) -> dict:
  """OpenAI's completions `logprobs` object of tokens `ids`."""
  piece = (lambda t: engine.tokenizer.decode([t])) if engine.tokenizer else str
  return {"tokens": [piece(t) for t in ids], "token_logprobs": list(logprobs),
          "top_logprobs": [{piece(t): v for t, v in d.items()} for d in tops]
          if tops else None}


def _choice(c, index: int, engine: Engine) -> dict:
  out = {"index": index, "text": c.text or "", "finish_reason": c.finish_reason,
         "logprobs": None, "token_ids": list(c.token_ids)}
  if c.logprobs is not None:
    out["logprobs"] = _logprobs(engine, c.token_ids, c.logprobs, c.top_logprobs)
  return out


def create_app(engine: Engine, model_name: str):
  """The Starlette app serving `engine` as `model_name`."""
  import anyio
  from starlette.applications import Starlette
  from starlette.concurrency import iterate_in_threadpool
  from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
  from starlette.routing import Route

  metrics = Metrics()
  started = int(time.time())

  async def completions(request):
    try:
      try:
        body = json.loads(await request.body())
      except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadRequest(f"the body is not valid JSON: {e}") from None
      prompt, params, stream, usage = parse_completion(body, model_name)
      try:
        handle = engine.submit(prompt, params)
      except EngineOverloaded as e:
        raise BadRequest(str(e), None, 429, "overloaded") from None
      except (ValueError, TypeError) as e:
        raise BadRequest(str(e), str(e).split(":")[0].split(" ")[0]) from None
      except RuntimeError as e:
        raise BadRequest(str(e), None, 503, "unavailable") from None
    except BadRequest as e:
      metrics.count(f"http_{e.status}")
      return _error(e)
    rid = f"cmpl-{handle.request_id}"
    head = {"id": rid, "object": "text_completion", "created": int(time.time()),
            "model": model_name}
    prompt_tokens = len(handle.prompt)
    if not stream:
      try:
        result = await anyio.to_thread.run_sync(handle.result)
      except Exception as e:  # noqa: BLE001 - the request failed in the engine
        metrics.count("error")
        return JSONResponse({"error": {"message": f"request failed: {e}", "type":
                                       "server_error", "param": None, "code": 500}}, 500)
      finally:
        if not handle.done:  # the client went away
          handle.cancel()
      metrics.observe(result)
      done = sum(len(c.token_ids) for c in result.outputs)
      return JSONResponse(dict(head, choices=[_choice(c, i, engine)
                                              for i, c in enumerate(result.outputs)],
                               usage={"prompt_tokens": prompt_tokens,
                                      "completion_tokens": done,
                                      "total_tokens": prompt_tokens + done}))

    def event(choice: Optional[dict], **extra) -> str:
      choices = [] if choice is None else [choice]  # the usage chunk has no choice
      return "data: " + json.dumps(dict(head, choices=choices, **extra)) + "\n\n"

    async def events():
      ok = False
      try:
        async for d in iterate_in_threadpool(handle.deltas()):
          ids = [] if d.token is None else [d.token]
          lp = None
          if d.logprob is not None:
            lp = _logprobs(engine, ids, [d.logprob], [d.top_logprobs] if d.top_logprobs
                           else None)
          yield event({"index": 0, "text": d.text, "finish_reason": None, "logprobs": lp,
                       "token_ids": ids})
        result = await anyio.to_thread.run_sync(handle.result)
        metrics.observe(result)
        c = result.outputs[0]
        yield event({"index": 0, "text": "", "finish_reason": c.finish_reason,
                     "logprobs": None, "token_ids": []})
        if usage:
          n = len(c.token_ids)
          yield event(None, usage={"prompt_tokens": prompt_tokens, "completion_tokens": n,
                                   "total_tokens": prompt_tokens + n})
        ok = True
      except Exception as e:  # noqa: BLE001 - the request failed: say so in the stream
        metrics.count("error")
        yield "data: " + json.dumps({"error": {"message": f"request failed: {e}",
                                               "type": "server_error"}}) + "\n\n"
      finally:
        if not ok:
          handle.cancel()  # a client that went away frees its pages
      yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")

  async def models(request):
    return JSONResponse({"object": "list", "data": [{"id": model_name, "object": "model",
                                                     "created": started,
                                                     "owned_by": "pdserve_jax"}]})

  async def health(request):
    try:
      stats = engine.stats()
    except Exception as e:  # noqa: BLE001
      return JSONResponse({"status": "error", "error": repr(e)}, 503)
    failed = engine.failure is not None
    instances = engine.health()
    lost = sorted(n for n, state in instances.items() if state == "lost")
    body = {"status": "error" if failed else "degraded" if lost else "ok",
            "model": model_name, "deployment": engine.deployment.describe(),
            "instances": instances, "lost_instances": lost, **stats}
    if failed:
      body["error"] = repr(engine.failure)
    return JSONResponse(body, 503 if failed else 200)

  async def prometheus(request):
    return PlainTextResponse(metrics.text(engine), media_type="text/plain; version=0.0.4")

  async def not_found(request, exc):
    return _error(BadRequest(f"no route {request.method} {request.url.path}", None,
                             exc.status_code, "not_found"))

  return Starlette(routes=[
      Route("/v1/completions", completions, methods=["POST"]),
      Route("/v1/models", models, methods=["GET"]),
      Route("/health", health, methods=["GET"]),
      Route("/metrics", prometheus, methods=["GET"]),
  ], exception_handlers={404: not_found, 405: not_found})
