"""The end of a shard's turn: replies and room frames, one write per connection."""

from __future__ import annotations

from typing import Any

from shardchat.core.outputs import Close
from shardchat.shard.writer import write_turn


class Conn:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.out = self
        self.closed: list[int] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def close(self, code: int, reason: str) -> None:
        self.closed.append(code)

    def fail(self, code: int, reason: str) -> None:
        self.closed.append(code)


def test_a_senders_ack_and_its_rooms_frames_go_in_one_write_ack_first() -> None:
    a, b, c, gone = Conn(), Conn(), Conn(), Conn()
    gone.out = None  # type: ignore[assignment]
    out: list[Any] = [((a,), b"ack1"), ((c,), b"err"), ((a,), b"ack2"), ((gone,), b"x")]
    rooms: list[Any] = [({a: 1, b: 1, gone: 1}, b"room-r"), ({a: 1}, b"room-s")]
    write_turn(out, rooms)
    assert a.writes == [b"ack1ack2room-r", b"room-s"]
    assert b.writes == [b"room-r"]
    assert c.writes == [b"err"]  # in no room: its reply still goes
    assert gone.writes == []


def test_a_close_among_the_replies_keeps_the_plain_order() -> None:
    a = Conn()
    out: list[Any] = [((a,), b"ack"), ((a,), Close(4000, "bye"))]
    write_turn(out, [({a: 1}, b"room")])
    assert a.writes == [b"ack", b"room"] and a.closed == [4000]
