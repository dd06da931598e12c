"""The owner's room table: insert, update, lookup, full table, model check."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from shardchat.ring.seqtable import SLOT_SIZE, SeqTable


def table(slots: int) -> SeqTable:
    return SeqTable(memoryview(bytearray(slots * SLOT_SIZE)), slots)


def test_insert_update_lookup() -> None:
    t = table(16)
    assert t.lookup("lobby") is None
    off = t.slot("lobby")
    assert off is not None and t.lookup("lobby") == 0
    t.set_seq(off, 41)
    assert t.lookup("lobby") == 41
    assert t.slot("lobby") == off  # same slot again
    assert t.entries() == {"lobby": 41}


def test_full_table_refuses_new_rooms_but_keeps_old_ones() -> None:
    t = table(4)
    offsets = [t.slot(f"r{i}") for i in range(4)]
    assert None not in offsets
    assert t.slot("one-more") is None
    assert t.lookup("one-more") is None
    assert all(t.lookup(f"r{i}") == 0 for i in range(4))


@given(st.lists(st.tuples(st.text("abcdefgh", min_size=1, max_size=6), st.integers(0, 2**40))))
def test_matches_a_dict(updates: list[tuple[str, int]]) -> None:
    t = table(64)
    model: dict[str, int] = {}
    for room, seq in updates:
        off = t.slot(room)
        assert off is not None
        t.set_seq(off, seq)
        model[room] = seq
    assert t.entries() == model
    for room, seq in model.items():
        assert t.lookup(room) == seq
