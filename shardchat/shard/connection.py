"""The connection adapter: websockets' Sans-I/O core driven by an asyncio.Protocol.

DESIGN.md, Connections: ``websockets.server.ServerProtocol`` does the HTTP
handshake, framing, close handshake, ping/pong and RFC checks; this module
feeds it bytes and writes what it produces, with no task, coroutine or timer
per connection (the shard's sweep calls :meth:`Connection.tick`). It is the
only module that imports websockets: the shard gets plain values from it
(the path, the query, a dict of headers, a text message's bytes).

HTTP conformance the Sans-I/O core leaves to its user is done here too (RFC
6455 4.2.1 and 4.4, RFC 9110/9112): exactly one ``Host``, one ``Origin`` and
one ``Authorization`` (else 400), 426 with ``Sec-WebSocket-Version: 13`` for
another version, 405 for methods other than GET and HEAD, no body on HEAD, and
an answer (413, 501, 400) to a request websockets cannot parse, which it would
otherwise only hang up on. Fragmented text messages are reassembled (RFC 6455
5.4; websockets checks the order of the frames and the size of the whole
message, control frames may come between fragments). Nothing a client sends
may raise out of ``data_received``: a failure there is logged as one line and
fails the connection with 1011, so that no input writes a traceback.

The fan-out rule lives here too: a ready frame may be written straight to the
transport, beside the Sans-I/O protocol, only while the protocol is OPEN and
no fragmented message of ours is in flight (we never fragment). ``out`` is the
transport exactly while that holds, and ``None`` otherwise, so the shard's
hot loop writes ``conn.out.write(buf)`` after one ``is not None`` test.
"""

from __future__ import annotations

import asyncio
import email.utils
import http
import logging
import traceback
import uuid
from collections import deque
from collections.abc import Iterator
from typing import Protocol as TypingProtocol
from typing import cast

from websockets.datastructures import Headers
from websockets.exceptions import InvalidMessage
from websockets.frames import Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import Protocol, State
from websockets.server import ServerProtocol

try:  # websockets' C unmasking, as its own frame parser uses it
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover - a build without the C extension
    from websockets.utils import apply_mask
from websockets.streams import StreamReader

from shardchat.core.messages import AppCloseCode
from shardchat.logs import log_event

__all__ = [
    "CLOSE_TIMEOUT",
    "HANDSHAKE_TIMEOUT",
    "SLOW_CLOSE_TIMEOUT",
    "TRANSPORT_HIGH",
    "Connection",
    "ConnectionHandler",
    "Writer",
]

_OPEN = State.OPEN
_CONNECTING = State.CONNECTING
_TEXT = Opcode.TEXT
_CONT = Opcode.CONT
_BINARY = Opcode.BINARY
_PONG = Opcode.PONG

# Seconds a client has to finish the opening handshake, counted from the
# connection's start however slowly its bytes arrive (slow-loris defence).
HANDSHAKE_TIMEOUT = 5.0
# Seconds the client has to answer our close frame before the TCP connection is aborted.
CLOSE_TIMEOUT = 5.0
# The same for a slow consumer's close 4429: its queue is dropped at the kick, so
# what it holds meanwhile is at most TRANSPORT_HIGH and the kernel's buffers, and a
# client that resumes reading within this long still finds the close frame.
SLOW_CLOSE_TIMEOUT = 60.0
# Bytes the transport itself may buffer for a client; beyond it frames wait in the
# connection's own queue (up to limits.send_queue), which can be dropped at once
# when the client is cut, so that the close frame is not stuck behind it.
TRANSPORT_HIGH = 65536


# What a connection keeps of websockets' state after the handshake: see
# _drop_handshake. The protocol's id (a fresh UUID each) is read by nothing.
_AT_EOF = StreamReader.at_eof.__code__
_FRAME_PARSER = Protocol.parse
_NO_ID = uuid.UUID(int=0)


class Writer(TypingProtocol):
    """Where the fan-out writes a ready frame: the transport, or the connection's queue."""

    def write(self, data: bytes) -> None: ...


_quiet_logger = logging.getLogger("websockets.server")
log = logging.getLogger(__name__)

# Headers a request must not repeat: an ambiguous Host, Origin, credential or
# version is refused rather than guessed (RFC 9110 5.3, RFC 6454 7.3).
_SINGLE_HEADERS = ("Host", "Origin", "Authorization", "Sec-WebSocket-Version")
# Security headers on every HTTP answer; the page adds its Content-Security-Policy.
_SECURITY_HEADERS = (("X-Content-Type-Options", "nosniff"), ("Referrer-Policy", "no-referrer"))


class ConnectionHandler(TypingProtocol):
    """What the shard provides to its connections."""

    clock: float  # loop time, refreshed by the shard at least once per sweep
    heartbeat_interval: float  # seconds between heartbeat pings
    max_frame: int  # largest incoming frame (close 1009 over it)
    send_queue: int  # bytes buffered for a client before close 4429
    page_csp: str  # Content-Security-Policy of the HTML answers of http_get

    def http_get(self, path: str) -> tuple[int, str, bytes]:
        """Answer a plain HTTP GET: status, content type and body."""

    def refuse_upgrade(
        self, conn: Connection, path: str, query: str, headers: dict[str, str]
    ) -> tuple[int, str] | None:
        """An HTTP status and text to refuse a WebSocket upgrade with, or None to accept.

        ``path`` is the request target with its query; ``headers`` as sent."""

    def opened(self, conn: Connection) -> None:
        """The handshake completed; the connection may send and receive."""

    def text_received(self, conn: Connection, data: bytes | bytearray | memoryview) -> None:
        """A complete text message arrived (its bytes, UTF-8 not yet validated)."""

    def closed(self, conn: Connection) -> None:
        """The TCP connection is gone; forget everything about ``conn``."""

    def slow_consumer(self, conn: Connection) -> None:
        """``conn`` has more than ``send_queue`` bytes waiting: close it with 4429
        soon, outside the write that found out."""


class Connection(asyncio.Protocol):
    """One client connection; per-connection state is kept to these slots."""

    __slots__ = (
        "_paused",
        "_queue",
        "_queued",
        "close_deadline",
        "conn_id",
        "fragments",
        "handler",
        "last_recv",
        "next_ping",
        "out",
        "peer",
        "ping_sent",
        "proto",
        "transport",
    )

    def __init__(self, handler: ConnectionHandler, conn_id: int) -> None:
        self.handler = handler
        self.conn_id = conn_id  # unique within the shard, for logs
        self.proto = ServerProtocol(max_size=handler.max_frame, logger=_quiet_logger)
        self.transport: asyncio.Transport | None = None
        # Where frames go while they may be written: the transport, or this connection
        # itself (its queue: the transport is full or a replay is being paced).
        self.out: Writer | None = None
        # Frames (and replays, as iterators of frames) waiting for the transport, and
        # the bytes of frames in it; None while frames go straight to the transport.
        self._queue: deque[bytes | Iterator[bytes]] | None = None
        self._queued = 0
        self._paused = False  # the transport holds more than TRANSPORT_HIGH
        self.peer = ""  # client IP address
        # A fragmented text message being reassembled (RFC 6455 5.4); None between messages.
        self.fragments: bytearray | None = None
        now = handler.clock
        self.last_recv = now  # time anything last arrived
        # When the next heartbeat ping is due; while connecting, the handshake deadline.
        self.next_ping = now + HANDSHAKE_TIMEOUT
        self.ping_sent = 0.0  # when the unanswered ping was sent; 0 = none outstanding
        self.close_deadline = 0.0  # abort the TCP connection after this; 0 = not closing

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if peer else ""
        # pause_writing() fires when more than this waits in the transport; then frames
        # queue here, up to send_queue bytes (a slow consumer beyond that).
        transport.set_write_buffer_limits(high=min(TRANSPORT_HIGH, self.handler.send_queue))

    def data_received(self, data: bytes) -> None:
        self.last_recv = self.handler.clock
        proto = self.proto
        # The hot path: the chunk is exactly one whole, small, masked, final text
        # frame with no reserved bits (no extension is ever negotiated), arriving
        # between frames (the frame parser waits at its loop's top on an empty
        # buffer), on an open connection with no fragmented message in flight.
        # websockets would do nothing with it but unmask it and hand it over: do
        # that here, and skip its generators. Anything else goes to websockets.
        if (
            data[:1] == b"\x81"
            and self.out is not None
            and self.fragments is None
            and proto.current_size is None
            and not proto.reader.buffer
            and getattr(proto.parser.gi_yieldfrom, "gi_code", None) is _AT_EOF  # type: ignore[attr-defined]
        ):
            size = len(data)
            n = data[1] - 0x80 if size > 1 else -1  # the mask bit must be set
            payload = None
            if 0 <= n < 126 and size == n + 6:
                payload = apply_mask(data[6:], data[2:6])
            elif (
                n == 126
                and size > 8
                and size == (data[2] << 8 | data[3]) + 8 <= self.handler.max_frame + 8
            ):
                payload = apply_mask(data[8:], data[4:8])
            if payload is not None:
                try:
                    self.handler.text_received(self, payload)
                except Exception as exc:
                    self._internal_error(exc)
                return
        proto.receive_data(data)
        events = proto.events_received()
        if proto.state is _CONNECTING and type(proto.handshake_exc) is InvalidMessage:
            if not self.close_deadline:  # answered once; the rest is discarded
                self._unparsable_request(proto.handshake_exc)
            return
        # Pongs and close replies first, so that they precede any frame we write.
        self._write_protocol_data()
        try:
            for event in events:
                if type(event) is Frame:
                    self._frame(event)
                elif type(event) is Request:
                    self._handshake(event)
        except Exception as exc:
            self._internal_error(exc)
        if self.out is not None and proto.state is not _OPEN:
            self.out = None
            self._queue = None

    def _internal_error(self, exc: Exception) -> None:
        # A bug, not the client's fault, but the client must not be able to
        # make the server write tracebacks: one line, and close with 1011.
        where = traceback.extract_tb(exc.__traceback__)[-1]
        log_event(
            log,
            logging.ERROR,
            "conn_internal_error",
            conn=self.conn_id,
            peer=self.peer,
            error=f"{type(exc).__name__}: {str(exc)[:200]}",
            where=f"{where.filename.rsplit('/', 1)[-1]}:{where.lineno}",
        )
        if self.proto.state is _CONNECTING:
            self._answer(500, "internal error\n")
        else:
            self.fail(1011, "internal error")

    def _frame(self, frame: Frame) -> None:
        opcode = frame.opcode
        if opcode is _TEXT:
            if frame.fin:
                self.handler.text_received(self, frame.data)
            else:
                self.fragments = bytearray(frame.data)
        elif opcode is _CONT:
            # websockets has checked that a message is being continued and that the
            # whole of it stays under max_size (1009 over it).
            fragments = self.fragments
            if fragments is None:
                return  # the continuation of a binary message, already failed
            fragments += frame.data
            if frame.fin:
                self.fragments = None
                self.handler.text_received(self, fragments)
        elif opcode is _BINARY:
            self.fail(1003, "binary frames are not supported")
        elif opcode is _PONG:
            self.ping_sent = 0.0

    def eof_received(self) -> bool | None:
        self.out = None
        self._queue = None
        self.proto.receive_eof()
        self._write_protocol_data()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.out = None
        self._queue = None
        self.handler.closed(self)
        self.transport = None
        # websockets' parser is a generator that refers to its protocol: a reference
        # cycle, which only the collector could free, and never once gc.freeze() has
        # moved it to the permanent generation. Closing the generator breaks it, so
        # that a closed connection is freed by its reference count.
        proto = self.proto
        proto.parser.close()
        proto.parser_exc = None

    def pause_writing(self) -> None:
        # The transport holds more than TRANSPORT_HIGH: frames queue here meanwhile.
        self._paused = True
        if self.out is self.transport and self.out is not None:
            self.out = self
            self._queue = deque()

    def resume_writing(self) -> None:
        self._paused = False
        if self._queue is not None:
            self._pump()

    # Sending

    def send(self, payload_frame: bytes) -> None:
        """Write one ready WebSocket frame (see :func:`shardchat.core.wire.text_frame`)."""
        out = self.out
        if out is not None:
            out.write(payload_frame)

    def write(self, data: bytes) -> None:
        """Queue frames while the transport is full or a replay is paced (``out`` is
        then this connection). PROTOCOL.md: over ``send_queue`` bytes, the client is
        too slow to read and is closed with 4429."""
        queue = self._queue
        if queue is None:
            return
        queue.append(data)
        self._queued += len(data)
        if self._queued > self.handler.send_queue:
            self._slow_consumer()

    def send_paced(self, frames: Iterator[bytes]) -> None:
        """Send a replay (``join`` with ``since``, ``history``) as fast as the client
        reads it: its frames go to the transport only while it is below
        TRANSPORT_HIGH, and do not count toward ``send_queue`` (the server holds
        them anyway); live frames queue behind it, and they do count."""
        if self.out is None:
            return
        if self._queue is None:
            self._queue = deque()
            self.out = self
        self._queue.append(frames)
        if not self._paused:
            self._pump()

    def _pump(self) -> None:
        """Move queued frames to the transport until it is full again or none are left."""
        queue = self._queue
        transport = self.transport
        if queue is None or transport is None:
            return
        write = transport.write
        while queue and not self._paused:
            head = queue[0]
            if type(head) is bytes:
                queue.popleft()
                self._queued -= len(head)
                write(head)
                continue
            assert not isinstance(head, bytes)
            for frame in head:
                write(frame)
                if self._paused:
                    break
            else:
                queue.popleft()
        if not queue and self.out is self and not self._paused:
            self._queue = None
            self._queued = 0
            self.out = transport

    def _slow_consumer(self) -> None:
        # Drop what is queued, so that the close frame follows at most TRANSPORT_HIGH
        # bytes; it goes out from the next loop turn, outside the write that got here.
        self._queue = None
        self._queued = 0
        self.out = None
        self.handler.slow_consumer(self)

    def close_slow(self) -> bool:
        """Close a slow consumer with 4429 (called by the shard, in a later turn);
        False when it is closing or gone already."""
        if self.transport is None or self.proto.state is not _OPEN:
            return False
        self.close_deadline = self.handler.clock + SLOW_CLOSE_TIMEOUT
        self.close(AppCloseCode.SLOW_CONSUMER, "slow consumer")
        return True

    def _flush_queue(self) -> None:
        """Before a close frame: what is queued goes first, whatever the transport holds."""
        queue, self._queue = self._queue, None
        self._queued = 0
        transport = self.transport
        if queue and transport is not None:
            for item in queue:
                if type(item) is bytes:
                    transport.write(item)
                else:
                    assert not isinstance(item, bytes)
                    for frame in item:
                        transport.write(frame)

    def close(self, code: int, reason: str) -> None:
        """Start the closing handshake; the sweep aborts it after CLOSE_TIMEOUT."""
        proto = self.proto
        self.out = None
        self._flush_queue()
        if proto.state is _OPEN:
            proto.send_close(code, reason)
            self._write_protocol_data()
        if self.transport is not None and not self.close_deadline:
            self.close_deadline = self.handler.clock + CLOSE_TIMEOUT

    def fail(self, code: int, reason: str) -> None:
        """Fail the connection (RFC 6455 7.1.7): close frame, then close TCP."""
        self.out = None
        self._queue = None
        self.proto.fail(code, reason)
        self._write_protocol_data()
        if self.transport is not None and not self.close_deadline:
            self.close_deadline = self.handler.clock + CLOSE_TIMEOUT

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    @property
    def is_open(self) -> bool:
        return self.proto.state is _OPEN

    @property
    def close_code(self) -> int:
        """The code the connection closed with: ours if we closed it first, else the
        client's, else 1006 (no close frame either way)."""
        proto = self.proto
        if proto.close_sent is not None and not proto.close_rcvd_then_sent:
            return int(proto.close_sent.code)
        if proto.close_rcvd is not None:
            return int(proto.close_rcvd.code)
        return 1006

    @property
    def close_reason(self) -> str:
        proto = self.proto
        if proto.close_sent is not None and not proto.close_rcvd_then_sent:
            return proto.close_sent.reason
        if proto.close_rcvd is not None:
            return proto.close_rcvd.reason
        return ""

    def tick(self, now: float, interval: float, timeout: float, idle: float) -> None:
        """The shard's sweep: handshake, heartbeat, idle and close timeouts."""
        if self.close_deadline:
            if now >= self.close_deadline:
                self.abort()
            return
        state = self.proto.state
        if state is _CONNECTING:
            if now >= self.next_ping:
                if self.transport is None:
                    # A TLS handshake that failed never reached connection_made, and
                    # no connection_lost will come: forget the connection here.
                    self.handler.closed(self)
                else:
                    self.abort()
            return
        if state is not _OPEN:
            return
        if idle and now - self.last_recv >= idle:
            self.close(AppCloseCode.HEARTBEAT_TIMEOUT, "idle timeout")
        elif self.ping_sent:
            if now - self.ping_sent >= timeout:
                self.fail(AppCloseCode.HEARTBEAT_TIMEOUT, "heartbeat timeout")
        elif now >= self.next_ping:
            self.ping_sent = now
            self.next_ping = now + interval
            self.proto.send_ping(b"")
            self._write_protocol_data()

    # Internals

    def _write_protocol_data(self) -> None:
        transport = self.transport
        if transport is None:
            return
        for data in self.proto.data_to_send():
            if data:
                transport.write(data)
            else:
                self.out = None  # nothing may follow our EOF
                self._queue = None
                self._half_close(transport)

    def _half_close(self, transport: asyncio.Transport) -> None:
        # SEND_EOF. Half-close and let the client close its side: closing
        # outright while the client still sends would reset the connection
        # and could destroy the close frame unread in its receive buffer.
        if transport.can_write_eof():
            transport.write_eof()
        else:
            transport.close()  # TLS: no half-close
        if not self.close_deadline:
            self.close_deadline = self.handler.clock + CLOSE_TIMEOUT

    def _unparsable_request(self, exc: InvalidMessage) -> None:
        """websockets could not parse the request and only queued its EOF: answer it."""
        for _ in self.proto.data_to_send():
            pass  # the EOF; _answer half-closes after its response
        cause = exc.__cause__
        if isinstance(cause, NotImplementedError):  # Transfer-Encoding
            status, text = 501, "transfer codings are not supported"
        elif isinstance(cause, ValueError) and "body" in str(cause):
            status, text = 413, "requests must not have a body"
        else:
            status, text = 400, "not a valid HTTP/1.1 request"
        self._refused(status, text)

    def _refused(self, status: int, text: str) -> None:
        log_event(
            log,
            logging.INFO,
            "http_refused",
            conn=self.conn_id,
            peer=self.peer,
            status=status,
            reason=text,
        )
        self._answer(status, text + "\n")

    def _answer(self, status: int, text: str, extra: tuple[tuple[str, str], ...] = ()) -> None:
        """Write a plain-text HTTP answer outside the Sans-I/O core and half-close."""
        transport = self.transport
        if transport is None:
            return
        transport.write(_response(status, _PLAIN, text.encode(), extra).serialize())
        self._half_close(transport)

    def _handshake(self, request: Request) -> None:
        proto = self.proto
        handler = self.handler
        headers = request.headers
        path, _, query = request.path.partition("?")
        for name in _SINGLE_HEADERS:
            count = len(headers.get_all(name))
            if count > 1:
                self._refused(400, f"more than one {name} header")
                return
            # RFC 9112 3.2 (HTTP/1.1) and RFC 6455 4.1 (every upgrade): Host is required.
            if not count and name == "Host" and (path == "/ws" or request.protocol != "HTTP/1.0"):
                self._refused(400, "a Host header is required")
                return
        method = request.method
        if method not in ("GET", "HEAD") or (path == "/ws" and method == "HEAD"):
            allow = "GET" if path == "/ws" else "GET, HEAD"
            self._send(_response(405, _PLAIN, b"method not allowed\n", (("Allow", allow),)), method)
            return
        if path != "/ws":
            status, content_type, body = handler.http_get(path)
            extra = (
                (("Content-Security-Policy", handler.page_csp),) if "html" in content_type else ()
            )
            self._send(_response(status, content_type, body, extra), method)
            return
        version = headers.get("Sec-WebSocket-Version")
        if version is not None and version != "13":
            # RFC 6455 4.4: say which version this server speaks.
            self._send(
                _response(
                    426,
                    _PLAIN,
                    b"only WebSocket version 13 is supported\n",
                    (("Sec-WebSocket-Version", "13"), ("Upgrade", "websocket")),
                ),
                method,
            )
            return
        sent = {name: value for name, value in request.headers.raw_items()}
        refusal = handler.refuse_upgrade(self, request.path, query, sent)
        if refusal is not None:
            status, text = refusal
            self._send(_response(status, _PLAIN, text.encode()), method)
            return
        response = proto.accept(request)
        proto.send_response(response)
        self._write_protocol_data()
        if proto.state is _OPEN:
            _drop_handshake(proto)
            self.out = self.transport
            self.next_ping = handler.clock + handler.heartbeat_interval
            handler.opened(self)

    def _send(self, response: Response, method: str) -> None:
        if method == "HEAD":
            # RFC 9110 9.3.2: the headers of the GET answer (Content-Length too), no body.
            response.body = b""
        self.proto.send_response(response)
        self._write_protocol_data()


_PLAIN = "text/plain; charset=utf-8"


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
        or getattr(waiting, "gi_code", None) is not _AT_EOF
    ):
        return
    outer.close()
    proto.parser = _FRAME_PARSER(proto)
    next(proto.parser)
    proto.id = _NO_ID


def _response(
    status: int, content_type: str, body: bytes, extra: tuple[tuple[str, str], ...] = ()
) -> Response:
    phrase = http.HTTPStatus(status).phrase
    headers = Headers(
        [
            ("Date", email.utils.formatdate(usegmt=True)),
            ("Connection", "close"),
            ("Content-Length", str(len(body))),
            ("Content-Type", content_type),
            ("Cache-Control", "no-store"),
            *_SECURITY_HEADERS,
            *extra,
        ]
    )
    return Response(status, phrase, headers, body)
