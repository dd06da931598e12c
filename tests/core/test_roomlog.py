"""Room ownership and the room log: seq, history window, replay on rejoin."""

from __future__ import annotations

import tracemalloc
import zlib

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from shardchat.brokers.sequencer import owner_of
from shardchat.core.errors import SequenceError
from shardchat.core.roomlog import HeldMessage, RoomLog, unexpired


def test_owner_is_crc32_mod_workers() -> None:
    assert owner_of("lobby", 3) == zlib.crc32(b"lobby") % 3
    assert {owner_of(f"room{i}", 4) for i in range(100)} == {0, 1, 2, 3}


def filled(count: int, capacity: int) -> RoomLog:
    log = RoomLog("e1", capacity)
    for seq in range(1, count + 1):
        log.append(seq, f"m{seq}".encode())
    return log


def test_append_requires_the_next_seq() -> None:
    log = filled(3, 10)
    with pytest.raises(SequenceError):
        log.append(5, b"gap")
    with pytest.raises(SequenceError):
        log.append(3, b"repeat")


def test_replay_recovered_when_everything_is_held() -> None:
    replay = filled(10, 5).replay(6, "e1")
    assert [m.seq for m in replay.messages] == [7, 8, 9, 10] and replay.recovered


def test_replay_not_recovered_when_since_is_older_than_held() -> None:
    replay = filled(10, 5).replay(2, "e1")
    assert [m.seq for m in replay.messages] == [6, 7, 8, 9, 10] and not replay.recovered


def test_replay_from_another_epoch_starts_at_oldest_held() -> None:
    replay = filled(10, 5).replay(9, "old")
    assert [m.seq for m in replay.messages] == [6, 7, 8, 9, 10] and not replay.recovered


def test_replay_of_a_seq_never_reached_is_not_recovered() -> None:
    replay = filled(3, 5).replay(7, "e1")
    assert [m.seq for m in replay.messages] == [1, 2, 3] and not replay.recovered


def test_history_zero_holds_nothing_but_counts() -> None:
    log = filled(4, 0)
    assert log.seq == 4 and len(log) == 0
    assert log.replay(4, "e1").recovered and not log.replay(3, "e1").recovered


@given(
    count=st.integers(0, 60),
    capacity=st.integers(0, 20),
    since=st.integers(0, 70),
    limit=st.none() | st.integers(0, 30),
)
def test_after_matches_a_model(count: int, capacity: int, since: int, limit: int | None) -> None:
    log = filled(count, capacity)
    held = list(range(max(1, count - capacity + 1), count + 1)) if capacity else []
    expected = [s for s in held if s > since]
    if limit is not None:
        expected = expected[:limit]
    assert [m.seq for m in log.after(since, limit)] == expected
    assert all(m.payload == f"m{m.seq}".encode() for m in log.after(since, limit))
    replay = log.replay(since, "e1")
    if since <= count:
        assert replay.recovered == (since + 1 >= (held[0] if held else count + 1))


@given(
    count=st.integers(0, 60),
    capacity=st.integers(0, 20),
    since=st.none() | st.integers(0, 70),
    before=st.none() | st.integers(0, 70),
    limit=st.none() | st.integers(0, 30),
)
def test_page_matches_a_model(
    count: int, capacity: int, since: int | None, before: int | None, limit: int | None
) -> None:
    """history paging: since < seq < before; with since the oldest `limit` of those,
    without it the latest `limit`; always oldest first."""
    log = filled(count, capacity)
    held = list(range(max(1, count - capacity + 1), count + 1)) if capacity else []
    expected = [s for s in held if (since is None or s > since) and (before is None or s < before)]
    if limit is not None:
        expected = (
            expected[:limit] if since is not None else expected[max(0, len(expected) - limit) :]
        )
    assert [m.seq for m in log.page(since, before, limit)] == expected


def test_a_quiet_room_log_is_small_and_skip_frees_what_it_held() -> None:
    # Every shard with a member of a room keeps its log: a quiet room must not
    # cost a preallocated deque (624 bytes) on each of them.
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        logs = [RoomLog("e", 100, 5) for _ in range(1000)]
        per_log = (tracemalloc.get_traced_memory()[0] - before) / len(logs)
        assert per_log < 200, per_log
        log_ = logs[0]
        for seq in range(6, 300):
            log_.append(seq, b"m")
        assert [m.seq for m in log_.after(0)] == list(range(200, 300))
        log_.skip_to(400)
        assert len(log_) == 0 and log_.oldest_seq == 401
        log_.append(401, b"n")
        assert [m.seq for m in log_.after(0)] == [401]
    finally:
        tracemalloc.stop()


def test_replay_with_older_fetched_messages_is_recovered_only_when_whole() -> None:
    log = filled(10, 3)  # holds 8..10
    older = {seq: f"m{seq}".encode() for seq in range(3, 8)}
    whole = log.replay(2, "e1", older)
    assert [m.seq for m in whole.messages] == list(range(3, 11)) and whole.recovered
    del older[5]  # a fetch cut short
    cut = log.replay(2, "e1", older)
    assert [m.seq for m in cut.messages] == [3, 4, 6, 7, 8, 9, 10] and not cut.recovered
    assert not log.replay(1, "e1", {2: b"m2"}).recovered  # 3..7 missing


def test_unexpired_drops_the_leading_messages_stamped_before_the_cutoff() -> None:
    def held(seq: int, stamp: int) -> HeldMessage:
        return HeldMessage(seq, orjson.dumps({"type": "message", "seq": seq, "timestamp": stamp}))

    messages = [held(1, 100), held(2, 199), held(3, 200), held(4, 150), held(5, 300)]
    assert [m.seq for m in unexpired(messages, 200)] == [3, 4, 5]
    assert unexpired(messages, 50) is messages
    assert unexpired(messages, 1000) == []


def test_resize_keeps_the_latest_and_bounds_what_comes() -> None:
    log = filled(10, 4)  # 7..10
    log.resize(6)
    for seq in range(11, 14):
        log.append(seq, b"m")
    assert [m.seq for m in log.after(0)] == [8, 9, 10, 11, 12, 13]
    log.resize(2)
    assert [m.seq for m in log.after(0)] == [12, 13] and log.capacity == 2
