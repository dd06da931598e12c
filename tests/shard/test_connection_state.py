"""What an open connection keeps of websockets' state, driven without a server.

The adapter lets go of the HTTP request once the handshake is done (it restarts
websockets' frame parser between frames): an idle connection then holds a
fraction of the memory, and messages that arrive with the request, whole or cut
anywhere, still parse exactly as before.
"""

from __future__ import annotations

import gc
import json
import os
import tracemalloc
from typing import Any

import pytest
from websockets.protocol import Protocol

from shardchat.shard.connection import Connection
from shardchat.testing.rawws import ZERO_MASK, encode_frame, upgrade_request


class Transport:
    def __init__(self) -> None:
        self.written: list[bytes] = []

    def get_extra_info(self, name: str) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else None

    def set_write_buffer_limits(self, high: int) -> None:
        pass

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        pass

    def abort(self) -> None:
        pass


class Handler:
    clock = 0.0
    heartbeat_interval = 30.0
    max_frame = 65536
    send_queue = 1 << 20
    page_csp = ""
    api_on_main = False

    def __init__(self) -> None:
        self.texts: list[bytes] = []

    def http_get(self, path: str) -> tuple[int, str, bytes]:
        return 404, "text/plain", b""

    def refuse_upgrade(self, *args: object) -> None:
        return None

    def opened(self, conn: Connection) -> None:
        pass

    def text_received(self, conn: Connection, data: bytes | bytearray | memoryview) -> None:
        self.texts.append(bytes(data))

    def closed(self, conn: Connection) -> None:
        pass

    def slow_consumer(self, conn: Connection) -> None:
        pass


def opened(handler: Handler, first: bytes) -> Connection:
    conn = Connection(handler, 1)
    conn.connection_made(Transport())  # type: ignore[arg-type]
    conn.data_received(first)
    assert conn.is_open
    return conn


REQUEST = upgrade_request("/ws?user=a", "127.0.0.1:8080")


def test_an_open_connection_runs_the_bare_frame_parser() -> None:
    conn = opened(Handler(), REQUEST)
    assert conn.proto.parser.gi_code is Protocol.parse.__code__  # type: ignore[attr-defined]


@pytest.mark.parametrize("cut", [0, 1, 2, 3, 5, 8, 20])
def test_messages_sent_with_the_request_parse_wherever_the_bytes_are_cut(cut: int) -> None:
    handler = Handler()
    messages = [json.dumps({"type": "ping", "id": str(i)}).encode() * 5 for i in range(3)]
    stream = b"".join(encode_frame(m, mask=os.urandom(4)) for m in messages)
    conn = opened(handler, REQUEST + stream[:cut])
    for i in range(cut, len(stream), 7):
        conn.data_received(stream[i : i + 7])
    assert handler.texts == messages
    assert conn.is_open


def test_an_idle_open_connection_holds_little_of_websockets() -> None:
    handler = Handler()
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        conns = [opened(handler, REQUEST) for _ in range(200)]
        gc.collect()
        per_conn = (tracemalloc.get_traced_memory()[0] - before) / len(conns)
    finally:
        tracemalloc.stop()
    # The request's headers and strings alone were about 1.8 KB of it.
    assert per_conn < 2500, per_conn


def test_each_whole_frame_in_its_own_chunk_is_delivered_once_in_order() -> None:
    handler = Handler()
    conn = opened(handler, REQUEST)
    messages = [b'{"type":"ping"}', b"x" * 125, b"y" * 126, b"z" * 1000, b""]
    fed: list[bytes] = []
    receive = conn.proto.receive_data
    conn.proto.receive_data = lambda data: (fed.append(data), receive(data))[1]  # type: ignore[method-assign]
    for message in messages:
        conn.data_received(encode_frame(message, mask=b"abcd"))
    assert handler.texts == messages
    assert fed == []  # none of them needed websockets' parser


def test_a_payload_that_looks_like_a_frame_is_still_the_payload() -> None:
    """The second chunk is a whole masked text frame by its bytes, but the parser
    is inside a frame whose header came in the first: it is that frame's payload."""
    handler = Handler()
    conn = opened(handler, REQUEST)
    wire_payload = encode_frame(b"no", mask=ZERO_MASK)  # 8 bytes: 81 82 00 00 00 00 n o
    mask = b"\x11\x22\x33\x44"
    conn.data_received(bytes([0x81, 0x80 | len(wire_payload)]) + mask)
    conn.data_received(wire_payload)
    assert handler.texts == [bytes(b ^ mask[i % 4] for i, b in enumerate(wire_payload))]
    conn.data_received(encode_frame(b"after", mask=mask))
    assert handler.texts[1:] == [b"after"]


def test_an_unmasked_or_reserved_bit_frame_still_fails_the_connection() -> None:
    for first in (bytes([0x81, 0x02]) + b"hi", bytes([0xC1, 0x82]) + b"abcd" + b"hi"):
        handler = Handler()
        conn = opened(handler, REQUEST)
        conn.data_received(first)
        assert handler.texts == [] and not conn.is_open
        assert conn.close_code == 1002


class Failing(Handler):
    def text_received(self, conn: Connection, data: bytes | bytearray | memoryview) -> None:
        raise RuntimeError("a bug")


def test_a_bug_under_a_small_frame_fails_the_connection_with_1011_and_raises_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    conn = opened(Failing(), REQUEST)
    conn.data_received(encode_frame(b'{"type":"ping"}', mask=b"abcd"))  # must not raise
    assert not conn.is_open and conn.close_code == 1011
    assert [r.message for r in caplog.records].count("conn_internal_error") == 1
