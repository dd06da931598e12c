"""A connection's send queue: frames wait here while its transport is full or a
replay is paced, and a client that lets more than ``send_queue`` bytes pile up
is a slow consumer (close 4429, PROTOCOL.md).

The fan-out rule: a ready frame may be written straight to the transport,
beside the Sans-I/O protocol, only while the protocol is OPEN and no
fragmented message of ours is in flight (we never fragment). ``out`` is the
transport exactly while that holds and nothing is queued, this connection
(its queue) while frames must wait, and ``None`` otherwise, so the shard's hot
loop writes ``conn.out.write(buf)`` after one ``is not None`` test.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Iterator
from typing import TYPE_CHECKING, cast
from typing import Protocol as TypingProtocol

if TYPE_CHECKING:
    from shardchat.shard.connection import Connection, ConnectionHandler

__all__ = ["TRANSPORT_HIGH", "SendQueue", "Writer"]

# Bytes the transport itself may buffer for a client; beyond it frames wait in the
# connection's own queue (up to limits.send_queue), which can be dropped at once
# when the client is cut, so that the close frame is not stuck behind it.
TRANSPORT_HIGH = 65536


class Writer(TypingProtocol):
    """Where the fan-out writes a ready frame: the transport, or the connection's queue."""

    def write(self, data: bytes) -> None: ...


class SendQueue:
    """The sending half of :class:`~shardchat.shard.connection.Connection` (its slots)."""

    __slots__ = ("_paused", "_queue", "_queued", "out")

    handler: ConnectionHandler  # the connection's slots, read here
    transport: asyncio.Transport | None

    def __init__(self) -> None:
        # Where frames go while they may be written: the transport, or this connection
        # itself (its queue: the transport is full or a replay is being paced).
        self.out: Writer | None = None
        # Frames (and replays, as iterators of frames) waiting for the transport, and
        # the bytes of frames in it; None while frames go straight to the transport.
        self._queue: deque[bytes | Iterator[bytes]] | None = None
        self._queued = 0
        self._paused = False  # the transport holds more than TRANSPORT_HIGH

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
        self.handler.slow_consumer(cast("Connection", self))

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
