"""The server API's HTTP connections: h11 parsing on an asyncio.Protocol.

h11 parses each request; this module feeds it bytes, checks each request's
head (the path under ``/api/``, POST, the API key, the body's size against
``limits.max_frame``) and hands the body of a request that passed to the
shard (:meth:`ApiHandler.api_call`) with a function that answers it, at once
or later. Connections are kept alive, and pipelined requests are taken at
once, each with a fresh h11 parser fed what the last one left over: a
backend that pipelines its publishes gets them in flight together, as over
the WebSocket, and any other call starts once those before it are answered
(:meth:`ApiConnection._take`); the answers go out in the requests' order (one
that is ready waits for the ones before it), at most ``MAX_PENDING``
unanswered (then reading pauses). The answers are small fixed-form JSON responses written
here.

A refusal of the head (404, 405, 401, 413) or a request h11 cannot parse is
answered with ``Connection: close``: its body is not read, nor what follows.
Like the WebSocket connections, these have no timer of their own: the
shard's sweep ticks them (a request must arrive whole within
``REQUEST_TIMEOUT``; an idle keep-alive connection is closed after
``heartbeat.idle_timeout``).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections import deque
from collections.abc import Callable
from typing import Protocol, cast

import h11

from shardchat.core.apicalls import error_body
from shardchat.core.errors import (
    ApiBadRequest,
    ApiError,
    ApiMethodNotAllowed,
    ApiNotFound,
    ApiTooLarge,
    ApiUnauthorized,
)
from shardchat.logs import log_event
from shardchat.shard.apihttp import PREFIX, api_key_of, content_length, response

__all__ = [
    "MAX_PENDING",
    "REQUEST_TIMEOUT",
    "Answer",
    "ApiConnection",
    "ApiHandler",
]

log = logging.getLogger(__name__)

REQUEST_TIMEOUT = 5.0  # seconds a request may take to arrive whole (slow-loris defence)
MAX_HEAD = 16384  # bytes of a request's line and headers
MAX_PENDING = 64  # requests of one connection taken and not answered yet; then reading pauses
_STREAMED = frozenset({"publish", "broadcast"})  # in flight together when pipelined
_BAD_HTTP = b'{"error":{"code":"bad_request","message":"not valid HTTP/1.1"}}'

Answer = Callable[[int, bytes], None]  # (HTTP status, JSON body)


class ApiHandler(Protocol):
    """What the shard provides to its API connections."""

    clock: float  # loop time, refreshed by the shard at least once per sweep
    max_frame: int  # the largest body (413 over it)
    api_key: bytes  # the key every request must present; empty: the API is off (404)

    def api_call(self, conn: ApiConnection, method: str, body: bytes, answer: Answer) -> None:
        """A request for ``/api/<method>`` passed its head's checks: ``answer``
        it (now or later, once)."""

    def api_refused(self, conn: ApiConnection, method: str, exc: ApiError) -> None:
        """A request refused by the connection itself (counted and logged)."""

    def api_closed(self, conn: ApiConnection) -> None:
        """The TCP connection is gone."""


class _Slot:
    """One request's place in the order of the answers."""

    __slots__ = ("close", "data", "streams")

    def __init__(self, close: bool, streams: bool = False) -> None:
        self.data: bytes | None = None  # the answer's bytes, once it is ready
        self.close = close  # the connection closes after this answer
        self.streams = streams  # a publish: the next publishes need not wait for it


class ApiConnection(asyncio.Protocol):
    """One HTTP connection of the server API."""

    __slots__ = (
        "body",
        "conn_id",
        "done",
        "elsewhere",
        "h11",
        "handler",
        "held",
        "keep_alive",
        "last_recv",
        "method",
        "paused",
        "peer",
        "pending",
        "started",
        "transport",
    )

    def __init__(self, handler: ApiHandler, conn_id: int, elsewhere: bool = False) -> None:
        self.handler = handler
        self.conn_id = conn_id
        self.h11 = _parser()  # the request being read; a fresh one for each request
        self.transport: asyncio.Transport | None = None
        self.peer = ""
        self.method = ""  # the API method of the request being read
        self.body: bytearray | None = None  # the body being read; None: not wanted
        self.keep_alive = True  # the request being read lets the connection go on
        self.pending: deque[_Slot] = deque()  # taken, answers in order
        # A request taken whole that waits for the answers before it (see _take).
        self.held: tuple[str, bytes, _Slot] | None = None
        self.done = False  # no more requests are read (a refusal, EOF, draining)
        self.paused = False  # reading paused: MAX_PENDING unanswered
        self.last_recv = handler.clock
        self.started = 0.0  # when the request being read began; 0: none
        self.elsewhere = elsewhere  # the main port, when the API has a port of its own

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if peer else ""

    def data_received(self, data: bytes) -> None:
        self.last_recv = self.handler.clock
        if self.done:
            return
        if not self.started and data:
            self.started = self.handler.clock
        try:
            self.h11.receive_data(data)
            self._next()
        except Exception as exc:
            # A bug, not the client's doing; no input may make the shard write a
            # traceback: one line, and the connection is closed.
            log_event(
                log, logging.ERROR, "api_internal_error", conn=self.conn_id, peer=self.peer,
                error=f"{type(exc).__name__}: {str(exc)[:200]}",
            )  # fmt: skip
            self.done = True
            self.pending.clear()
            self._close()

    def eof_received(self) -> bool | None:
        self.done = True  # the client sends no more; what it sent is answered
        if not self.pending:
            self._close()
            return None
        transport = self.transport
        if transport is not None and transport.get_extra_info("ssl_object") is not None:
            return None  # TLS has no half-close: the transport closes
        return True  # keep our side open for the answers

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.pending.clear()
        self.handler.api_closed(self)

    # Requests

    def _next(self) -> None:
        """Take h11's events until it needs data, or reading must stop."""
        while not self.done and self.held is None and self.transport is not None:
            if len(self.pending) >= MAX_PENDING:
                self.paused = True
                self.transport.pause_reading()
                return
            parser = self.h11
            try:
                event = parser.next_event()
            except h11.RemoteProtocolError:
                self._refuse(ApiBadRequest("not valid HTTP/1.1"), body=_BAD_HTTP)
                return
            if event is h11.NEED_DATA:
                return
            if event is h11.PAUSED:
                # The request is whole: a fresh parser takes what came after it.
                rest, _ = parser.trailing_data
                self.h11 = _parser()
                self.started = 0.0
                if rest:
                    self.started = self.handler.clock
                    self.h11.receive_data(rest)
                continue
            if type(event) is h11.Request:
                self._head(event)
            elif type(event) is h11.Data:
                body = self.body
                if body is not None:
                    body += event.data
                    if len(body) > self.handler.max_frame:
                        self._refuse(
                            ApiTooLarge(f"the body is over {self.handler.max_frame} bytes")
                        )
            elif type(event) is h11.EndOfMessage:
                body, self.body = self.body, None
                if body is not None:
                    slot = _Slot(not self.keep_alive, self.method in _STREAMED)
                    if slot.close:
                        self.done = True  # Connection: close, or HTTP/1.0
                    if not self._take(self.method, bytes(body), slot):
                        return  # held: reading goes on once it is taken
            elif type(event) is h11.ConnectionClosed:
                self.done = True
                if not self.pending:
                    self._close()
                return

    def _take(self, method: str, body: bytes, slot: _Slot) -> bool:
        """Hand a whole request to the shard, or hold it (False).

        POST is not safe (RFC 9112 9.3.2: only safe pipelined requests may be
        processed in parallel), so a request starts once every one before it
        is answered, except publishes after publishes: those go in flight
        together, and the room's order from one shard keeps their effects in
        the order sent, as a WebSocket client's publishes."""
        pending = self.pending
        if pending and not (slot.streams and all(s.streams for s in pending)):
            self.held = (method, body, slot)
            # Nothing more is parsed until it is taken: what the client sends
            # meanwhile would wait in h11's buffer, without a bound.
            if self.transport is not None and not self.paused:
                self.paused = True
                self.transport.pause_reading()
            return False
        pending.append(slot)
        self.handler.api_call(self, method, body, self._answerer(slot))
        return True

    def _head(self, request: h11.Request) -> None:
        target = request.target.split(b"?", 1)[0]
        self.method = target[len(PREFIX) :].decode("ascii", "replace")
        headers = list(request.headers)
        self.keep_alive = request.http_version == b"1.1" and not any(
            name == b"connection" and b"close" in value.lower() for name, value in headers
        )
        if not target.startswith(PREFIX):
            self.method = ""
            self._refuse(ApiNotFound("the server API is under /api/<method>"))
        elif self.elsewhere:
            self._refuse(ApiNotFound("the server API is served on its own port (api.port)"))
        elif not self.handler.api_key:
            self._refuse(ApiNotFound("the server API is off (api.key is not set)"))
        elif request.method != b"POST":
            self._refuse(ApiMethodNotAllowed("use POST"), (("Allow", "POST"),))
        elif not self._key_ok(headers):
            self._refuse(ApiUnauthorized("a valid API key is required (X-API-Key)"))
        elif content_length(headers) > self.handler.max_frame:
            self._refuse(ApiTooLarge(f"the body is over {self.handler.max_frame} bytes"))
        else:
            self.body = bytearray()
            if self.h11.they_are_waiting_for_100_continue and self.transport is not None:
                # curl asks so for bodies over 1 KiB, and waits a second without it.
                self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def _key_ok(self, headers: list[tuple[bytes, bytes]]) -> bool:
        presented = api_key_of(headers)
        # Constant time: the comparison must not tell how much of a guess was right.
        return presented is not None and hmac.compare_digest(presented, self.handler.api_key)

    def _refuse(
        self,
        exc: ApiError,
        extra: tuple[tuple[str, str], ...] = (),
        body: bytes | None = None,
    ) -> None:
        """Answer a refused request (after the ones before it) and close: nothing
        more is read."""
        self.body = None
        self.done = True
        self.handler.api_refused(self, self.method, exc)
        slot = _Slot(close=True)
        self.pending.append(slot)
        self._answerer(slot, extra)(exc.status, error_body(exc) if body is None else body)

    # Answers

    def _answerer(self, slot: _Slot, extra: tuple[tuple[str, str], ...] = ()) -> Answer:
        def answer(status: int, body: bytes) -> None:
            if slot.data is not None:
                return  # answered once already
            slot.data = response(status, body, slot.close, extra)
            self._flush()

        return answer

    def _flush(self) -> None:
        """Write the answers that are ready, in the requests' order."""
        pending = self.pending
        transport = self.transport
        if transport is None:
            pending.clear()
            return
        out = []
        close = False
        while pending and pending[0].data is not None:
            slot = pending.popleft()
            assert slot.data is not None
            out.append(slot.data)
            if slot.close:
                close = True
                pending.clear()
                break
        if out:
            transport.write(b"".join(out))
        held = self.held
        if close:
            self._close()
        elif held is not None and not pending:
            self.held = None
            if self.paused:
                self.paused = False
                transport.resume_reading()
            self._take(*held)
            self._next()
        elif self.done and not pending:
            self._close()
        elif self.paused and len(pending) < MAX_PENDING // 2:
            self.paused = False
            transport.resume_reading()
            self._next()

    def _close(self) -> None:
        self.done = True
        transport = self.transport
        if transport is not None:
            if transport.can_write_eof():
                transport.write_eof()
            transport.close()

    # The shard's sweep and drain

    def tick(self, now: float, interval: float, timeout: float, idle: float) -> None:
        """A request that is slow to arrive, or an idle keep-alive connection, is closed."""
        if self.pending or self.held is not None:
            return
        if self.started and now - self.started >= REQUEST_TIMEOUT:
            self._close()
        elif idle and now - self.last_recv >= idle:
            self._close()

    def drain(self) -> None:
        """The shard is stopping: close now if idle, else after the answers due."""
        self.done = True
        if self.held is not None:
            self.held[2].close = True  # its answer says Connection: close
        elif self.pending:
            self.pending[-1].close = True
        else:
            self._close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


def _parser() -> h11.Connection:
    return h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
