"""The store file's layout: groups and spans packed and read back, the groups
a writer that is gone left, a file of the earlier schema (a row per message)
moved into spans, and reads across spans."""

from __future__ import annotations

import logging
import sqlite3
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shardchat.core.errors import StorageError
from shardchat.storage import transactions
from shardchat.storage.boxdir import StorageDir, set_aside, store_path
from shardchat.storage.store import RoomStore
from shardchat.storage.transactions import (
    SCHEMA_VERSION,
    SPAN_ROWS,
    Row,
    Transactions,
    connect,
    group_rows,
    pack_group,
    span_messages,
    store_rows,
)


def reader(path: Path, history: int = 1000) -> RoomStore[str]:
    """A store on ``path`` for its reads (its writer not started)."""
    return RoomStore(
        path, fsync="off", max_bytes=0, history=history, history_ttl=0.0, wake=lambda: None
    )


rows_strategy = st.lists(
    st.tuples(
        st.text(min_size=1, max_size=40),
        st.integers(min_value=1, max_value=2**62),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(max_size=40),
        st.binary(max_size=300),
    ),
    max_size=50,
)


@given(rows_strategy)
def test_a_group_gives_back_its_messages(rows: list[Row]) -> None:
    assert group_rows(pack_group(rows)) == rows


@given(st.lists(st.binary(max_size=300), min_size=1, max_size=3 * SPAN_ROWS))
def test_spans_give_back_a_rooms_messages_in_order(payloads: list[bytes]) -> None:
    db = connect(Path(":memory:"))
    rows: list[Row] = [("r", i + 1, float(i), "", p) for i, p in enumerate(payloads)]
    db.execute("BEGIN")
    assert store_rows(db, rows) == {"r": len(rows)}
    db.execute("COMMIT")
    spans = db.execute("SELECT first, last, count, rows FROM spans ORDER BY last").fetchall()
    assert all(count <= SPAN_ROWS for _, _, count, _ in spans)
    got = [m for *_, blob in spans for m in span_messages(blob)]
    assert got == [(i + 1, p) for i, p in enumerate(payloads)]
    assert [(first, last) for first, last, *_ in spans] == [
        (seqs[0][0], seqs[-1][0])
        for seqs in (got[i : i + SPAN_ROWS] for i in range(0, len(got), SPAN_ROWS))
    ]
    db.close()


def test_the_groups_a_writer_that_is_gone_left_are_folded_at_the_next_open(
    tmp_path: Path,
) -> None:
    """kill -9 between a group's commit and the next fold: the next open finds
    the groups and folds them into spans, with the rooms' seqs and the keys."""
    path = tmp_path / "s.db"
    db = connect(path)
    writer = Transactions(db, history=1000, history_ttl=0.0)
    now = time.time()
    assert writer.write([("a", 1, now, "ka1", b"a1"), ("b", 1, now, "", b"b1")])
    assert writer.write([("a", 2, now, "", b"a2")])
    db.close()  # no fold: what a killed writer leaves
    raw = sqlite3.connect(path)
    assert raw.execute("SELECT count(*) FROM groups").fetchone() == (2,)
    assert raw.execute("SELECT count(*) FROM spans").fetchone() == (0,)
    raw.close()
    db = connect(path)
    assert db.execute("SELECT count(*) FROM groups").fetchone() == (0,)
    assert dict(db.execute("SELECT room, seq FROM rooms").fetchall()) == {"a": 2, "b": 1}
    assert db.execute("SELECT key, room, seq FROM recent_keys").fetchall() == [("ka1", "a", 1)]
    db.close()
    store = reader(path)
    assert [(m.seq, m.payload) for m in store.read("a", 1, 2, 10)] == [(1, b"a1"), (2, b"a2")]
    store.close()


def test_a_file_of_the_earlier_schema_is_moved_into_spans(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "old.db"
    old = sqlite3.connect(path, isolation_level=None)
    old.executescript(
        """
        PRAGMA journal_mode=WAL;
        CREATE TABLE messages (room TEXT NOT NULL, seq INTEGER NOT NULL, at REAL NOT NULL,
            json BLOB NOT NULL, PRIMARY KEY (room, seq));
        CREATE TABLE rooms (room TEXT PRIMARY KEY, seq INTEGER NOT NULL) WITHOUT ROWID;
        CREATE TABLE keys (key TEXT PRIMARY KEY, room TEXT NOT NULL, seq INTEGER NOT NULL,
            at REAL NOT NULL) WITHOUT ROWID;
        """
    )
    count = SPAN_ROWS * 2 + 5
    old.executemany(
        "INSERT INTO messages VALUES (?, ?, ?, ?)",
        [
            (room, seq, 100.0 + seq, f"{room}{seq}".encode())
            for room in "ab"
            for seq in range(1, count + 1)
        ],
    )
    old.executemany("INSERT INTO rooms VALUES (?, ?)", [("a", count), ("b", count)])
    old.execute("INSERT INTO keys VALUES ('k', 'a', 3, 103.0)")
    old.close()
    with caplog.at_level(logging.WARNING):
        db = connect(path)
    assert "storage_schema_upgraded" in caplog.text
    assert db.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
    tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert tables == {"groups", "spans", "rooms", "recent_keys"}
    assert db.execute("SELECT key, room, seq, at FROM recent_keys").fetchall() == [
        ("k", "a", 3, 103.0)
    ]
    assert db.execute("SELECT sum(count), min(oldest) FROM spans").fetchone() == (2 * count, 101.0)
    db.close()
    store = reader(path)
    assert store.restore().seqs == {"a": count, "b": count}
    got = store.read("b", 1, count, 10_000)
    assert [(m.seq, m.payload) for m in got] == [(s, f"b{s}".encode()) for s in range(1, count + 1)]
    store.close()


def test_a_read_takes_its_range_across_spans_up_to_its_limit(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    db = connect(path)
    writer = Transactions(db, history=1000, history_ttl=0.0)
    seq = 0
    for size in (3, SPAN_ROWS + 7, 1, 20):  # folds of several sizes: spans of each
        rows: list[Row] = []
        for _ in range(size):
            seq += 1
            rows.append(("r", seq, 0.0, "", b"%d" % seq))
        assert writer.write(rows) and writer.fold(rows)
    db.close()
    store = reader(path)
    assert [m.seq for m in store.read("r", 2, seq, 10_000)] == list(range(2, seq + 1))
    assert [m.seq for m in store.read("r", 30, 200, 20)] == list(range(30, 50))  # 4 spans
    assert [m.payload for m in store.read("r", seq, seq + 5, 10)] == [b"%d" % seq]
    assert store.read("r", seq + 1, seq + 9, 10) == []
    assert store.read("other", 1, 9, 10) == []
    store.close()


def test_an_open_without_room_to_fold_refuses_clearly_and_keeps_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The groups a killed writer left need room to be folded: a full disk at the
    next start is said as such, the file is not set aside as unreadable, and
    the start after space came back finds every message."""
    directory = tmp_path / "d"
    StorageDir.open(directory, 1).close()
    path = store_path(directory, 0, 1)
    db = connect(path)
    assert Transactions(db, history=1000, history_ttl=0.0).write([("a", 1, 0.0, "", b"a1")])
    db.close()

    def full(db: sqlite3.Connection, rows: object) -> dict[str, int]:
        exc = sqlite3.OperationalError("database or disk is full")
        exc.sqlite_errorcode = sqlite3.SQLITE_FULL
        raise exc

    monkeypatch.setattr(transactions, "store_rows", full)
    with pytest.raises(StorageError, match="the disk is full"):
        StorageDir.open(directory, 1)
    monkeypatch.undo()
    assert not set_aside(directory)
    storage = StorageDir.open(directory, 1)  # room again
    try:
        assert storage.seqs(0) == {"a": 1}
    finally:
        storage.close()


def test_a_read_of_an_old_range_stops_at_its_last_span(tmp_path: Path) -> None:
    """A page of old history reads the spans it needs, not every later one: the
    SQLite steps of a read at the start of a 20,000-message room are those of a
    read at its end (counted by a progress handler, not timed)."""
    path = tmp_path / "s.db"
    db = connect(path)
    db.execute("BEGIN")
    store_rows(db, (("r", seq, 0.0, "", b"x" * 100) for seq in range(1, 20_001)))
    db.execute("COMMIT")
    db.close()
    store = reader(path, history=100_000)
    steps = 0

    def count() -> int:
        nonlocal steps
        steps += 1
        return 0

    store._reader.set_progress_handler(count, 100)
    costs = []
    for first in (101, 19_901):
        steps = 0
        assert [m.seq for m in store.read("r", first, first + 49, 1000)] == list(
            range(first, first + 50)
        )
        costs.append(steps)
    store._reader.set_progress_handler(None, 0)
    store.close()
    assert costs[0] <= 2 * costs[1] + 10, costs


def test_with_history_0_a_fold_keeps_seqs_and_keys_and_no_messages(tmp_path: Path) -> None:
    """delivery.history = 0: nothing to page or replay, so no spans; those an open
    or a rescue wrote before are deleted by the room's next folds."""
    db = connect(tmp_path / "s.db")
    db.execute("BEGIN")
    store_rows(db, [("r", seq, 0.0, "", b"old") for seq in range(1, 41)])  # e.g. a rescue's
    db.execute("COMMIT")
    writer = Transactions(db, history=0, history_ttl=0.0)
    rows: list[Row] = [("r", seq, time.time(), f"k{seq}", b"new") for seq in range(41, 81)]
    rows.append(("s", 1, time.time(), "", b"new"))
    assert writer.write(rows) and writer.fold(rows)
    assert db.execute("SELECT count(*) FROM spans").fetchone() == (0,)
    assert dict(db.execute("SELECT room, seq FROM rooms").fetchall()) == {"r": 80, "s": 1}
    assert db.execute("SELECT count(*) FROM recent_keys").fetchone() == (40,)
    db.close()


def test_a_file_of_a_newer_layout_is_refused_not_rewritten(tmp_path: Path) -> None:
    path = tmp_path / "new.db"
    connect(path).close()
    raw = sqlite3.connect(path)
    raw.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    raw.close()
    with pytest.raises(StorageError, match="made by a newer shardchat"):
        connect(path)
    raw = sqlite3.connect(path)
    assert raw.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION + 1,)
    raw.close()
