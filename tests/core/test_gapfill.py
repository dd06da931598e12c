"""Gap fill on its own: what an engine asks its broker for while a room is held back."""

from __future__ import annotations

from typing import cast

from shardchat.core.broker import Broker
from shardchat.core.gapfill import GapFill
from shardchat.core.roomlog import RoomLog
from shardchat.stats import BLOCK_SLOTS

ROOM = "lobby"


class Fills:
    """A broker that only records the ranges asked for."""

    def __init__(self) -> None:
        self.asked: list[tuple[int, int]] = []

    def fill(self, room: str, first: int, last: int) -> None:
        self.asked.append((first, last))

    def latest_seq(self, room: str) -> int | None:
        return None

    def epoch_of(self, room: str) -> str | None:
        return None


def gap_fill() -> tuple[GapFill, Fills, RoomLog, list[bytes]]:
    broker = Fills()
    log_ = RoomLog("e", 100)
    delivered: list[bytes] = []
    gaps = GapFill(
        cast(Broker, broker),
        {ROOM: log_},
        lambda room, json: delivered.append(json),
        [0] * BLOCK_SLOTS,
        "e",
        100,
    )
    return gaps, broker, log_, delivered


def test_a_second_hole_while_held_back_is_asked_for_at_the_chunks_end() -> None:
    gaps, broker, log_, delivered = gap_fill()
    gaps.hold_back(log_, ROOM, 5, b"5", 0.0)  # 1..4 missing
    gaps.hold_back(log_, ROOM, 7, b"7", 0.0)  # and 6
    assert broker.asked == [(1, 4)]
    for seq in range(1, 5):
        gaps.on_replay(ROOM, seq, str(seq).encode())
    gaps.on_end(ROOM, 0.1)
    assert broker.asked == [(1, 4), (6, 6)]  # the hole past the first range
    gaps.on_replay(ROOM, 6, b"6")
    gaps.on_end(ROOM, 0.2)
    assert delivered == [str(seq).encode() for seq in range(1, 8)]
    assert not gaps.held_back
