"""shardchat.brokers.sequencer: the owner's seqs (continuing from the seq table and
never going back), the ids and idempotency keys it remembers, and the chunks it
resends to a shard that missed a range."""

from __future__ import annotations

from shardchat.brokers.sequencer import RESEND_OVERHEAD, Sequencer, owner_of, plan_resend
from shardchat.core.broker import KEY_WINDOW
from shardchat.core.roomlog import HeldMessage

SECOND = 10**9


def test_the_owner_is_a_stable_hash_of_the_name() -> None:
    # Pinned values: the same in every process and every run (crc32, not hash()).
    assert [owner_of("lobby", w) for w in (1, 2, 3)] == [0, 1, 2]
    assert {owner_of(f"r{i}", 4) for i in range(40)} == {0, 1, 2, 3}


def test_seqs_continue_from_the_table_and_a_restore_never_goes_back() -> None:
    table = {"a": 41}
    seq = Sequencer(table.get)
    assert seq.assign("a", "m1", "", 0) == 42  # where the seq table says the room was
    assert seq.assign("b", "m2", "", 0) == 1
    seq.restore("a", 10)  # an older record read at start-up
    assert seq.assign("a", "m3", "", 0) == 43
    seq.restore("b", 7)
    assert seq.assign("b", "m4", "", 0) == 8


def test_ids_are_remembered_up_to_the_limit_oldest_first() -> None:
    seq = Sequencer(lambda room: None, remember=2)
    for i in range(3):
        seq.assign("r", f"m{i}", "", 0)
    assert seq.seen("m0") is None
    assert seq.seen("m1") == ("r", 2) and seq.seen("m2") == ("r", 3)


def test_a_key_is_answered_within_the_window_only() -> None:
    seq = Sequencer(lambda room: None)
    assert seq.seen_key("", 0) is None  # no key: never deduplicated
    seq.assign("r", "m1", "ada\nr\nk1", 5 * SECOND)
    assert seq.seen_key("ada\nr\nk1", 5 * SECOND + int(KEY_WINDOW * SECOND)) == ("r", 1)
    assert seq.seen_key("ada\nr\nk1", 6 * SECOND + int(KEY_WINDOW * SECOND)) is None
    # A later key pushes the expired ones out.
    seq.assign("r", "m2", "ada\nr\nk2", 7 * SECOND + int(KEY_WINDOW * SECOND))
    assert list(seq.keys) == ["ada\nr\nk2"]


def held(*seqs: int, size: int = 10) -> list[HeldMessage]:
    return [HeldMessage(s, b"x" * size) for s in seqs]


def test_a_resend_is_a_chunk_within_the_budget_ending_with_its_marker() -> None:
    budget = 3 * (10 + RESEND_OVERHEAD)
    plan = plan_resend(held(5, 6, 7, 8, 9), 5, 9, budget)
    assert [m.seq for m in plan.messages] == [5, 6, 7] and plan.lost_to == 0
    assert plan.end == 9  # the asker asks for the next chunk at this end


def test_what_is_no_longer_held_is_reported_lost() -> None:
    plan = plan_resend(held(8, 9), 5, 9, 10_000)
    assert plan.lost_to == 7 and [m.seq for m in plan.messages] == [8, 9]
    nothing = plan_resend([], 5, 9, 10_000)
    assert nothing.lost_to == 9 and nothing.messages == [] and nothing.end is None
    later = plan_resend(held(12), 5, 9, 10_000)
    assert later.lost_to == 11 and later.end is None
