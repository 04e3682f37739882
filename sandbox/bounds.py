"""HTTP bounds that uvicorn and FastAPI leave to the application: how long a client may take to send a
request, and how large its body may be.

uvicorn bounds the part of a request head it buffers (h11's `max_incomplete_event_size`: 400 beyond
it; a head that arrives whole in one read is not checked, so `RequestLimits` checks it again: 431),
the bytes it buffers per connection (it stops reading a connection once 64 KiB of body wait unread,
and while a pipelined request waits its turn), open connections (`limit_concurrency`: beyond it,
requests answer 503) and idle keep-alive connections (`timeout_keep_alive`). It has no deadline for
the request head itself, so a client that connects and sends nothing, or one header byte at a time,
would hold its connection for ever. `HeadDeadlineProtocol` closes such connections; `RequestLimits`
bounds the head's size, and the body's size and the time it takes to arrive.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


# On shutdown an idle connection is closed only once it has been idle this long; clients must not
# reuse a connection idle longer than that (`sandbox.client` keeps them 2 s), so a request is never
# sent on a connection the service is closing.
DRAIN_IDLE_S = 3.0


def head_deadline_protocol(header_timeout_s: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol, plus:
    - a connection must deliver a complete request head within `header_timeout_s` of connecting, and
      of the first byte of each later request; else it is closed. (Between requests, uvicorn's
      keep-alive timeout applies.)
    - on shutdown, an idle keep-alive connection is closed only once idle for `DRAIN_IDLE_S`; until
      then a request arriving on it is answered 503 + `Connection: close` (never run, so clients retry
      elsewhere). Closing it at once races with a client that has just sent a request on it, which
      then cannot tell whether its request ran."""

    class HeadDeadlineProtocol(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None
        _idle_since: float = 0.0

        def shutdown(self) -> None:
            if self.cycle is None or self.cycle.response_complete:
                self.limit_concurrency = 0  # uvicorn answers every further request 503 + close
                idle_for = self.loop.time() - self._idle_since
                self.loop.call_later(max(0.0, DRAIN_IDLE_S - idle_for), self._close_if_open)
            else:
                super().shutdown()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._idle_since = self.loop.time()

        def _close_if_open(self) -> None:
            if not self.transport.is_closing():
                super().shutdown()

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._idle_since = self.loop.time()
            self._arm()

        def data_received(self, data: bytes) -> None:
            waiting_for_head = self.conn.their_state is h11.IDLE
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:  # a whole head arrived
                self._disarm()
            elif waiting_for_head and data and self._head_timer is None:  # first byte of a new request
                self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self._head_timer = self.loop.call_later(header_timeout_s, self._head_timed_out)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timed_out(self) -> None:
            self._head_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()

    return HeadDeadlineProtocol


class RequestLimits:
    """ASGI middleware: answers 431 when the request line and headers exceed `max_header_bytes`; reads
    the whole request body before the app sees it, answering 413 when it exceeds `max_bytes` (by
    Content-Length at once, or while counting a chunked body) and 408 when it has not fully arrived
    `timeout_s` after the head. The app then receives the body in one message, and later `receive()`
    calls wait for the client's disconnect, as usual."""

    def __init__(self, app: ASGIApp, *, max_header_bytes: int, max_bytes: int, timeout_s: float):
        self.app = app
        self.max_header_bytes = max_header_bytes
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        head_bytes = len(scope["raw_path"]) + len(scope["query_string"]) + sum(
            len(name) + len(value) + 4 for name, value in scope["headers"])
        if head_bytes > self.max_header_bytes:
            await _reject(send, 431, f"request head of {head_bytes} bytes exceeds the limit of {self.max_header_bytes}")
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await _reject(send, 413, f"request body of {declared} bytes exceeds the limit of {self.max_bytes}")
            return
        try:
            body = await asyncio.wait_for(self._read_body(receive), self.timeout_s)
        except _TooLarge:
            await _reject(send, 413, f"request body exceeds the limit of {self.max_bytes} bytes")
            return
        except TimeoutError:
            await _reject(send, 408, f"request body not received within {self.timeout_s:g} s")
            return
        if body is None:
            return  # the client went away before its body arrived
        delivered = False

        async def replay() -> Message:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _read_body(self, receive: Receive) -> bytes | None:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                raise _TooLarge
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


class _TooLarge(Exception):
    pass


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # h11 has already refused malformed lengths
    return None


async def _reject(send: Send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
