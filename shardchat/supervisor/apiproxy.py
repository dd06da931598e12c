"""The admin port's way to the server API: the dashboard's ``POST /api/<method>`` is
forwarded to a shard's API with the API key, so that the browser never holds it.

Runs in the supervisor's ``selectors`` loop (no thread, no event loop: the
supervisor forks): a non-blocking connection per call, HTTP/1.1 spoken with
h11, at most ``MAX_CALLS`` at once, each with a deadline. The answer (status
and JSON body) goes back to the admin client as it came; a shard API that
cannot be reached answers 502, one too slow 504.
"""

from __future__ import annotations

import errno
import selectors
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

import h11
import orjson

from shardchat.core.errors import AnswerError
from shardchat.httpanswer import AnswerReader, post_bytes

__all__ = ["ApiProxy", "ApiTarget", "error_body"]

TIMEOUT = 4.0  # seconds for a whole call (within the admin connection's READ_TIMEOUT)
MAX_CALLS = 16
MAX_ANSWER = 4 << 20  # bytes of an answer body (a page of history, a list of rooms)

Done = Callable[[int, bytes], None]  # status, JSON body


@dataclass(frozen=True, slots=True)
class ApiTarget:
    """Where the server API listens and the key it wants."""

    host: str
    port: int
    key: str


@dataclass(slots=True)
class _Call:
    sock: socket.socket
    done: Done
    deadline: float  # monotonic
    out: bytes
    answer: AnswerReader


def error_body(code: str, message: str) -> bytes:
    """An answer in the server API's error shape."""
    return orjson.dumps({"error": {"code": code, "message": message}})


class ApiProxy:
    """Forwards calls to the server API; ``target`` None: the API is off."""

    def __init__(
        self,
        selector: selectors.BaseSelector,
        target: ApiTarget | None,
        off: str = "the server API is off: set api.key",
    ) -> None:
        self._selector = selector
        self.target = target
        self.off = off  # why there is no target, for the dashboard
        self._calls: dict[socket.socket, _Call] = {}

    def forward(self, method: str, body: bytes, done: Done) -> None:
        """Call ``method`` with ``body``; ``done`` gets the answer (later, or at once)."""
        target = self.target
        if target is None:
            done(503, error_body("api_off", self.off))
            return
        if len(self._calls) >= MAX_CALLS:
            done(503, error_body("busy", "too many dashboard calls at once"))
            return
        conn = h11.Connection(our_role=h11.CLIENT)
        host = f"[{target.host}]" if ":" in target.host else target.host
        headers = [
            ("Host", f"{host}:{target.port}"),
            ("X-API-Key", target.key),
            ("Content-Type", "application/json"),
            ("Connection", "close"),
        ]
        out = post_bytes(conn, f"/api/{method}", headers, body)
        family = socket.AF_INET6 if ":" in target.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            # A name (api.host) is resolved here, blocking: an address is not.
            code = sock.connect_ex((target.host, target.port))
        except OSError as exc:
            code = exc.errno or errno.EHOSTUNREACH
        if code not in (0, errno.EINPROGRESS):
            sock.close()
            done(502, error_body("unreachable", f"the server API: {errno.errorcode.get(code)}"))
            return
        call = _Call(sock, done, time.monotonic() + TIMEOUT, out, AnswerReader(conn, MAX_ANSWER))
        self._calls[sock] = call
        self._selector.register(sock, selectors.EVENT_WRITE, lambda: self._write(call))

    def _write(self, call: _Call) -> None:
        error = call.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if error:
            self._finish(
                call,
                502,
                error_body("unreachable", f"the server API: {errno.errorcode.get(error)}"),
            )
            return
        try:
            sent = call.sock.send(call.out)
        except BlockingIOError:
            return
        except OSError as exc:
            self._finish(call, 502, error_body("unreachable", f"the server API: {exc.strerror}"))
            return
        call.out = call.out[sent:]
        if not call.out:
            self._selector.modify(call.sock, selectors.EVENT_READ, lambda: self._read(call))

    def _read(self, call: _Call) -> None:
        try:
            chunk = call.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        try:
            answer = call.answer.feed(chunk)
        except AnswerError as exc:
            self._finish(call, 502, error_body("bad_answer", f"the server API: {exc}"))
            return
        if answer is not None:
            self._finish(call, answer.status, answer.body)

    def _finish(self, call: _Call, status: int, body: bytes) -> None:
        self._selector.unregister(call.sock)
        del self._calls[call.sock]
        call.sock.close()
        call.done(status, body)

    def fds(self) -> list[int]:
        return [sock.fileno() for sock in self._calls]

    def next_deadline(self) -> float | None:
        return min((call.deadline for call in self._calls.values()), default=None)

    def expire(self, now: float) -> None:
        for call in list(self._calls.values()):
            if call.deadline <= now:
                self._finish(call, 504, error_body("timeout", "the server API did not answer"))

    def close(self) -> None:
        for call in list(self._calls.values()):
            self._selector.unregister(call.sock)
            call.sock.close()
        self._calls.clear()
