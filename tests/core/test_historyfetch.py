"""``history`` on a shard whose room log skipped a range (a ``gap``): the missing
seqs are fetched from the room's owner for that answer alone."""

from __future__ import annotations

from typing import Any, cast

from shardchat.core.broker import Broker, Holding
from shardchat.core.gapfill import GAP_GIVE_UP, GAP_JOIN_WAIT
from shardchat.core.historyfetch import HistoryFetches
from shardchat.core.roomlog import TAIL
from tests.core.box import Box, Client, Fills, config, covered, owner_and_peer, published_room

FAST = {"limits__rate": 100_000.0, "limits__burst": 100_000}
LAPPED = 300  # 300 x ~600 bytes: about three rings
COUNT = LAPPED + 3  # three more once the owner is back: the log's own


def gap_on_shard_1(box: Box) -> tuple[str, Client, Client, dict[str, Any]]:
    """Alice (shard 0, the owner) publishes ``LAPPED`` messages while shard 1 is
    stopped (lapped), then shard 1 reads while the owner is stopped, and gives the
    lost range up: bob and carol (shard 1) get a ``gap``. The owner comes back,
    and alice publishes up to ``COUNT``, delivered live."""
    room, alice, bob = owner_and_peer(box, "alice")
    carol = box.connect(1, "carol")
    box.join(carol, room)
    box.lap(1, alice, room, LAPPED)
    box.stopped.add(0)  # the fill gets no answer
    box.turn()
    for _ in range(int(GAP_GIVE_UP) + 1):
        box.advance(1.0)
    box.stopped.discard(0)
    box.turn()
    for i in range(LAPPED, COUNT):
        box.send(alice, type="message", room=room, content=f"{i}")
        box.turn()
    assert bob.seqs(room)[-3:] == list(range(LAPPED + 1, COUNT + 1))
    gaps = bob.take("gap")
    assert len(gaps) == 1
    assert covered(carol, room) == list(range(1, COUNT + 1))
    return room, bob, carol, gaps[0]


def test_history_of_a_range_given_up_here_is_fetched_from_the_owner() -> None:
    box = Box(2, config(**FAST))
    room, bob, carol, gap = gap_on_shard_1(box)
    log_ = box.engines[1].logs[room]
    seq, oldest = log_.seq, log_.oldest_seq
    assert oldest > gap["last"]  # the log skipped the range
    bob.frames.clear()
    carol.frames.clear()
    box.send(bob, type="history", room=room, since=gap["first"] - 1)
    box.turn()
    assert bob.seqs(room) == list(range(gap["first"], COUNT + 1))
    (end,) = bob.take("history_end")
    assert end["seq"] == COUNT
    # For that answer alone: no member got them again, the log is as it was.
    assert carol.frames == []
    assert (log_.seq, log_.oldest_seq) == (seq, oldest)
    assert not box.engines[1].fetches.pending
    # Paged: the oldest 5 after `since`, and "load older" before the log's oldest.
    bob.frames.clear()
    box.send(bob, type="history", room=room, since=gap["first"] - 1, limit=5)
    box.turn()
    assert bob.seqs(room) == list(range(gap["first"], gap["first"] + 5))
    bob.frames.clear()
    box.send(bob, type="history", room=room, before=oldest, limit=3)
    box.turn()
    assert bob.seqs(room) == list(range(oldest - 3, oldest))


def test_history_is_answered_with_what_is_held_when_the_owner_is_silent() -> None:
    box = Box(2, config(**FAST))
    room, bob, _, gap = gap_on_shard_1(box)
    oldest = box.engines[1].logs[room].oldest_seq
    bob.frames.clear()
    box.stopped.add(0)
    box.send(bob, type="history", room=room, since=gap["first"] - 1)
    box.turn()
    assert bob.take("history_end") == []  # waits for the owner
    box.advance(GAP_JOIN_WAIT / 2)
    assert bob.take("history_end") == []
    box.advance(GAP_JOIN_WAIT / 2)
    (end,) = bob.take("history_end")
    assert end["seq"] == COUNT
    assert bob.seqs(room) == list(range(oldest, COUNT + 1))  # the log's own
    assert not box.engines[1].fetches.pending


def test_history_asked_while_the_owner_is_stopped_gets_the_whole_range() -> None:
    """The gap fill's requests, asked while the owner was stopped, are answered
    first when it goes on (the same range): the fetch still gets all of it."""
    box = Box(2, config(delivery__gap_give_up=0.5, **FAST))
    room, alice, bob = owner_and_peer(box, "alice")
    box.lap(1, alice, room, LAPPED)
    box.stopped.add(0)
    box.turn()
    for _ in range(3):
        box.advance(0.5)
    (gap,) = bob.take("gap")
    bob.frames.clear()
    box.send(bob, type="history", room=room, since=gap["first"] - 1)
    box.turn()
    assert bob.take("history_end") == []  # waits for the owner
    box.stopped.clear()
    box.turn()
    assert bob.seqs(room) == list(range(gap["first"], LAPPED + 1))
    assert bob.take("history_end")


# HistoryFetches alone, against each broker's way of answering a fill


def fetches() -> tuple[HistoryFetches, Fills, list[dict[int, bytes]]]:
    broker = Fills()
    answers: list[dict[int, bytes]] = []
    box = HistoryFetches(cast(Broker, broker), 2.0)
    box.fetch("r", 1, 10, 100.0, answers.append)
    assert broker.asked == [(1, 10)]
    return box, broker, answers


def test_a_whole_answer_with_its_lost_part_ends_the_fetch() -> None:
    """Redis's way (and the store's): what is trimmed, the rest, the end."""
    box, broker, answers = fetches()
    box.on_lost("r", 3)
    for seq in range(4, 11):
        box.on_replay("r", seq, b"%d" % seq)
    assert answers == []
    box.on_end("r", 10)
    assert answers == [{seq: b"%d" % seq for seq in range(4, 11)}]
    assert not box.pending and broker.asked == [(1, 10)]


def test_an_owner_that_holds_nothing_more_ends_the_fetch_at_once() -> None:
    """The owner asked for its own room, without a store: only a lost marker."""
    box, _, answers = fetches()
    box.on_lost("r", 10)
    assert answers == [{}] and not box.pending


def test_chunks_are_asked_for_until_the_range_is_whole() -> None:
    """The shm owner's way: a chunk, then the end of the asked range. An older
    request's answer (the same chunk again) brings nothing and asks nothing."""
    box, broker, answers = fetches()
    for seq in range(1, 5):
        box.on_replay("r", seq, b"x")
    box.on_end("r", 10)
    assert broker.asked == [(1, 10), (5, 10)] and answers == []
    box.on_end("r", 99)  # a gap fill's end, past the log: not this fetch's
    for seq in range(1, 5):
        box.on_replay("r", seq, b"x")
    box.on_end("r", 10)  # an older request's answer: the newest one's is to come
    assert broker.asked == [(1, 10), (5, 10)] and answers == []
    for seq in range(5, 11):
        box.on_replay("r", seq, b"x")
    box.on_end("r", 10)
    assert [sorted(a) for a in answers] == [list(range(1, 11))]


def test_a_silent_holder_is_answered_for_at_the_deadline() -> None:
    box, _, answers = fetches()
    box.on_replay("r", 1, b"x")
    box.on_replay("r", 11, b"live")  # outside the range: not taken
    assert box.next_deadline() == 102.0
    box.sweep(101.9)
    assert answers == []
    box.sweep(102.0)
    assert answers == [{1: b"x"}] and box.next_deadline() is None


def test_messages_older_than_the_ttl_are_not_replayed_from_the_logs() -> None:
    """delivery.history_ttl applies to the engines' logs too (storage.kind =
    "memory"): neither a resume nor `history` replays an expired message."""
    box = Box(2, config(**FAST, delivery__history_ttl=60.0))
    alice = box.connect(0, "alice")
    bob = box.connect(1, "bob")
    room = "ttl"
    box.join(alice, room)
    box.publish(alice, room, 3, "old")
    box.turn()
    box.advance(61.0)
    for i in range(2):
        box.send(alice, type="message", room=room, content=f"new{i}")
    box.turn()
    for client in (alice, bob):
        client.frames.clear()
        box.send(client, type="history", room=room)
        box.turn()
        assert client.seqs(room) == [4, 5]
        assert client.take("history_end")[0]["seq"] == 5
    bob.frames.clear()
    joined = box.join(bob, room, since=0, epoch="epoch-1")
    assert joined["recovered"] is False and joined["seq"] == 5
    assert bob.seqs(room) == [4, 5]


def test_a_resume_from_before_the_tail_is_whole_though_the_tail_rolls_meanwhile() -> None:
    """A shard that keeps a tail of a room (another holds its recent history)
    fetches a resume's older messages from the owner; messages that come while
    it does, more than the tail holds, neither cut the replay nor are lost."""
    box = Box(2, config(**FAST))
    box.brokers[1].holding = lambda room: Holding.ELSEWHERE  # type: ignore[method-assign]
    room, carol = published_room(box, 500)
    alice = box.connect(0, "alice")
    box.join(alice, room)
    assert len(box.engines[1].logs[room]) == TAIL
    bob = box.connect(1, "bob")
    box.send(bob, type="join", room=room, since=10, epoch="epoch-1")
    box.publish(alice, room, 300, "late")  # read by shard 1 before the fetch's answer
    box.turn()
    (joined,) = bob.take("joined")
    assert joined["recovered"] is True and joined["seq"] == 800
    assert bob.seqs(room) == list(range(11, 801))
    assert len(box.engines[1].logs[room]) == TAIL and not box.engines[1].pins


def test_the_api_history_of_a_shard_with_a_tail_fetches_the_older_page() -> None:
    box = Box(2, config(**FAST))
    box.brokers[1].holding = lambda room: Holding.ELSEWHERE  # type: ignore[method-assign]
    room, _ = published_room(box, 500)
    pages: list[list[int]] = []
    engine = box.engines[1]
    engine.read_history(
        room, None, 101, 50, lambda held, epoch, seq: pages.append([m.seq for m in held])
    )
    box.settle(1)
    box.turn()
    assert pages == [list(range(51, 101))]
    assert len(engine.logs[room]) == TAIL and not engine.pins


def test_a_resume_fetch_asked_of_an_owner_that_died_is_asked_again_of_its_successor() -> None:
    box = Box(2, config(**FAST))
    box.brokers[1].holding = lambda room: Holding.ELSEWHERE  # type: ignore[method-assign]
    room, alice, _ = owner_and_peer(box, "alice")
    box.publish(alice, room, 200)  # within the ring: the restarted owner holds them
    box.turn()
    dave = box.connect(1, "dave")
    box.stopped.add(0)
    box.send(dave, type="join", room=room, since=10, epoch="epoch-1")
    box.turn()  # the request is in shard 1's ring; the owner never reads it
    box.restart(0)
    box.turn()
    (joined,) = dave.take("joined")
    assert joined["recovered"] is True and dave.seqs(room) == list(range(11, 201))


def test_a_log_made_again_while_an_answer_fetches_stays_whole_until_it_is_answered() -> None:
    """A room's log made again while a ``history`` answer fetches its older seqs
    (its epoch changed) keeps every message until the answer comes, as the log
    it replaced did, and gets its tail's size back after."""
    box = Box(2, config(**FAST))
    box.brokers[1].holding = lambda room: Holding.ELSEWHERE  # type: ignore[method-assign]
    room, _ = published_room(box, 500)
    engine = box.engines[1]
    box.stopped.add(0)  # the fetch waits for the owner
    pages: list[list[int]] = []
    engine.read_history(
        room, None, 101, 50, lambda held, epoch, seq: pages.append([m.seq for m in held])
    )
    box.settle(1)
    assert engine.pins == {room: 1}
    engine.inbox.on_room_state(room, "epoch-2", 0)
    engine.deliver()
    assert engine.logs[room].capacity == engine.history
    for _ in range(int(GAP_GIVE_UP) + 1):
        box.advance(1.0)
    assert pages and not engine.pins
    assert engine.logs[room].capacity == TAIL
