"""An OpenAI-compatible HTTP front end over one `Engine`, on Starlette (ASGI).

Routes: `POST /v1/completions` (a text or token-id prompt; `max_tokens`,
`temperature`, `top_p`, `top_k` and `stop_token_ids` / `ignore_eos` (extensions),
`seed`, `stop`, `n`, `logprobs`, `echo` (with the prompt's logprobs, and
`max_tokens=0` to score a text, as lm-eval's loglikelihood does), `stream` by
server-sent events with logprobs in each chunk, `stream_options` incl.
`continuous_usage_stats`, usage counts); `POST /v1/chat/completions` (the messages
rendered by the model's chat template, `api.chat`; the same sampling fields,
`logprobs` / `top_logprobs`, streaming); vLLM's `POST /tokenize` and
`POST /detokenize`; `GET /v1/models`, `GET /health` and `GET /metrics` (`api.metrics`).

Every choice also carries `token_ids` (an extension): a model without a tokenizer
answers with ids and empty text. Streamed text comes from the engine's output
processor (`serving.output`): never taken back, and the chunks add up to the final
text.

Failures are JSON in OpenAI's error schema (`api.protocol.ApiError`), a 500
included: 400 naming the bad field, 404 for an unknown model or route, 408 for a body
that did not arrive in time, 413 for one over the size limit (before reading it),
429 with Retry-After when `max_queued` requests are unfinished, 503 with Retry-After
when no instance can serve (closed, failed, or every instance of a role lost). The
event loop only moves bytes: reading the body has a deadline, and JSON parsing,
template rendering, tokenising and waiting on the engine run in threads. A client
that disconnects aborts its request, streamed or not, with one log line. `/health`
is 503 when a request could not be served, 200 otherwise ("degraded" names lost
instances; `instance_pages` counts the KV pages each instance's requests hold).
Served model name: see `served_names` and `cli.api`.

Limits: one prompt per request, no tools or images, no authentication; the CLI
binds loopback by default (`pdserve_jax.cli.api`).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import logging
import os
import time
from typing import Any, Callable, List, Optional, Sequence

from pdserve_jax.api import chat, protocol
from pdserve_jax.api.metrics import Metrics
from pdserve_jax.api.protocol import ApiError, Call
from pdserve_jax.api.transport import (ClientGone, CountStatuses, EventStream,
                                       error_headers, read_body, until_disconnect)
from pdserve_jax.serving.engine import Engine, EngineOverloaded, EngineUnavailable

# Kept for callers of the first version of this module.
BadRequest = ApiError
parse_completion = protocol.parse_completion

log = logging.getLogger("pdserve_jax.api")


@dataclasses.dataclass(frozen=True)
class ApiConfig:
  """The HTTP layer's limits."""
  max_body_bytes: int = 4 << 20  # a 128k-token prompt as ids is ~1 MiB of JSON
  body_timeout_s: float = 30.0  # for the whole body to arrive
  retry_after_s: float = 1.0  # told to clients refused with 429
  unavailable_retry_after_s: float = 5.0  # told to clients refused with 503
  settle_timeout_s: float = 60.0  # how long an abandoned request is awaited for metrics


def served_names(model_name: str, aliases: Sequence[str] = ()) -> List[str]:
  """The name `/v1/models` reports first, then the other names requests may use."""
  return list(dict.fromkeys([model_name, *aliases]))


def _pieces(engine: Engine) -> Callable[[int], str]:
  return (lambda t: engine.tokenizer.decode([t])) if engine.tokenizer else str


def _completion_logprobs(piece, ids, lps, tops) -> dict:
  """OpenAI's completions `logprobs` object; `lps` / `tops` may hold None (the
  prompt's first token)."""
  return {"tokens": [piece(t) for t in ids], "token_logprobs": list(lps),
          "top_logprobs": None if tops is None else [
              None if d is None else {piece(t): v for t, v in d.items()} for d in tops]}


def _chat_logprobs(piece, ids, lps, tops) -> dict:
  """OpenAI's chat `logprobs` object."""
  def entry(t, lp):
    s = piece(t)
    return {"token": s, "logprob": lp, "bytes": list(s.encode())}

  return {"content": [dict(entry(t, lp), top_logprobs=[entry(i, v) for i, v in
                                                       (tops[k] if tops else {}).items()])
                      for k, (t, lp) in enumerate(zip(ids, lps))]}


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
  return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
          "total_tokens": prompt_tokens + completion_tokens}


def create_app(engine: Engine, model_name: str, config: ApiConfig = ApiConfig(),
               aliases: Sequence[str] = (), root: Optional[str] = None):
  """The ASGI app serving `engine` as `model_name` (requests may also name one of
  `aliases`); `root` is the model's folder, reported by `/v1/models`."""
  import anyio
  from starlette.applications import Starlette
  from starlette.responses import JSONResponse, PlainTextResponse, Response
  from starlette.routing import Route

  metrics = Metrics()
  names = served_names(model_name, aliases)
  started = int(time.time())
  piece = _pieces(engine)
  ids = itertools.count()
  # Threads that wait on the engine (a result, a stream's next token): one per
  # request in flight, beyond anyio's default of 40, so waiting never starves.
  waiters = anyio.CapacityLimiter(2 * engine.config.max_queued + 64)

  async def off_loop(fn, *args, wait: bool = False):
    return await anyio.to_thread.run_sync(functools.partial(fn, *args),
                                          abandon_on_cancel=wait,
                                          limiter=waiters if wait else None)

  async def body_of(request) -> Any:
    raw = await read_body(request, config.max_body_bytes, config.body_timeout_s)
    return await off_loop(protocol.parse_json, raw)

  def unavailable(reason: str) -> ApiError:
    return ApiError(reason, None, 503, "service_unavailable",
                    config.unavailable_retry_after_s)

  async def submit(prompt, params):
    reason = engine.unavailable()
    if reason is not None:
      raise unavailable(reason)
    try:
      return await off_loop(engine.submit, prompt, params)
    except EngineOverloaded as e:
      raise ApiError(str(e), None, 429, "rate_limit_error", config.retry_after_s) from None
    except EngineUnavailable as e:
      raise unavailable(str(e)) from None
    except (ValueError, TypeError) as e:
      raise ApiError(str(e), str(e).split(":")[0].split(" ")[0]) from None
    except RuntimeError as e:  # closed or failed meanwhile
      raise unavailable(str(e)) from None

  def failed(e: BaseException) -> ApiError:
    if isinstance(e, EngineUnavailable):
      return unavailable(str(e))
    return ApiError(f"request failed: {e}", None, 500, "server_error")

  async def settle(handle) -> None:
    """Counts `handle`'s outcome once the engine ended it (after a cancel, soon)."""
    with anyio.CancelScope(shield=True):
      if await off_loop(handle.wait, config.settle_timeout_s, wait=True):
        metrics.ended(handle)

  def gone(request, handle) -> None:
    metrics.disconnect()
    log.info("client gone: %s %s, request %d aborted", request.method, request.url.path,
             handle.request_id)
    handle.cancel()

  async def result_or_gone(request, handle):
    """The handle's result, or None when the client left first (then aborted)."""
    out: dict = {}

    async def run():
      try:
        out["result"] = await off_loop(handle.result, wait=True)
      except Exception as e:  # noqa: BLE001 - the request failed in the engine
        out["error"] = e
      tg.cancel_scope.cancel()

    async def watch():
      await until_disconnect(request.receive)
      out["gone"] = True
      tg.cancel_scope.cancel()

    async with anyio.create_task_group() as tg:
      tg.start_soon(run)
      tg.start_soon(watch)
    if "result" not in out and "error" not in out:
      gone(request, handle)
      await settle(handle)
      return None
    metrics.ended(handle)
    if "error" in out:
      raise failed(out["error"])
    return out["result"]

  async def deltas(handle):
    it, end = handle.deltas(), object()
    while (d := await off_loop(next, it, end, wait=True)) is not end:
      yield d

  def stream(request, handle, chunks):
    """An `EventStream` of `chunks` (an async generator of dicts) for `handle`."""
    async def events():
      ok = False
      try:
        async for chunk in chunks:
          yield "data: " + json.dumps(chunk) + "\n\n"
        ok = True
      except Exception as e:  # noqa: BLE001 - the request failed: say so in the stream
        yield "data: " + json.dumps(failed(e).body()) + "\n\n"
      finally:
        if not ok:
          handle.cancel()  # a client that went away frees its pages
        await settle(handle)
      yield "data: [DONE]\n\n"

    return EventStream(events(), lambda: gone(request, handle))

  def head(kind: str, rid: str) -> dict:
    return {"id": rid, "object": kind, "created": int(time.time()), "model": model_name}

  # --- /v1/completions -------------------------------------------------------------------

  async def prompt_logprobs(prompt, k: Optional[int]):
    """(ids, logprobs with None first, tops or None) of a prompt, for echo."""
    try:
      ids_, plp = await off_loop(engine.prompt_logprobs, prompt)
    except (ValueError, TypeError) as e:
      raise ApiError(str(e), "prompt") from None
    except RuntimeError as e:
      raise unavailable(str(e)) from None
    lps = [None] + [float(v) for v in plp.logprobs]
    tops = None
    if k:
      tops = [None] + [{int(i): float(v) for i, v in zip(ti[:k], tv[:k])}
                       for ti, tv in zip(plp.top_ids, plp.top_logprobs)]
    return ids_, lps, tops

  def echo_prefix(prompt, prompt_ids: List[int]) -> str:
    if isinstance(prompt, str):
      return prompt
    return engine.tokenizer.decode(prompt_ids) if engine.tokenizer else ""

  async def completions(request):
    call: Call = await off_loop(protocol.parse_completion, await body_of(request), names)
    params, k = call.params, call.params.logprobs
    echo_lp = None
    if call.echo and k is not None:
      echo_lp = await prompt_logprobs(call.prompt, k)
    if call.echo and params.max_tokens == 0:  # score the prompt, generate nothing
      if echo_lp is None:
        try:
          prompt_ids = await off_loop(engine.prompt_ids, call.prompt)
        except (ValueError, TypeError) as e:
          raise ApiError(str(e), "prompt") from None
      else:
        prompt_ids = echo_lp[0]
      choice = {"index": 0, "text": await off_loop(echo_prefix, call.prompt, prompt_ids),
                "finish_reason": "length", "token_ids": prompt_ids,
                "logprobs": None if echo_lp is None else _completion_logprobs(piece, *echo_lp)}
      return JSONResponse(dict(head("text_completion", f"cmpl-echo-{next(ids)}"),
                               choices=[dict(choice, index=i) for i in range(params.n)],
                               usage=_usage(len(prompt_ids), 0)))
    handle = await submit(call.prompt, params)
    prompt_tokens = len(handle.prompt)
    top = head("text_completion", f"cmpl-{handle.request_id}")
    if not call.stream:
      result = await result_or_gone(request, handle)
      if result is None:
        return Response(status_code=499)  # nginx's "client closed request"
      prefix = await off_loop(echo_prefix, call.prompt, handle.prompt) if call.echo else ""
      choices = []
      for i, c in enumerate(result.outputs):
        lp = None
        if c.logprobs is not None:
          ids_, lps, tops = list(c.token_ids), list(c.logprobs), c.top_logprobs
          if echo_lp is not None:
            ids_, lps = echo_lp[0] + ids_, echo_lp[1] + lps
            tops = None if tops is None else echo_lp[2] + list(tops)
          lp = _completion_logprobs(piece, ids_, lps, tops)
        choices.append({"index": i, "text": prefix + (c.text or ""),
                        "finish_reason": c.finish_reason, "logprobs": lp,
                        "token_ids": list(c.token_ids)})
      done = sum(len(c.token_ids) for c in result.outputs)
      return JSONResponse(dict(top, choices=choices, usage=_usage(prompt_tokens, done)))

    async def chunks():
      n = 0
      async for d in deltas(handle):
        ids_ = [] if d.token is None else [d.token]
        n += len(ids_)
        lp = None
        if d.logprob is not None:
          lp = _completion_logprobs(piece, ids_, [d.logprob],
                                    [d.top_logprobs] if d.top_logprobs else None)
        chunk = dict(top, choices=[{"index": 0, "text": d.text, "finish_reason": None,
                                    "logprobs": lp, "token_ids": ids_}])
        if call.continuous_usage:
          chunk["usage"] = _usage(prompt_tokens, n)
        yield chunk
      result = await off_loop(handle.result, wait=True)
      last = dict(top, choices=[{"index": 0, "text": "", "logprobs": None, "token_ids": [],
                                 "finish_reason": result.outputs[0].finish_reason}])
      if call.continuous_usage:
        last["usage"] = _usage(prompt_tokens, n)
      yield last
      if call.include_usage:
        yield dict(top, choices=[], usage=_usage(prompt_tokens, n))

    return stream(request, handle, chunks())

  # --- /v1/chat/completions --------------------------------------------------------------

  async def chat_completions(request):
    call: Call = await off_loop(protocol.parse_chat, await body_of(request), names)
    if engine.tokenizer is None:
      raise ApiError("messages: this model has no tokenizer; use /v1/completions with "
                     "token ids", "messages")
    prompt_ids = await off_loop(chat.prompt_ids, engine.tokenizer, call.messages,
                                call.add_generation_prompt)
    params = call.params
    if not call.max_tokens_given:  # OpenAI's default: up to the end of the context
      room = engine.config.max_seq_len - len(prompt_ids)
      if room < 1:
        raise ApiError(f"messages: the rendered prompt ({len(prompt_ids)} tokens) leaves "
                       f"no room in max_seq_len={engine.config.max_seq_len}", "messages")
      params = dataclasses.replace(params, max_tokens=room)
    handle = await submit(prompt_ids, params)
    prompt_tokens = len(prompt_ids)
    top = head("chat.completion", f"chatcmpl-{handle.request_id}")
    if not call.stream:
      result = await result_or_gone(request, handle)
      if result is None:
        return Response(status_code=499)
      choices = []
      for i, c in enumerate(result.outputs):
        lp = None
        if c.logprobs is not None:
          lp = _chat_logprobs(piece, c.token_ids, c.logprobs, c.top_logprobs)
        choices.append({"index": i, "message": {"role": "assistant", "content": c.text or ""},
                        "logprobs": lp, "finish_reason": c.finish_reason,
                        "token_ids": list(c.token_ids)})
      done = sum(len(c.token_ids) for c in result.outputs)
      return JSONResponse(dict(top, choices=choices, usage=_usage(prompt_tokens, done)))
    top["object"] = "chat.completion.chunk"

    async def chunks():
      n = 0

      def chunk(delta, finish=None, lp=None, ids_=()):
        out = dict(top, choices=[{"index": 0, "delta": delta, "logprobs": lp,
                                  "finish_reason": finish, "token_ids": list(ids_)}])
        if call.continuous_usage:
          out["usage"] = _usage(prompt_tokens, n)
        return out

      yield chunk({"role": "assistant", "content": ""})
      async for d in deltas(handle):
        ids_ = [] if d.token is None else [d.token]
        n += len(ids_)
        lp = None
        if d.logprob is not None:
          lp = _chat_logprobs(piece, ids_, [d.logprob], [d.top_logprobs or {}])
        yield chunk({"content": d.text}, None, lp, ids_)
      result = await off_loop(handle.result, wait=True)
      yield chunk({}, result.outputs[0].finish_reason)
      if call.include_usage:
        yield dict(top, choices=[], usage=_usage(prompt_tokens, n))

    return stream(request, handle, chunks())

  # --- vLLM's tokenizer routes -----------------------------------------------------------

  def tokenizer():
    if engine.tokenizer is None:
      raise ApiError("this model has no tokenizer", None)
    return engine.tokenizer

  async def tokenize(request):
    args = await off_loop(protocol.parse_tokenize, await body_of(request), names)
    tok = tokenizer()
    if "prompt" in args:
      out = await off_loop(tok.encode, args["prompt"], args["add_special_tokens"])
    else:
      out = await off_loop(chat.prompt_ids, tok, args["messages"],
                           args["add_generation_prompt"], args["add_special_tokens"])
    body = {"count": len(out), "max_model_len": engine.config.max_seq_len, "tokens": out}
    if args["return_token_strs"]:
      body["token_strs"] = [piece(t) for t in out]
    return JSONResponse(body)

  async def detokenize(request):
    tokens = await off_loop(protocol.parse_detokenize, await body_of(request), names)
    tok = tokenizer()
    vocab = engine.model.config.vocab_size
    bad = [t for t in tokens if not 0 <= t < vocab]
    if bad:
      raise ApiError(f"tokens: ids outside the vocabulary [0, {vocab}): {bad[:5]}", "tokens")
    return JSONResponse({"prompt": await off_loop(tok.decode, tokens)})

  # --- the rest --------------------------------------------------------------------------

  async def models(request):
    card = {"id": model_name, "object": "model", "created": started,
            "owned_by": "pdserve_jax", "max_model_len": engine.config.max_seq_len}
    if root is not None:
      card["root"] = root
    return JSONResponse({"object": "list", "data": [card]})

  async def health(request):
    try:
      stats = engine.stats()
    except Exception as e:  # noqa: BLE001
      return JSONResponse({"status": "error", "error": repr(e)}, 503)
    reason = engine.unavailable()
    instances = engine.health()
    lost = sorted(n for n, state in instances.items() if state == "lost")
    status = "unavailable" if reason else "degraded" if lost else "ok"
    body = {"status": status, "model": model_name, "deployment": engine.deployment.describe(),
            "instances": instances, "lost_instances": lost,
            "instance_pages": engine.pages_held(), **stats}
    if reason:
      body["error"] = reason
    return JSONResponse(body, 503 if reason else 200)

  async def prometheus(request):
    return PlainTextResponse(metrics.text(engine), media_type="text/plain; version=0.0.4")

  async def api_error(request, e: ApiError):
    return JSONResponse(e.body(), e.status, headers=error_headers(e))

  async def client_gone(request, e: ClientGone):
    metrics.disconnect()
    log.info("client gone: %s %s while sending its body", request.method, request.url.path)
    return Response(status_code=499)

  async def http_error(request, exc):
    what = (f"no route {request.method} {request.url.path}" if exc.status_code in (404, 405)
            else str(getattr(exc, "detail", exc)))
    return JSONResponse(ApiError(what, None, exc.status_code, "invalid_request_error").body(),
                        exc.status_code)

  async def server_error(request, exc):
    return JSONResponse(ApiError(f"internal error: {type(exc).__name__}: {exc}", None, 500,
                                 "server_error").body(), 500)

  from starlette.exceptions import HTTPException

  app = Starlette(routes=[
      Route("/v1/completions", completions, methods=["POST"]),
      Route("/v1/chat/completions", chat_completions, methods=["POST"]),
      Route("/tokenize", tokenize, methods=["POST"]),
      Route("/detokenize", detokenize, methods=["POST"]),
      Route("/v1/models", models, methods=["GET"]),
      Route("/health", health, methods=["GET"]),
      Route("/metrics", prometheus, methods=["GET"]),
  ], exception_handlers={ApiError: api_error, ClientGone: client_gone,
                         HTTPException: http_error, Exception: server_error})
  counted = CountStatuses(app, metrics.status)
  counted.metrics = metrics  # tests and the CLI read the counters
  return counted


def model_root(path: Optional[str]) -> Optional[str]:
  """`path` as an absolute folder, when it is one (what a tokenizer lookup resolves)."""
  return os.path.abspath(path) if path and os.path.isdir(path) else None
