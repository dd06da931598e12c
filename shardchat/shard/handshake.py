"""The opening handshake's HTTP, around websockets' Sans-I/O core (RFC 6455 4.2.1
and 4.4, RFC 9110/9112).

websockets parses the request and builds the 101; what it leaves to its user
is done here: exactly one ``Host``, one ``Origin`` and one ``Authorization``
(else 400), 426 with ``Sec-WebSocket-Version: 13`` for another version, 405
for methods other than GET and HEAD, no body on HEAD, the shard's plain pages
for other paths, and an answer (413, 501, 400) to a request websockets cannot
parse, which it would otherwise only hang up on. Every answer but the 101 is
built from ``ServerProtocol.reject`` and closes the connection.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING

from websockets.exceptions import InvalidMessage
from websockets.http11 import Request, Response
from websockets.protocol import Protocol, State
from websockets.server import ServerProtocol
from websockets.streams import StreamReader

from shardchat.logs import log_event

if TYPE_CHECKING:
    from shardchat.shard.connection import Connection

__all__ = [
    "AT_EOF",
    "PLAIN",
    "Later",
    "answer",
    "finish_upgrade",
    "handshake",
    "unparsable_request",
]

log = logging.getLogger("shardchat.shard.connection")

_OPEN = State.OPEN
PLAIN = "text/plain; charset=utf-8"
# What a connection keeps of websockets' state after the handshake: see
# _drop_handshake. The protocol's id (a fresh UUID each) is read by nothing.
AT_EOF = StreamReader.at_eof.__code__
_FRAME_PARSER = Protocol.parse
_NO_ID = uuid.UUID(int=0)
# Headers a request must not repeat: an ambiguous Host, Origin, credential or
# version is refused rather than guessed (RFC 9110 5.3, RFC 6454 7.3).
_SINGLE_HEADERS = ("Host", "Origin", "Authorization", "Sec-WebSocket-Version")
# Security headers on every HTTP answer; the page adds its Content-Security-Policy.
_SECURITY_HEADERS = (("X-Content-Type-Options", "nosniff"), ("Referrer-Policy", "no-referrer"))


def unparsable_request(conn: Connection, exc: InvalidMessage) -> None:
    """websockets could not parse the request and only queued its EOF: answer it."""
    for _ in conn.proto.data_to_send():
        pass  # the EOF; _answer half-closes after its response
    cause = exc.__cause__
    if isinstance(cause, NotImplementedError):  # Transfer-Encoding
        status, text = 501, "transfer codings are not supported"
    elif isinstance(cause, ValueError) and "body" in str(cause):
        status, text = 413, "requests must not have a body"
    else:
        status, text = 400, "not a valid HTTP/1.1 request"
    _refused(conn, status, text)


def _refused(conn: Connection, status: int, text: str) -> None:
    log_event(
        log,
        logging.INFO,
        "http_refused",
        conn=conn.conn_id,
        peer=conn.peer,
        status=status,
        reason=text,
    )
    answer(conn, status, text + "\n")


def answer(
    conn: Connection, status: int, text: str, extra: tuple[tuple[str, str], ...] = ()
) -> None:
    """Write a plain-text HTTP answer outside the Sans-I/O core and half-close."""
    transport = conn.transport
    if transport is None:
        return
    transport.write(_response(conn.proto, status, PLAIN, text.encode(), extra).serialize())
    conn.half_close(transport)


def handshake(conn: Connection, request: Request) -> None:
    handler = conn.handler
    headers = request.headers
    path, _, query = request.path.partition("?")
    for name in _SINGLE_HEADERS:
        count = len(headers.get_all(name))
        if count > 1:
            _refused(conn, 400, f"more than one {name} header")
            return
        # RFC 9112 3.2 (HTTP/1.1) and RFC 6455 4.1 (every upgrade): Host is required.
        if not count and name == "Host" and (path == "/ws" or request.protocol != "HTTP/1.0"):
            _refused(conn, 400, "a Host header is required")
            return
    method = request.method
    if method not in ("GET", "HEAD") or (path == "/ws" and method == "HEAD"):
        allow = "GET" if path == "/ws" else "GET, HEAD"
        _send(
            conn,
            _response(conn.proto, 405, PLAIN, b"method not allowed\n", (("Allow", allow),)),
            method,
        )
        return
    if path != "/ws":
        status, content_type, body = handler.http_get(path)
        extra = (("Content-Security-Policy", handler.page_csp),) if "html" in content_type else ()
        _send(conn, _response(conn.proto, status, content_type, body, extra), method)
        return
    version = headers.get("Sec-WebSocket-Version")
    if version is not None and version != "13":
        # RFC 6455 4.4: say which version this server speaks.
        _send(
            conn,
            _response(
                conn.proto,
                426,
                PLAIN,
                b"only WebSocket version 13 is supported\n",
                (("Sec-WebSocket-Version", "13"), ("Upgrade", "websocket")),
            ),
            method,
        )
        return
    sent = {name: value for name, value in request.headers.raw_items()}
    refusal = handler.refuse_upgrade(conn, request.path, query, sent)
    if type(refusal) is Later:
        # The handler answers in a later turn (the connect proxy asks the backend).
        refusal.then = lambda answer: finish_upgrade(conn, request, method, answer)
        return
    assert not isinstance(refusal, Later)
    finish_upgrade(conn, request, method, refusal)


class Later:
    """What ``refuse_upgrade`` returns to answer later: the handler calls ``then``
    with the refusal (or None to accept) from a later loop turn."""

    __slots__ = ("then",)

    def __init__(self) -> None:
        self.then: Callable[[tuple[int, str] | None], None] | None = None


def finish_upgrade(
    conn: Connection, request: Request, method: str, refusal: tuple[int, str] | None
) -> None:
    """Refuse the upgrade with ``refusal``'s status and text, or accept it."""
    if conn.transport is None or conn.close_deadline:
        return  # gone, or cut by the handshake deadline, while the answer was awaited
    proto = conn.proto
    handler = conn.handler
    if refusal is not None:
        status, text = refusal
        _send(conn, _response(conn.proto, status, PLAIN, text.encode()), method)
        return
    response = proto.accept(request)
    proto.send_response(response)
    conn.write_protocol_data()
    if proto.state is _OPEN:
        _drop_handshake(proto)
        conn.out = conn.transport
        conn.next_ping = handler.clock + handler.heartbeat_interval
        handler.opened(conn)


def _send(conn: Connection, response: Response, method: str) -> None:
    if method == "HEAD":
        # RFC 9110 9.3.2: the headers of the GET answer (Content-Length too), no body.
        response.body = b""
    conn.proto.send_response(response)
    conn.write_protocol_data()


def _drop_handshake(proto: ServerProtocol) -> None:
    """Let go of the HTTP request once the connection is open.

    ``ServerProtocol.parse`` is a generator that parses the request, then runs
    the frame parser (``Protocol.parse``) for the rest of the connection: its
    suspended frame keeps the request (headers, path, their strings) alive,
    about 1.8 KB of every idle connection's 6 KB. Between frames the frame
    parser holds no state of its own (it waits in ``StreamReader.at_eof`` at the
    top of its loop, on an empty buffer), so a fresh one started there is the
    same parser without the request. Anything else (bytes of a frame already
    read, another websockets version's layout) leaves the parser as it is.
    """
    outer = proto.parser
    frames = getattr(outer, "gi_yieldfrom", None)
    waiting = getattr(frames, "gi_yieldfrom", None)
    if (
        proto.reader.buffer
        or getattr(frames, "gi_code", None) is not _FRAME_PARSER.__code__
        or getattr(waiting, "gi_code", None) is not AT_EOF
    ):
        return
    outer.close()
    proto.parser = _FRAME_PARSER(proto)
    next(proto.parser)
    proto.id = _NO_ID


def _response(
    proto: ServerProtocol,
    status: int,
    content_type: str,
    body: bytes,
    extra: tuple[tuple[str, str], ...] = (),
) -> Response:
    """websockets' rejection (Date, ``Connection: close``, the status phrase) with
    our body, type and headers, modified as its documentation invites."""
    response = proto.reject(status, "")
    headers = response.headers
    del headers["Content-Length"], headers["Content-Type"]
    headers["Content-Length"] = str(len(body))
    headers["Content-Type"] = content_type
    headers["Cache-Control"] = "no-store"
    for name, value in (*_SECURITY_HEADERS, *extra):
        headers[name] = value
    response.body = body
    return response
