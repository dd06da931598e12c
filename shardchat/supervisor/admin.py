"""The supervisor's admin HTTP port: ``/metrics``, ``/status`` and ``/healthz``.

Served from the supervisor's ``selectors`` loop with non-blocking sockets, so
that a slow admin client never stalls the supervisor. Requests are tiny GETs:
the whole request head must arrive within ``REQUEST_LIMIT`` bytes and
``READ_TIMEOUT`` seconds of the connection's start, and at most
``MAX_CLIENTS`` are open at once (more are closed at accept). The port binds
to ``server.admin_host`` (127.0.0.1 by default, whatever ``server.host`` is);
with ``server.admin_token`` set, ``/status`` and ``/metrics`` need
``Authorization: Bearer <token>`` (401 otherwise); ``/healthz`` never does.
"""

from __future__ import annotations

import errno
import hmac
import selectors
import socket
import time
from collections.abc import Callable

import orjson

from shardchat.core.errors import ShardError

__all__ = ["AdminServer"]

REQUEST_LIMIT = 8192
READ_TIMEOUT = 5.0  # seconds from accept to a complete request head
MAX_CLIENTS = 64

_REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    405: "Method Not Allowed",
}


class AdminServer:
    """Answers admin GETs; ``status`` builds the /status document."""

    def __init__(
        self,
        selector: selectors.BaseSelector,
        host: str,
        port: int,
        status: Callable[[], dict[str, object]],
        metrics: Callable[[], bytes],
        token: str = "",
    ) -> None:
        self._selector = selector
        self._status = status
        self._metrics = metrics
        self._token = token.encode()
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, address = infos[0]
        self.sock = socket.socket(family, kind, proto)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.sock.bind(address)
            self.sock.listen(64)
        except OSError as exc:
            self.sock.close()
            if exc.errno == errno.EADDRINUSE:
                raise ShardError(f"admin port {port} on {host} is already in use") from None
            raise ShardError(f"cannot listen on admin {host}:{port}: {exc.strerror}") from None
        self.sock.setblocking(False)
        self._buffers: dict[socket.socket, bytearray] = {}
        self._deadlines: dict[socket.socket, float] = {}  # monotonic; insertion = accept order
        selector.register(self.sock, selectors.EVENT_READ, self._accept)

    def fds(self) -> list[int]:
        """Every descriptor of the admin port, for a forked child to close."""
        return [self.sock.fileno(), *(client.fileno() for client in self._buffers)]

    def next_deadline(self) -> float | None:
        """When the oldest admin connection times out (monotonic), if any is open."""
        return next(iter(self._deadlines.values()), None)

    def expire(self, now: float) -> None:
        """Close the admin connections whose request did not arrive in time."""
        for client, deadline in list(self._deadlines.items()):
            if deadline > now:
                break
            self._drop(client)

    def _accept(self) -> None:
        try:
            client, _ = self.sock.accept()
        except BlockingIOError:
            return
        if len(self._buffers) >= MAX_CLIENTS:
            client.close()
            return
        client.setblocking(False)
        self._buffers[client] = bytearray()
        self._deadlines[client] = time.monotonic() + READ_TIMEOUT
        self._selector.register(client, selectors.EVENT_READ, lambda: self._read(client))

    def _read(self, client: socket.socket) -> None:
        try:
            chunk = client.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        buf = self._buffers[client]
        buf += chunk
        if chunk and b"\r\n\r\n" not in buf and len(buf) < REQUEST_LIMIT:
            return
        if chunk and b"\r\n\r\n" in buf:
            self._respond(client, bytes(buf))
        self._drop(client)

    def _respond(self, client: socket.socket, head: bytes) -> None:
        lines = head.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
        line = lines[0].decode("latin-1").split()
        extra = ""
        if len(line) != 3:
            status, ctype, body = 400, "text/plain", b"bad request\n"
        elif line[0] != "GET":
            status, ctype, body = 405, "text/plain", b"method not allowed\n"
        else:
            path = line[1].partition("?")[0]
            if path in ("/status", "/metrics") and not self._authorized(lines[1:]):
                status, ctype, body = 401, "text/plain", b"a bearer token is required\n"
                extra = 'WWW-Authenticate: Bearer realm="shardchat admin"\r\n'
            else:
                status, ctype, body = self.route(path)
        head_out = (
            f"HTTP/1.1 {status} {_REASONS[status]}\r\n"
            f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\n{extra}"
            "Connection: close\r\n\r\n"
        ).encode()
        # A small reply fits the socket buffer; the blocking send is bounded by it.
        client.setblocking(True)
        client.settimeout(1.0)
        try:
            client.sendall(head_out + body)
        except OSError:
            pass

    def _authorized(self, header_lines: list[bytes]) -> bool:
        if not self._token:
            return True
        values = [
            value.strip()
            for name, _, value in (line.partition(b":") for line in header_lines)
            if name.strip().lower() == b"authorization"
        ]
        if len(values) != 1:
            return False
        scheme, _, credentials = values[0].partition(b" ")
        # RFC 7235 2.1: the scheme is case-insensitive; the token is compared in constant time.
        return scheme.lower() == b"bearer" and hmac.compare_digest(credentials.strip(), self._token)

    def route(self, path: str) -> tuple[int, str, bytes]:
        if path == "/healthz":
            return 200, "text/plain; charset=utf-8", b"ok\n"
        if path == "/metrics":
            return 200, "text/plain; version=0.0.4; charset=utf-8", self._metrics()
        if path == "/status":
            return 200, "application/json", orjson.dumps(self._status(), option=orjson.OPT_INDENT_2)
        return 404, "text/plain; charset=utf-8", b"not found\n"

    def _drop(self, client: socket.socket) -> None:
        self._selector.unregister(client)
        del self._buffers[client]
        del self._deadlines[client]
        client.close()

    def close(self) -> None:
        for client in list(self._buffers):
            self._drop(client)
        self._selector.unregister(self.sock)
        self.sock.close()
