"""The connection's own queue behind a full transport (no sockets: a fake transport
that pauses its protocol like uvloop's does)."""

from __future__ import annotations

import asyncio
from typing import Any

from shardchat.shard.connection import TRANSPORT_HIGH, Connection


class FakeHandler:
    clock = 0.0
    heartbeat_interval = 30.0
    max_frame = 65536
    send_queue = 4 * TRANSPORT_HIGH
    page_csp = ""
    api_on_main = False

    def http_get(self, path: str) -> tuple[int, str, bytes]:
        raise AssertionError

    def refuse_upgrade(
        self, conn: Connection, path: str, query: str, headers: dict[str, str]
    ) -> None:
        return None

    def opened(self, conn: Connection) -> None:
        pass

    def text_received(self, conn: Connection, data: Any) -> None:
        pass

    def closed(self, conn: Connection) -> None:
        pass

    def slow_consumer(self, conn: Connection) -> None:
        asyncio.get_running_loop().call_soon(conn.close_slow)


class FakeTransport:
    """Buffers everything; pauses the protocol over its high-water mark, like uvloop."""

    def __init__(self, protocol: Connection) -> None:
        self.protocol = protocol
        self.buffered = 0
        self.high = 0
        self.paused = False
        self.written: list[bytes] = []

    def get_extra_info(self, name: str) -> Any:
        return ("127.0.0.1", 1)

    def set_write_buffer_limits(self, high: int) -> None:
        self.high = high

    def write(self, data: bytes) -> None:
        self.written.append(data)
        self.buffered += len(data)
        if not self.paused and self.buffered > self.high:
            self.paused = True
            self.protocol.pause_writing()

    def drain(self, nbytes: int) -> None:
        """The client read ``nbytes``."""
        self.buffered = max(0, self.buffered - nbytes)
        if self.paused and self.buffered <= self.high // 4:
            self.paused = False
            self.protocol.resume_writing()


def open_connection() -> tuple[Connection, FakeTransport]:
    conn = Connection(FakeHandler(), 1)
    transport = FakeTransport(conn)
    conn.connection_made(transport)  # type: ignore[arg-type]
    conn.out = transport  # type: ignore[assignment]  # as after the upgrade
    return conn, transport


def test_frames_queue_while_the_transport_is_full_and_keep_their_order() -> None:
    conn, transport = open_connection()
    frames = [bytes([i % 256]) * 1000 for i in range(200)]
    for frame in frames[:100]:
        conn.out.write(frame)  # type: ignore[union-attr]
    assert conn.out is conn  # paused: frames wait in the connection
    for frame in frames[100:]:
        conn.send(frame)
    while conn.out is conn:
        transport.drain(TRANSPORT_HIGH)
    assert transport.written == frames


async def test_queue_still_bounded_when_it_ran_empty_while_paused() -> None:
    """The pump empties the queue but the transport is over its mark again: frames must
    keep queueing (and count towards send_queue), not go to the paused transport."""
    conn, transport = open_connection()
    big = b"x" * (TRANSPORT_HIGH // 2)
    for _ in range(6):
        conn.send(big)  # three fill the transport (the third pauses it), three queue
    assert conn.out is conn
    transport.drain(transport.buffered)  # resume: the pump's third write pauses it again
    assert transport.paused
    sent = 0
    while conn.out is not None and sent < 100:
        conn.send(big)
        sent += 1
    assert conn.out is None, "never cut: a paused transport took frames without limit"
    assert sent * len(big) <= FakeHandler.send_queue + len(big)
    await asyncio.sleep(0)  # the 4429 goes out from the next loop turn


def test_paced_replay_is_not_counted_and_goes_first() -> None:
    conn, transport = open_connection()
    replay = [b"r" * 1000 for _ in range(1000)]  # 1 MB: far over send_queue
    conn.send_paced(iter(replay))
    conn.send(b"live")
    assert conn.out is conn
    while conn.out is conn:
        transport.drain(TRANSPORT_HIGH)
    assert transport.written == [*replay, b"live"]
