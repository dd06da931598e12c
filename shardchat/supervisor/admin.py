"""The supervisor's admin HTTP port: ``/metrics``, ``/status`` and ``/healthz``.

Served from the supervisor's ``selectors`` loop with non-blocking sockets, so
that a slow admin client never stalls the supervisor. Requests are tiny GETs:
the whole request head must arrive within ``REQUEST_LIMIT`` bytes.
"""

from __future__ import annotations

import errno
import selectors
import socket
from collections.abc import Callable

import orjson

from shardchat.core.errors import ShardError

__all__ = ["AdminServer"]

REQUEST_LIMIT = 8192

_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed"}


class AdminServer:
    """Answers admin GETs; ``status`` builds the /status document."""

    def __init__(
        self,
        selector: selectors.BaseSelector,
        host: str,
        port: int,
        status: Callable[[], dict[str, object]],
        metrics: Callable[[], bytes],
    ) -> None:
        self._selector = selector
        self._status = status
        self._metrics = metrics
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
        selector.register(self.sock, selectors.EVENT_READ, self._accept)

    def _accept(self) -> None:
        try:
            client, _ = self.sock.accept()
        except BlockingIOError:
            return
        client.setblocking(False)
        self._buffers[client] = bytearray()
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
        line = head.split(b"\r\n", 1)[0].decode("latin-1").split()
        if len(line) != 3:
            status, ctype, body = 400, "text/plain", b"bad request\n"
        elif line[0] != "GET":
            status, ctype, body = 405, "text/plain", b"method not allowed\n"
        else:
            status, ctype, body = self.route(line[1].partition("?")[0])
        head_out = (
            f"HTTP/1.1 {status} {_REASONS[status]}\r\n"
            f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n"
        ).encode()
        # A small reply fits the socket buffer; the blocking send is bounded by it.
        client.setblocking(True)
        client.settimeout(1.0)
        try:
            client.sendall(head_out + body)
        except OSError:
            pass

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
        client.close()

    def close(self) -> None:
        for client in list(self._buffers):
            self._drop(client)
        self._selector.unregister(self.sock)
        self.sock.close()
