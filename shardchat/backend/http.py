"""A small keep-alive HTTP/1.1 client on the shard's event loop (h11 over asyncio streams).

The connect proxy, the publish proxy and the webhook sender talk to the
application's backend through one :class:`HttpClient` each: at most
``connections`` keep-alive connections to one origin, requests beyond them
wait for a free one (so a slow backend holds a bounded number of sockets,
never one per client), and past ``max_waiting`` of those a request fails at
once. Every request has a deadline; a timeout or a failure
raises :class:`~shardchat.core.errors.BackendError` with a short reason, and
the connection it used is dropped. A keep-alive connection the backend closed
while idle is retried once on a fresh one (the request never reached it).
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from typing import NamedTuple
from urllib.parse import urlsplit

import h11

from shardchat.core.errors import AnswerError, AnswerGone, BackendError
from shardchat.httpanswer import AnswerReader, post_bytes

__all__ = ["HttpClient", "Response", "split_url"]

# Bytes read from a socket at once, and the largest answer body we keep.
_READ = 65536
MAX_BODY = 1 << 20


class Response(NamedTuple):
    status: int
    headers: dict[str, str]  # names lower-cased
    body: bytes


def split_url(url: str) -> tuple[str, str, int, str]:
    """``url``'s scheme, host, port and target (path with query)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise BackendError(f"{url!r} is not an http:// or https:// URL")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return parts.scheme, parts.hostname, port, target


class _Conn:
    __slots__ = ("h11", "reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.h11 = h11.Connection(our_role=h11.CLIENT, max_incomplete_event_size=16384)

    def close(self) -> None:
        self.writer.transport.abort()


class HttpClient:
    """Requests to one origin over at most ``connections`` keep-alive connections."""

    def __init__(
        self, url: str, *, connections: int, timeout: float, max_waiting: int = 1024
    ) -> None:
        scheme, self.host, self.port, self.target = split_url(url)
        self.ssl: ssl.SSLContext | None = (
            ssl.create_default_context() if scheme == "https" else None
        )
        self.host_header = self.host if self.port in (80, 443) else f"{self.host}:{self.port}"
        self.limit = connections
        self.max_waiting = max_waiting  # requests waiting for a free connection, at most
        self.timeout = timeout
        self._idle: list[_Conn] = []
        self._open = 0  # connections made and not closed, idle or busy
        self._waiters: deque[asyncio.Future[None]] = deque()
        self.closed = False

    async def post(
        self,
        body: bytes,
        headers: list[tuple[str, str]] | None = None,
        *,
        timeout: float | None = None,
    ) -> Response:
        """POST ``body`` (JSON) to the URL; the answer whatever its status.

        Raises:
            BackendError: no answer within the timeout, or the connection failed.
        """
        try:
            async with asyncio.timeout(self.timeout if timeout is None else timeout):
                return await self._post(body, headers or [])
        except TimeoutError:
            raise BackendError("timed out") from None

    async def _post(self, body: bytes, headers: list[tuple[str, str]]) -> Response:
        headers = [
            ("Host", self.host_header),
            ("Content-Type", "application/json"),
            ("User-Agent", "shardchat"),
            *headers,
        ]
        for attempt in (0, 1):
            try:
                conn, reused = await self._acquire()
            except OSError as exc:  # no connection: refused, unreachable, no such host
                raise BackendError(_reason(exc)) from None
            try:
                response, reusable = await self._exchange(conn, headers, body)
            except (OSError, AnswerError) as exc:
                self._discard(conn)
                if reused and attempt == 0 and isinstance(exc, OSError | AnswerGone):
                    continue  # the backend closed an idle keep-alive connection
                raise BackendError(_reason(exc)) from None
            except BaseException:
                self._discard(conn)  # cancelled (the deadline): its state is unknown
                raise
            self._release(conn, reusable)
            return response
        raise AssertionError("unreachable")

    async def _exchange(
        self, conn: _Conn, headers: list[tuple[str, str]], body: bytes
    ) -> tuple[Response, bool]:
        """The answer, and whether the connection may carry the next request."""
        conn.writer.write(post_bytes(conn.h11, self.target, headers, body))
        reader = AnswerReader(conn.h11, MAX_BODY)
        while (answer := reader.feed(await conn.reader.read(_READ))) is None:
            pass
        return Response(answer.status, answer.headers(), answer.body), answer.reusable

    async def _acquire(self) -> tuple[_Conn, bool]:
        while True:
            if self.closed:
                raise BackendError("client closed")
            if self._idle:
                return self._idle.pop(), True
            if self._open < self.limit:
                self._open += 1
                try:
                    reader, writer = await asyncio.open_connection(
                        self.host, self.port, ssl=self.ssl, limit=_READ
                    )
                except BaseException:
                    self._open -= 1
                    self._wake()
                    raise
                return _Conn(reader, writer), False
            if len(self._waiters) >= self.max_waiting:
                # Bounded too: past it a request fails at once instead of queueing.
                raise BackendError(f"{len(self._waiters)} requests already wait for a connection")
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    # Woken (a connection is free) and then timed out before we ran:
                    # the turn goes to the next waiter, not lost until its deadline.
                    self._wake()
                raise
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)

    def _release(self, conn: _Conn, reusable: bool) -> None:
        if reusable and not self.closed:
            conn.h11.start_next_cycle()
            self._idle.append(conn)
            self._wake()
        else:
            self._discard(conn)

    def _discard(self, conn: _Conn) -> None:
        conn.close()
        self._open -= 1
        self._wake()

    def _wake(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def close(self) -> None:
        self.closed = True
        for conn in self._idle:
            conn.close()
        self._open -= len(self._idle)
        self._idle.clear()
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, AnswerGone):
        return "closed by the backend"
    if isinstance(exc, AnswerError):
        return str(exc)[:200]
    return f"{type(exc).__name__}: {exc}"[:200]
