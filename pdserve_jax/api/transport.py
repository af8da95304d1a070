"""The HTTP mechanics under the routes: reading a body within a size and a time limit,
noticing a client that went away, streaming server-sent events, counting statuses.

- `read_body` refuses a body over the limit with 413 before reading it when its
  Content-Length says so, or as soon as the bytes read pass the limit; one that has
  not arrived whole within the timeout gets 408. Either way the rest is never read
  and the server closes the connection after answering (a request body left unread
  ends keep-alive), so a stalled or oversized upload holds nothing.
- `until_disconnect` returns when the client closes its connection; the routes race
  it against the engine, so a client that leaves aborts its request (streamed or not).
- `EventStream` sends an async iterator of SSE strings and stops it (its `finally`
  cancels the request) when the client disconnects.
- `CountStatuses` wraps the whole app, so every response, 404s and 500s included, is
  counted by status.
"""

from __future__ import annotations

import logging
from typing import AsyncIterator, Callable, Optional

import anyio

from pdserve_jax.api.protocol import ApiError

log = logging.getLogger("pdserve_jax.api")


class ClientGone(Exception):
  """The client closed its connection before the answer."""


async def read_body(request, limit: int, timeout: float) -> bytes:
  """The request body; ApiError 413 / 408 / 400 as the module says, ClientGone when
  the client left while sending it."""
  from starlette.requests import ClientDisconnect

  declared = request.headers.get("content-length")
  if declared is not None:
    if not declared.isdigit():
      raise ApiError(f"Content-Length: not a byte count: {declared!r}")
    if int(declared) > limit:
      raise ApiError(f"the body ({int(declared)} bytes) exceeds the limit of {limit} bytes",
                     None, 413, "invalid_request_error")
  chunks, size = [], 0
  try:
    with anyio.fail_after(timeout):
      async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
          raise ApiError(f"the body exceeds the limit of {limit} bytes", None, 413,
                         "invalid_request_error")
        chunks.append(chunk)
  except TimeoutError:
    raise ApiError(f"the body did not arrive within {timeout:g} s ({size} bytes read)",
                   None, 408, "invalid_request_error") from None
  except ClientDisconnect:
    raise ClientGone() from None
  return b"".join(chunks)


async def until_disconnect(receive) -> None:
  """Returns once the client disconnects (call after the body was read)."""
  while (await receive())["type"] != "http.disconnect":
    pass


class EventStream:
  """An ASGI response sending `events` (SSE strings) until they end or the client
  leaves; then `on_gone()` is called and the iterator is closed (running its
  `finally`)."""

  def __init__(self, events: AsyncIterator[str], on_gone: Callable[[], None]):
    self.events, self.on_gone = events, on_gone

  async def __call__(self, scope, receive, send) -> None:
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/event-stream; charset=utf-8"),
                            (b"cache-control", b"no-cache")]})
    gone, sent = False, False

    async def pump():
      nonlocal gone, sent
      try:
        async for event in self.events:
          await send({"type": "http.response.body", "body": event.encode(),
                      "more_body": True})
        sent = True  # a disconnect from here on is the end of a served stream
        await send({"type": "http.response.body", "body": b"", "more_body": False})
      except OSError:  # the server found the connection closed while sending
        gone = not sent
      tg.cancel_scope.cancel()

    async def watch():
      nonlocal gone
      await until_disconnect(receive)
      gone = not sent
      tg.cancel_scope.cancel()

    async with anyio.create_task_group() as tg:
      tg.start_soon(pump)
      tg.start_soon(watch)
    if gone:
      self.on_gone()
    await self.events.aclose()  # type: ignore[attr-defined]


class CountStatuses:
  """ASGI middleware: `count(status)` for every HTTP response started."""

  def __init__(self, app, count: Callable[[int], None]):
    self.app, self.count = app, count

  async def __call__(self, scope, receive, send):
    if scope["type"] != "http":
      return await self.app(scope, receive, send)

    async def counting(message):
      if message["type"] == "http.response.start":
        self.count(message["status"])
      await send(message)

    await self.app(scope, receive, counting)

  def __getattr__(self, name):  # `app.state`, `app.routes`: the wrapped Starlette's
    return getattr(self.app, name)


def error_headers(e: ApiError) -> Optional[dict]:
  """Retry-After for a 429 or 503; `Connection: close` for a 413 or 408, whose body
  was left unread: the connection closes at once instead of idling out keep-alive."""
  headers = {}
  if e.retry_after is not None:
    headers["Retry-After"] = str(max(1, round(e.retry_after)))
  if e.status in (408, 413):
    headers["Connection"] = "close"
  return headers or None
