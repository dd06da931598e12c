"""The server API's HTTP connections: h11 driven by an asyncio.Protocol.

h11 parses and frames HTTP/1.1; this module feeds it bytes, checks each
request's head (the path under ``/api/``, POST, the API key, the body's size
against ``limits.max_frame``) and hands the body of a request that passed to
the shard (:meth:`ApiHandler.api_call`), which answers through
:meth:`ApiConnection.respond`, at once or later. Connections are kept alive;
pipelined requests wait in h11's buffer (it says ``PAUSED``) and reading
pauses until the answer of the current one is written, one request at a time.

A refusal of the head (404, 405, 401, 413) or a request h11 cannot parse is
answered with ``Connection: close``: its body is not read. Like the WebSocket
connections, these have no timer of their own: the shard's sweep ticks them
(a request must arrive whole within ``REQUEST_TIMEOUT``; an idle keep-alive
connection is closed after ``heartbeat.idle_timeout``).
"""

from __future__ import annotations

import asyncio
import email.utils
import hmac
import http
import logging
import time
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

__all__ = ["REQUEST_TIMEOUT", "ApiConnection", "ApiHandler", "api_key_of", "is_api_request"]

log = logging.getLogger(__name__)

REQUEST_TIMEOUT = 5.0  # seconds a request may take to arrive whole (slow-loris defence)
MAX_HEAD = 16384  # bytes of a request's line and headers
PIPELINED = 65536  # bytes of requests held while one is answered; then reading pauses
_JSON = "application/json"
_PREFIX = b"/api/"


def is_api_request(head: bytes) -> bool | None:
    """Whether the first bytes of a connection start a request for ``/api/...``;
    None while too few have come to tell."""
    space = head.find(b" ")
    if space < 0:
        return None if len(head) < 16 else False
    target = head[space + 1 : space + 1 + len(_PREFIX)]
    if len(target) < len(_PREFIX) and _PREFIX.startswith(target) and b"\n" not in head:
        return None
    return target == _PREFIX


def api_key_of(headers: list[tuple[bytes, bytes]]) -> bytes | None:
    """The key a request presents: ``X-API-Key: KEY`` or ``Authorization: apikey KEY``."""
    for name, value in headers:
        if name == b"x-api-key":
            return value
        if name == b"authorization":
            scheme, _, key = value.partition(b" ")
            if scheme.lower() == b"apikey":
                return key.strip()
    return None


class ApiHandler(Protocol):
    """What the shard provides to its API connections."""

    clock: float  # loop time, refreshed by the shard at least once per sweep
    max_frame: int  # the largest body (413 over it)
    api_key: bytes  # the key every request must present; empty: the API is off (404)

    def api_call(self, conn: ApiConnection, method: str, body: bytes) -> None:
        """A request for ``/api/<method>`` passed its head's checks: answer it
        through ``conn.respond`` (now or later)."""

    def api_refused(self, conn: ApiConnection, method: str, exc: ApiError) -> None:
        """A request refused by the connection itself (counted and logged)."""

    def api_closed(self, conn: ApiConnection) -> None:
        """The TCP connection is gone."""


class ApiConnection(asyncio.Protocol):
    """One HTTP connection of the server API."""

    __slots__ = (
        "body",
        "busy",
        "closing",
        "elsewhere",
        "conn_id",
        "h11",
        "handler",
        "last_recv",
        "method",
        "paused",
        "peer",
        "started",
        "transport",
    )

    def __init__(self, handler: ApiHandler, conn_id: int, elsewhere: bool = False) -> None:
        self.handler = handler
        self.conn_id = conn_id
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        self.transport: asyncio.Transport | None = None
        self.peer = ""
        self.method = ""  # the API method of the request being read or answered
        self.body: bytearray | None = None  # the body being read; None between requests
        self.busy = False  # a request is being answered: the next ones wait
        self.paused = False  # reading paused: too much was pipelined meanwhile
        self.closing = False  # close after the current answer (the shard is draining)
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
        if not self.started and data:
            self.started = self.handler.clock
        conn = self.h11
        try:
            conn.receive_data(data)
            if self.busy:
                # Pipelined requests wait in h11's buffer; past a bound, in the kernel's.
                if len(conn.trailing_data[0]) > PIPELINED and self.transport is not None:
                    self.paused = True
                    self.transport.pause_reading()
                return
            self._next()
        except Exception as exc:
            # A bug, not the client's doing; no input may make the shard write a
            # traceback: one line, and the connection is closed.
            log_event(
                log, logging.ERROR, "api_internal_error", conn=self.conn_id, peer=self.peer,
                error=f"{type(exc).__name__}: {str(exc)[:200]}",
            )  # fmt: skip
            self._close()

    def eof_received(self) -> bool | None:
        self.h11.receive_data(b"")
        if not self.busy:
            self._close()
        return True  # keep our side open to answer the request being served

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.handler.api_closed(self)

    # Requests

    def _next(self) -> None:
        """Take h11's events until it needs data, or a request is being answered."""
        conn = self.h11
        while not self.busy and self.transport is not None:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                self._bad_http(exc)
                return
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return
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
                    self.busy = True
                    self.handler.api_call(self, self.method, bytes(body))
            elif type(event) is h11.ConnectionClosed:
                self._close()
                return

    def _head(self, request: h11.Request) -> None:
        target = request.target.split(b"?", 1)[0]
        self.method = target[len(_PREFIX) :].decode("ascii", "replace")
        if not target.startswith(_PREFIX):
            self.method = ""
            self._refuse(ApiNotFound("the server API is under /api/<method>"))
        elif self.elsewhere:
            self._refuse(ApiNotFound("the server API is served on its own port (api.port)"))
        elif not self.handler.api_key:
            self._refuse(ApiNotFound("the server API is off (api.key is not set)"))
        elif request.method != b"POST":
            self._refuse(ApiMethodNotAllowed("use POST"), (("Allow", "POST"),))
        elif not self._key_ok(list(request.headers)):
            self._refuse(ApiUnauthorized("a valid API key is required (X-API-Key)"))
        elif _content_length(request) > self.handler.max_frame:
            self._refuse(ApiTooLarge(f"the body is over {self.handler.max_frame} bytes"))
        else:
            self.body = bytearray()
            if self.h11.they_are_waiting_for_100_continue and self.transport is not None:
                # curl asks so for bodies over 1 KiB, and waits a second without it.
                data = self.h11.send(h11.InformationalResponse(status_code=100, headers=[]))
                if data:
                    self.transport.write(data)

    def _key_ok(self, headers: list[tuple[bytes, bytes]]) -> bool:
        presented = api_key_of(headers)
        # Constant time: the comparison must not tell how much of a guess was right.
        return presented is not None and hmac.compare_digest(presented, self.handler.api_key)

    def _refuse(self, exc: ApiError, extra: tuple[tuple[str, str], ...] = ()) -> None:
        """Answer a refused head and close: the body, if any, is not read."""
        self.body = None
        self.closing = True
        self.handler.api_refused(self, self.method, exc)
        self.busy = True
        self.respond(exc.status, error_body(exc), extra)

    def _bad_http(self, exc: h11.RemoteProtocolError) -> None:
        """h11 could not parse the request (its hint may be 431 or 501): 400
        ``bad_request``, as every other refusal of the API speaks its own codes."""
        self.closing = True
        if self.h11.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            self.busy = True
            self.handler.api_refused(self, self.method, ApiBadRequest("not valid HTTP/1.1"))
            self.respond(400, b'{"error":{"code":"bad_request","message":"not valid HTTP/1.1"}}')
        else:
            self._close()

    # Answers

    def respond(self, status: int, body: bytes, extra: tuple[tuple[str, str], ...] = ()) -> None:
        """Write the answer of the current request; take the next one (or close)."""
        transport = self.transport
        self.busy = False
        self.started = 0.0
        if transport is None:
            return
        headers = [
            ("Content-Type", _JSON),
            ("Content-Length", str(len(body))),
            ("Date", _date()),
            ("Cache-Control", "no-store"),
            ("X-Content-Type-Options", "nosniff"),
            *extra,
        ]
        if self.closing:
            headers.append(("Connection", "close"))
        conn = self.h11
        try:
            data = b"".join(
                conn.send(event) or b""
                for event in (
                    h11.Response(status_code=status, headers=headers, reason=_phrase(status)),
                    h11.Data(data=body),
                    h11.EndOfMessage(),
                )
            )
        except h11.LocalProtocolError:
            self._close()
            return
        transport.write(data)
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()
            if self.paused:
                self.paused = False
                transport.resume_reading()
            self._next()
        else:
            self._close()  # MUST_CLOSE, or a body we did not read

    def _close(self) -> None:
        self.busy = True  # nothing more is read or answered
        transport = self.transport
        if transport is not None:
            if transport.can_write_eof():
                transport.write_eof()
            transport.close()

    # The shard's sweep and drain

    def tick(self, now: float, interval: float, timeout: float, idle: float) -> None:
        """A request that is slow to arrive, or an idle keep-alive connection, is closed."""
        if self.busy:
            return
        if self.started and now - self.started >= REQUEST_TIMEOUT:
            self._close()
        elif idle and now - self.last_recv >= idle:
            self._close()

    def drain(self) -> None:
        """The shard is stopping: close now if idle, else after the current answer."""
        self.closing = True
        if not self.busy:
            self._close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


_dates: list[tuple[int, str]] = [(0, "")]


def _date() -> str:
    """The Date header (RFC 9110 6.6.1), made once a second."""
    now = int(time.time())
    second, text = _dates[0]
    if second != now:
        text = email.utils.formatdate(now, usegmt=True)
        _dates[0] = (now, text)
    return text


def _phrase(status: int) -> bytes:
    return http.HTTPStatus(status).phrase.encode()


def _content_length(request: h11.Request) -> int:
    for name, value in request.headers:
        if name == b"content-length":
            return int(value)  # h11 checked it is a number
    return 0
