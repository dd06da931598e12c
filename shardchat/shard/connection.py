"""The connection adapter: websockets' Sans-I/O core driven by an asyncio.Protocol.

``websockets.server.ServerProtocol`` does the HTTP handshake, framing, close
handshake, ping/pong and RFC checks; this module feeds it bytes and writes
what it produces, with no task, coroutine or timer per connection (the
shard's sweep calls :meth:`Connection.tick`). With :mod:`handshake` (the
handshake's HTTP) and :mod:`sendqueue` (frames waiting for the transport) it
is the only part of the server that imports websockets: the shard gets plain
values from it (the path, the query, a dict of headers, a text message's
bytes).

Fragmented text messages are reassembled (RFC 6455 5.4; websockets checks
the order of the frames and the size of the whole message, control frames
may come between fragments). Nothing a client sends may raise out of
``data_received``: a failure there is logged as one line and fails the
connection with 1011, so that no input writes a traceback.
"""

from __future__ import annotations

import asyncio
import logging
import traceback
from typing import Protocol as TypingProtocol
from typing import cast

from websockets.exceptions import InvalidMessage
from websockets.frames import Frame, Opcode
from websockets.http11 import Request
from websockets.protocol import State
from websockets.server import ServerProtocol

try:  # websockets' C unmasking, as its own frame parser uses it
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover - a build without the C extension
    from websockets.utils import apply_mask

from shardchat.core.config import HANDSHAKE_DEADLINE
from shardchat.core.messages import AppCloseCode
from shardchat.logs import log_event
from shardchat.shard.apihttp import is_api_request
from shardchat.shard.handshake import AT_EOF, Later, answer, handshake, unparsable_request
from shardchat.shard.sendqueue import TRANSPORT_HIGH, SendQueue, Writer

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
_AT_EOF = AT_EOF

# Seconds a client has to finish the opening handshake, counted from the
# connection's start however slowly its bytes arrive (slow-loris defence).
HANDSHAKE_TIMEOUT = HANDSHAKE_DEADLINE  # 5 s; the connect proxy's timeout is under it
# Seconds the client has to answer our close frame before the TCP connection is aborted.
CLOSE_TIMEOUT = 5.0
# The same for a slow consumer's close 4429: its queue is dropped at the kick, so
# what it holds meanwhile is at most TRANSPORT_HIGH and the kernel's buffers, and a
# client that resumes reading within this long still finds the close frame.
SLOW_CLOSE_TIMEOUT = 60.0

_quiet_logger = logging.getLogger("websockets.server")
log = logging.getLogger(__name__)


class ConnectionHandler(TypingProtocol):
    """What the shard provides to its connections."""

    clock: float  # loop time, refreshed by the shard at least once per sweep
    heartbeat_interval: float  # seconds between heartbeat pings
    max_frame: int  # largest incoming frame (close 1009 over it)
    send_queue: int  # bytes buffered for a client before close 4429
    page_csp: str  # Content-Security-Policy of the HTML answers of http_get
    api_on_main: bool  # requests for /api/ on this port go to the server API

    def api_takeover(self, conn: Connection, head: bytes) -> None:
        """``conn``'s first bytes (``head``) ask for /api/: hand its transport over."""

    def http_get(self, path: str) -> tuple[int, str, bytes]:
        """Answer a plain HTTP GET: status, content type and body."""

    def refuse_upgrade(
        self, conn: Connection, path: str, query: str, headers: dict[str, str]
    ) -> tuple[int, str] | Later | None:
        """An HTTP status and text to refuse a WebSocket upgrade with, or None to accept,
        or a :class:`~shardchat.shard.handshake.Later` to answer in a later turn.

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


class Connection(SendQueue, asyncio.Protocol):
    """One client connection; per-connection state is kept to these slots."""

    __slots__ = (
        "close_deadline",
        "conn_id",
        "fragments",
        "handler",
        "last_recv",
        "next_ping",
        "peer",
        "ping_sent",
        "proto",
        "routing",
        "transport",
    )

    def __init__(self, handler: ConnectionHandler, conn_id: int) -> None:
        self.handler = handler
        self.conn_id = conn_id  # unique within the shard, for logs
        self.proto = ServerProtocol(max_size=handler.max_frame, logger=_quiet_logger)
        self.transport: asyncio.Transport | None = None
        SendQueue.__init__(self)
        # Until the request line tells: a request for /api/ goes to the server API.
        self.routing = handler.api_on_main
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
        if self.routing:
            # websockets holds the request line's bytes until it is whole.
            head = bytes(proto.reader.buffer) + data
            to_api = is_api_request(head)
            if to_api is not None:
                self.routing = False
                if to_api:
                    self.handler.api_takeover(self, head)
                    return
        proto.receive_data(data)
        events = proto.events_received()
        if proto.state is _CONNECTING and type(proto.handshake_exc) is InvalidMessage:
            if not self.close_deadline:  # answered once; the rest is discarded
                unparsable_request(self, proto.handshake_exc)
            return
        # Pongs and close replies first, so that they precede any frame we write.
        self.write_protocol_data()
        try:
            for event in events:
                if type(event) is Frame:
                    self._frame(event)
                elif type(event) is Request:
                    handshake(self, event)
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
            answer(self, 500, "internal error\n")
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

    def handed_over(self) -> None:
        """The server API took the transport: let go of websockets' state."""
        self.transport = None
        self.out = None
        self._queue = None
        proto = self.proto
        proto.parser.close()  # the generator's reference cycle (see connection_lost)
        proto.parser_exc = None

    def eof_received(self) -> bool | None:
        self.out = None
        self._queue = None
        self.proto.receive_eof()
        self.write_protocol_data()
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

    def close_slow(self) -> bool:
        """Close a slow consumer with 4429 (called by the shard, in a later turn);
        False when it is closing or gone already."""
        if self.transport is None or self.proto.state is not _OPEN:
            return False
        self.close_deadline = self.handler.clock + SLOW_CLOSE_TIMEOUT
        self.close(AppCloseCode.SLOW_CONSUMER, "slow consumer")
        return True

    def close(self, code: int, reason: str) -> None:
        """Start the closing handshake; the sweep aborts it after CLOSE_TIMEOUT."""
        proto = self.proto
        self.out = None
        self._flush_queue()
        if proto.state is _OPEN:
            proto.send_close(code, reason)
            self.write_protocol_data()
        if self.transport is not None and not self.close_deadline:
            self.close_deadline = self.handler.clock + CLOSE_TIMEOUT

    def fail(self, code: int, reason: str) -> None:
        """Fail the connection (RFC 6455 7.1.7): close frame, then close TCP."""
        self.out = None
        self._queue = None
        self.proto.fail(code, reason)
        self.write_protocol_data()
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
            self.write_protocol_data()

    # Internals

    def write_protocol_data(self) -> None:
        transport = self.transport
        if transport is None:
            return
        for data in self.proto.data_to_send():
            if data:
                transport.write(data)
            else:
                self.out = None  # nothing may follow our EOF
                self._queue = None
                self.half_close(transport)

    def half_close(self, transport: asyncio.Transport) -> None:
        # SEND_EOF. Half-close and let the client close its side: closing
        # outright while the client still sends would reset the connection
        # and could destroy the close frame unread in its receive buffer.
        if transport.can_write_eof():
            transport.write_eof()
        else:
            transport.close()  # TLS: no half-close
        if not self.close_deadline:
            self.close_deadline = self.handler.clock + CLOSE_TIMEOUT
