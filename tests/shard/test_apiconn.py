"""The API connection's reading: a request held behind an unanswered one stops the
reading until it is taken, so that a client's bytes never pile up unparsed."""

from __future__ import annotations

from typing import Any

from shardchat.core.errors import ApiError
from shardchat.shard.apiconn import Answer, ApiConnection

KEY = b"k" * 32


class Transport:
    def __init__(self) -> None:
        self.paused = False
        self.written = b""
        self.closed = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 1) if name == "peername" else default

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def write(self, data: bytes) -> None:
        self.written += data

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


class Handler:
    clock = 0.0
    max_frame = 65536
    api_key = KEY

    def __init__(self) -> None:
        self.calls: list[tuple[str, Answer]] = []

    def api_call(self, conn: ApiConnection, method: str, body: bytes, answer: Answer) -> None:
        self.calls.append((method, answer))  # answered later, by the test

    def api_refused(self, conn: ApiConnection, method: str, exc: ApiError) -> None:
        raise AssertionError(exc)

    def api_closed(self, conn: ApiConnection) -> None:
        pass


def request(method: str) -> bytes:
    return (
        f"POST /api/{method} HTTP/1.1\r\nHost: x\r\nX-API-Key: {KEY.decode()}\r\n"
        "Content-Length: 2\r\n\r\n{}"
    ).encode()


def test_a_held_request_pauses_reading_until_it_is_taken() -> None:
    handler = Handler()
    transport = Transport()
    conn = ApiConnection(handler, 1)  # type: ignore[arg-type]
    conn.connection_made(transport)  # type: ignore[arg-type]
    conn.data_received(request("info") + request("rooms"))
    assert [m for m, _ in handler.calls] == ["info"]  # rooms waits for info's answer
    assert transport.paused
    handler.calls[0][1](200, b'{"result":1}')
    assert [m for m, _ in handler.calls] == ["info", "rooms"]
    assert not transport.paused
    handler.calls[1][1](200, b'{"result":2}')
    assert transport.written.count(b"HTTP/1.1 200 OK") == 2
    assert transport.written.index(b'{"result":1}') < transport.written.index(b'{"result":2}')
    assert not transport.closed
