"""The supervisor's admin HTTP port: the dashboard, ``/metrics``, ``/status``,
``/series``, the dashboard's ``/api/<method>`` and ``/healthz``.

Served from the supervisor's ``selectors`` loop with non-blocking sockets, so
that a slow admin client never stalls the supervisor. Requests are small: the
whole request (head, and the body of a POST) must arrive within
``REQUEST_LIMIT`` bytes and ``READ_TIMEOUT`` seconds of the connection's
start, and at most ``MAX_CLIENTS`` are open at once (more are closed at
accept). The port binds to ``server.admin_host`` (127.0.0.1 by default,
whatever ``server.host`` is); with ``server.admin_token`` set, everything but
the dashboard's own files and ``/healthz`` needs ``Authorization: Bearer
<token>`` (401 otherwise). ``POST /api/<method>`` goes on to the server API
(:mod:`shardchat.supervisor.apiproxy`), with the API key added here.
"""

from __future__ import annotations

import contextlib
import errno
import hmac
import ipaddress
import re
import selectors
import socket
import time
from collections.abc import Callable
from pathlib import Path

import orjson

from shardchat.core.errors import ShardError
from shardchat.shard.pages import page_csp
from shardchat.supervisor.apiproxy import ApiProxy, error_body

__all__ = ["AdminServer"]

REQUEST_LIMIT = 65536
READ_TIMEOUT = 5.0  # seconds from accept to a complete request
MAX_CLIENTS = 64
_STATIC = Path(__file__).parent.parent / "static"
_API_PATH = re.compile(r"/api/([a-z_]{1,32})")
_JSON = "application/json"
_TEXT = "text/plain; charset=utf-8"

_REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    413: "Content Too Large",
    429: "Too Many Requests",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}
Answer = tuple[int, str, bytes]
_CHALLENGE = 'WWW-Authenticate: Bearer realm="shardchat admin"\r\n'


def _content_length(header_lines: list[bytes]) -> int | None:
    """The request's body length (0 without one); None when it cannot be told."""
    values = [
        value.strip()
        for name, _, value in (line.partition(b":") for line in header_lines)
        if name.strip().lower() in (b"content-length", b"transfer-encoding")
    ]
    if not values:
        return 0
    if len(values) != 1 or not values[0].isdigit():
        return None
    return int(values[0])


def _json_typed(header_lines: list[bytes]) -> bool:
    """Whether the request's one Content-Type is ``application/json``."""
    values = [
        value.strip().partition(b";")[0].strip().lower()
        for name, _, value in (line.partition(b":") for line in header_lines)
        if name.strip().lower() == b"content-type"
    ]
    return values == [b"application/json"]


def _host_name(header_lines: list[bytes]) -> str | None:
    """The request's one Host header without its port, lower-cased; None when it
    has none or several."""
    values = [
        value.strip().decode("latin-1").lower()
        for name, _, value in (line.partition(b":") for line in header_lines)
        if name.strip().lower() == b"host"
    ]
    if len(values) != 1:
        return None
    host = values[0]
    if host.startswith("["):  # an IPv6 literal, with its port after the bracket
        return host[1 : host.find("]")] if "]" in host else None
    return host.rpartition(":")[0] if host.count(":") == 1 else host


def _is_ip_literal(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class AdminServer:
    """Answers admin requests; ``status`` builds the /status document, ``series``
    the dashboard's samples newer than a time."""

    def __init__(
        self,
        selector: selectors.BaseSelector,
        host: str,
        port: int,
        status: Callable[[], dict[str, object]],
        metrics: Callable[[], bytes],
        token: str = "",
        series: Callable[[int], list[dict[str, object]]] = lambda after: [],
        proxy: ApiProxy | None = None,
    ) -> None:
        self._selector = selector
        self._status = status
        self._metrics = metrics
        self._series = series
        self.proxy = proxy if proxy is not None else ApiProxy(selector, None)
        self._token = token.encode()
        # The names a browser may call this port by when no token guards it
        # (see _trusted_host): besides IP literals and localhost, the one it binds.
        self._own_names = {"localhost", host.lower()}
        self._dashboard = (_STATIC / "dashboard.html").read_bytes()
        self._dashboard_js = (_STATIC / "dashboard.js").read_bytes()
        self._csp = page_csp(self._dashboard)
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
            chunk = client.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        buf = self._buffers[client]
        buf += chunk
        head, sep, body = bytes(buf).partition(b"\r\n\r\n")
        if not chunk or (not sep and len(buf) > REQUEST_LIMIT):
            self._drop(client)
            return
        if not sep:
            return
        lines = head.split(b"\r\n")
        length = _content_length(lines[1:])
        if length is None or length > REQUEST_LIMIT:
            self._answer(client, 413, _TEXT, b"a body of at most 64 KiB, with Content-Length\n")
            return
        if len(body) < length:
            return  # the rest of the body is on its way
        self._selector.unregister(client)  # read no more: the answer may come later
        self._respond(client, lines, body[:length])

    def _respond(self, client: socket.socket, lines: list[bytes], body: bytes) -> None:
        line = lines[0].decode("latin-1").split()
        if len(line) != 3:
            self._answer(client, 400, _TEXT, b"bad request\n")
            return
        method, path = line[0], line[1].partition("?")[0]
        query = line[1].partition("?")[2]
        if path in ("/", "/dashboard.js", "/healthz"):
            if method != "GET":
                self._answer(client, 405, _TEXT, b"method not allowed\n")
                return
            self._answer(client, *self.route(path))
            return
        if not self._authorized(lines[1:]):
            self._answer(client, 401, _TEXT, b"a bearer token is required\n", _CHALLENGE)
            return
        api = _API_PATH.fullmatch(path)
        if api is None and path.startswith("/api/"):
            self._answer(client, 404, _JSON, error_body("unknown_method", "no such method"))
            return
        if api is not None:
            if method != "POST":
                self._answer(client, 405, _TEXT, b"method not allowed\n")
                return
            if not self._trusted_host(lines[1:]):
                # DNS rebinding: a page of another site whose name now resolves to
                # this port is same-origin with it, so the JSON check below does not
                # stop it. Without a token, a call that acts with the API key must
                # name this port by an address, localhost or server.admin_host.
                self._answer(client, 403, _TEXT, b"this Host may not call the API here\n")
                return
            if not _json_typed(lines[1:]):
                # A page of another origin may POST a form or text/plain here
                # without asking (no CORS preflight); a JSON type it may not: so
                # a call that acts with the API key comes from the dashboard.
                self._answer(client, 415, _TEXT, b"Content-Type: application/json required\n")
                return
            self.proxy.forward(
                api.group(1), body, lambda status, out: self._answer(client, status, _JSON, out)
            )
            return
        if method != "GET":
            self._answer(client, 405, _TEXT, b"method not allowed\n")
        elif path == "/series":
            after = query.partition("after=")[2].partition("&")[0]
            samples = self._series(int(after) if after.isdigit() else 0)
            self._answer(client, 200, _JSON, orjson.dumps(samples))
        else:
            self._answer(client, *self.route(path))

    def _answer(
        self, client: socket.socket, status: int, ctype: str, body: bytes, extra: str = ""
    ) -> None:
        """Write the whole answer and close the connection."""
        if client not in self._buffers:
            return  # timed out meanwhile
        if "html" in ctype:
            extra += f"Content-Security-Policy: {self._csp}\r\n"
        head_out = (
            f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}\r\n"
            f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\n{extra}"
            "X-Content-Type-Options: nosniff\r\nCache-Control: no-store\r\n"
            "Referrer-Policy: no-referrer\r\nConnection: close\r\n\r\n"
        ).encode()
        # A small reply fits the socket buffer; the blocking send is bounded by it.
        client.setblocking(True)
        client.settimeout(1.0)
        try:
            client.sendall(head_out + body)
        except OSError:
            pass
        self._drop(client)

    def _trusted_host(self, header_lines: list[bytes]) -> bool:
        if self._token:
            return True  # another site's page has no token to send
        name = _host_name(header_lines)
        return name is not None and (name in self._own_names or _is_ip_literal(name))

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

    def route(self, path: str) -> Answer:
        if path == "/":
            return 200, "text/html; charset=utf-8", self._dashboard
        if path == "/dashboard.js":
            return 200, "text/javascript; charset=utf-8", self._dashboard_js
        if path == "/healthz":
            return 200, "text/plain; charset=utf-8", b"ok\n"
        if path == "/metrics":
            return 200, "text/plain; version=0.0.4; charset=utf-8", self._metrics()
        if path == "/status":
            return 200, "application/json", orjson.dumps(self._status(), option=orjson.OPT_INDENT_2)
        return 404, "text/plain; charset=utf-8", b"not found\n"

    def _drop(self, client: socket.socket) -> None:
        if client not in self._buffers:
            return
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(client)
        del self._buffers[client]
        del self._deadlines[client]
        client.close()

    def close(self) -> None:
        self.proxy.close()
        for client in list(self._buffers):
            self._drop(client)
        self._selector.unregister(self.sock)
        self.sock.close()
