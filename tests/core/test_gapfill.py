"""Gap fill: what an engine asks its broker for while a room is parked, and how
every hold ends (filled, or announced to the members as a ``gap``)."""

from __future__ import annotations

from typing import cast

from shardchat.core.broker import Broker
from shardchat.core.gapfill import GAP_GIVE_UP, GAP_JOIN_WAIT, GapFill
from shardchat.core.roomlog import RoomLog
from shardchat.stats import BLOCK_SLOTS
from tests.core.box import Box, Fills, config, covered, owner_and_peer

ROOM = "lobby"
FAST = {"limits__rate": 100_000.0, "limits__burst": 100_000}


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


def test_a_second_hole_while_parked_is_asked_for_at_the_chunks_end() -> None:
    gaps, broker, log_, delivered = gap_fill()
    gaps.park(log_, ROOM, 5, b"5", 0.0)  # 1..4 missing
    gaps.park(log_, ROOM, 7, b"7", 0.0)  # and 6
    assert broker.asked == [(1, 4)]
    for seq in range(1, 5):
        gaps.on_replay(ROOM, seq, str(seq).encode())
    gaps.on_end(ROOM, 0.1)
    assert broker.asked == [(1, 4), (6, 6)]  # the hole past the first range
    gaps.on_replay(ROOM, 6, b"6")
    gaps.on_end(ROOM, 0.2)
    assert delivered == [str(seq).encode() for seq in range(1, 8)]
    assert not gaps.parked


def test_a_chunk_answering_a_replaced_request_asks_for_nothing() -> None:
    """A lap asks again while a request is out: the older request's answer, which
    brings nothing new, must not start a second chain of requests."""
    gaps, broker, log_, _ = gap_fill()
    gaps.park(log_, ROOM, 5, b"5", 0.0)
    gaps.resync(lambda room: 10, 0.1)  # a lap: asked again, up to the latest
    assert broker.asked == [(1, 4), (1, 10)]
    for seq in (1, 2):  # the first request's chunk
        gaps.on_replay(ROOM, seq, str(seq).encode())
    gaps.on_end(ROOM, 0.2)
    assert broker.asked[-1] == (3, 10)
    for seq in (1, 2):  # the second request's chunk: nothing new
        gaps.on_replay(ROOM, seq, str(seq).encode())
    gaps.on_end(ROOM, 0.3)
    assert broker.asked == [(1, 4), (1, 10), (3, 10)]


# On engines wired by rings (tests/core/box.py)


def held_on_bob(box: Box, room: str, seqs: range) -> None:
    """Shard 1 hears ``seqs`` of ``room`` (the ones before are missing); its owner,
    shard 0, is stopped: nothing answers the fill."""
    box.stopped.add(0)
    engine = box.engines[1]
    engine.advance(box.now, box.wall)
    for seq in seqs:
        json = b'{"type":"message","room":"%s","seq":%d}' % (room.encode(), seq)
        engine.on_message(room, seq, f"m{seq}", json, 0)
    box.turn()


def test_more_held_than_any_holder_keeps_is_given_up_at_once() -> None:
    box = Box(2, config(delivery__history=10, **FAST))
    room, _, bob = owner_and_peer(box, None)
    held_on_bob(box, room, range(5, 15))  # 10 held: the owner may still have 1..4
    assert bob.frames == []
    held_on_bob(box, room, range(15, 16))  # 11: more than the owner keeps
    assert bob.frames[0] == {"type": "gap", "room": room, "first": 1, "last": 4}
    assert covered(bob, room) == list(range(1, 16))
    assert not box.engines[1].gaps.parked


def test_a_join_on_a_held_room_is_answered_within_the_join_wait() -> None:
    box = Box(2, config(**FAST))
    room, _, bob = owner_and_peer(box, None)
    held_on_bob(box, room, range(5, 7))
    carol = box.connect(1, "carol")
    box.send(carol, type="join", room=room, since=0)
    box.turn()
    assert carol.take("joined") == []  # waits for the fill
    box.advance(GAP_JOIN_WAIT / 2)
    assert carol.take("joined") == []
    box.advance(GAP_JOIN_WAIT / 2)
    (joined,) = carol.take("joined")
    assert joined["seq"] == 0
    assert box.engines[1].gaps.parked  # the fill goes on, for carol too
    box.send(carol, type="history", room=room)
    box.turn()
    assert carol.take("history_end") == []
    box.advance(GAP_JOIN_WAIT)
    assert carol.take("history_end")  # answered within the wait as well
    for _ in range(int(GAP_GIVE_UP) + 1):
        box.advance(1.0)
    for client in (bob, carol):
        (gap,) = client.take("gap")
        assert gap == {"type": "gap", "room": room, "first": 1, "last": 4}
        assert client.seqs(room) == [5, 6]


def test_a_reliable_member_that_acks_past_a_gap_gets_no_resends() -> None:
    box = Box(2, config(**FAST))
    room, _, bob = owner_and_peer(box, None)
    box.send(bob, type="ack", room=room, seq=0)  # reliable mode
    held_on_bob(box, room, range(5, 7))
    for _ in range(int(GAP_GIVE_UP) + 1):
        box.advance(1.0)
    (gap,) = bob.take("gap")
    assert (gap["first"], gap["last"]) == (1, 4)
    box.send(bob, type="ack", room=room, seq=6)
    bob.frames.clear()
    box.advance(60.0)
    assert bob.frames == [] and bob.closed is None


class _Counted(dict[int, bytes]):
    """A parked room's messages that count the looks at all of them."""

    looks = 0

    def __iter__(self):  # type: ignore[no-untyped-def]
        _Counted.looks += 1
        return super().__iter__()


def test_parking_is_not_a_look_at_every_parked_message_each_time() -> None:
    """A lapped shard parks a busy room's messages by the thousand while its gap is
    filled: each one parked must cost O(1), not a pass over all parked before it
    (which stalled such a shard for seconds). Duplicates are still dropped when
    something else moved the log (a replay)."""
    gaps, broker, log_, delivered = gap_fill()
    gaps.park(log_, ROOM, 3, b"3", 0.0)  # 1..2 missing
    counted = _Counted(gaps.parked[ROOM].messages)
    gaps.parked[ROOM].messages = counted
    _Counted.looks = 0
    for seq in range(4, 100):
        gaps.park(log_, ROOM, seq, str(seq).encode(), 0.0)
    assert _Counted.looks <= 1
    assert broker.asked == [(1, 2)]
    # A replay moves the log past a parked message: that duplicate is dropped.
    for seq in range(1, 4):  # 3 is parked too: the replay's copy goes first
        gaps.on_replay(ROOM, seq, str(seq).encode())
    gaps.on_end(ROOM, 0.1)
    assert delivered == [str(seq).encode() for seq in range(1, 100)]
    assert not gaps.parked
