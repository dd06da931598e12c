"""The room store's parts on their own: the writer thread's batches and acks,
retention, a write that fails for want of room and is tried again, the
write-ahead log's torn tail, the storage directory's lock and epoch."""

from __future__ import annotations

import os
import sqlite3
import threading
import time
import zlib
from pathlib import Path

import pytest

from shardchat.core.errors import StorageError
from shardchat.storage.boxdir import StorageDir, store_path
from shardchat.storage.store import TRIM_EVERY, RoomStore, connect
from shardchat.storage.transactions import SPAN_ROWS, store_rows
from shardchat.storage.wal import cut_damaged_tail, valid_length
from shardchat.testing.wait import wait_until


class Woken:
    def __init__(self) -> None:
        self.event = threading.Event()

    def __call__(self) -> None:
        self.event.set()


def finished(store: RoomStore[str], woken: Woken, count: int) -> list[tuple[str, bool]]:
    """The next ``count`` finished batches (the writer wakes us for each)."""
    done: list[tuple[str, bool]] = []
    deadline = time.monotonic() + 10
    while len(done) < count:
        assert woken.event.wait(max(0.0, deadline - time.monotonic())), done
        woken.event.clear()
        done += store.finished()
    return done


def held(store: RoomStore[str], room: str, first: int, last: int) -> list[int]:
    """The seqs a fill would get (Durable.held): not folded yet, then the file's."""
    pending = store.pending(room, first, last)
    stored = [m.seq for m in store.read(room, first, last, 10_000)]
    return sorted(set(pending) | set(stored))


def open_store(path: Path, woken: Woken, **kw: object) -> RoomStore[str]:
    options: dict[str, object] = {
        "fsync": "off", "max_bytes": 0, "history": 1000, "history_ttl": 0.0, "wake": woken,
    }  # fmt: skip
    options.update(kw)
    store: RoomStore[str] = RoomStore(path, **options)  # type: ignore[arg-type]
    store.start()
    return store


@pytest.mark.parametrize("fsync", ["always", "batch", "off"])
def test_batches_come_back_in_order_and_are_kept(tmp_path: Path, fsync: str) -> None:
    woken = Woken()
    store = open_store(tmp_path / "s.db", woken, fsync=fsync)
    for turn in range(3):
        for i in range(5):
            seq = turn * 5 + i + 1
            store.add("r", seq, time.time(), f"k{seq}", b'{"seq":%d}' % seq)
        store.submit(f"turn{turn}")
    assert finished(store, woken, 3) == [("turn0", True), ("turn1", True), ("turn2", True)]
    assert held(store, "r", 3, 7) == [3, 4, 5, 6, 7]
    store.close()  # the groups are folded into spans
    again = open_store(tmp_path / "s.db", woken)
    restored = again.restore()
    assert restored.seqs == {"r": 15}
    assert [k for k, *_ in restored.keys] == [f"k{seq}" for seq in range(1, 16)]
    assert [m.seq for m in again.read("r", 3, 7, 100)] == [3, 4, 5, 6, 7]
    assert [m.payload for m in again.read("r", 14, 20, 100)] == [b'{"seq":14}', b'{"seq":15}']
    again.close()


def test_a_turn_after_a_quiet_spell_is_written_at_once(tmp_path: Path) -> None:
    """storage.write_every gathers turns that follow a write closely; one that
    comes longer than that after the last transaction began is written at once
    (a lone publish's ack waits for one write, not a gathering of 30 s)."""
    woken = Woken()
    store = open_store(tmp_path / "s.db", woken, fsync="batch", write_every=30.0)
    wait_until(lambda: store._last_write > 0, 10, "the writer started")
    store._last_write -= 60  # the writer's last transaction began a minute ago
    store.add("r", 1, time.time(), "", b"{}")
    store.submit("lone")
    assert finished(store, woken, 1) == [("lone", True)]  # within its 10 s, not 30
    store.close()


def test_retention_keeps_the_last_history_messages(tmp_path: Path) -> None:
    woken = Woken()
    store = open_store(tmp_path / "s.db", woken, history=10)
    for seq in range(1, 101):
        store.add("r", seq, time.time(), "", b"x")
        store.submit(str(seq))
    finished(store, woken, 100)
    store.close()  # folded and trimmed
    again = open_store(tmp_path / "s.db", woken, history=10)
    kept = again.read("r", 1, 100, 1000)
    assert kept[-1].seq == 100
    # trimmed TRIM_EVERY at a time, by whole spans
    assert 10 <= len(kept) < 10 + TRIM_EVERY + SPAN_ROWS
    assert again.restore().seqs == {"r": 100}  # the seq is kept for ever
    again.close()


def test_a_write_past_max_bytes_fails_and_is_kept_for_a_retry(tmp_path: Path) -> None:
    """The rows of a failed write are kept and written first in the next
    transaction once there is room: nothing handed over is dropped."""
    db = connect(tmp_path / "s.db")  # another room's messages, deleted below to make room
    db.execute("BEGIN")
    store_rows(db, [("old", i, time.time(), "", b"z" * 2000) for i in range(1, 16)])
    db.execute("COMMIT")
    db.close()
    woken = Woken()
    store = open_store(tmp_path / "s.db", woken, max_bytes=96 * 1024)
    seq = 0
    results: list[bool] = []
    while True in results or not results:
        seq += 1
        store.add("r", seq, time.time(), "", b"y" * 2000)
        store.submit(str(seq))
        results.append(finished(store, woken, 1)[0][1])
        if not results[-1]:
            break
        assert seq < 1000, "max_bytes was never reached"
    assert store.full
    assert store.backlog == 1  # the failed one is not in the store yet, every other is
    # Room again (an operator deleted a room): the kept rows go in first.
    db = sqlite3.connect(tmp_path / "s.db", isolation_level=None, timeout=10.0)
    db.execute("DELETE FROM spans WHERE room = 'old'")
    db.close()
    wait_until(lambda: not store.full and store.backlog == 0, 10, "the kept rows written")
    store.close()
    again = open_store(tmp_path / "s.db", woken)
    assert again.restore().seqs["r"] == seq
    assert held(again, "r", 1, seq) == list(range(1, seq + 1))
    assert again.read("r", seq, seq, 1)[0].payload == b"y" * 2000
    again.close()


def test_a_torn_wal_is_cut_after_its_last_commit(tmp_path: Path) -> None:
    db = connect(tmp_path / "w.db", "OFF")
    for i in range(20):
        db.execute("BEGIN")
        db.execute("INSERT INTO rooms VALUES (?, ?)", (f"r{i}", i))
        db.execute("COMMIT")
    wal = tmp_path / "w.db-wal"
    data = wal.read_bytes()
    assert valid_length(data) == len(data)
    assert cut_damaged_tail(wal) == 0  # whole frames: nothing to cut
    db.close()
    torn = tmp_path / "torn-wal"
    torn.write_bytes(data[:-100])
    cut = cut_damaged_tail(torn)
    # The torn frame and the frames of its transaction before it: one commit less.
    assert 0 < cut < len(data) - 32
    assert valid_length(torn.read_bytes()) == torn.stat().st_size == len(data) - 100 - cut


def test_a_second_hold_of_the_directory_is_refused(tmp_path: Path) -> None:
    first = StorageDir.open(tmp_path / "d", 2)
    try:
        with pytest.raises(StorageError, match="in use by another shardchat server"):
            StorageDir.open(tmp_path / "d", 2)
        epoch = first.epoch
    finally:
        first.close()
    again = StorageDir.open(tmp_path / "d", 2)
    assert again.epoch == epoch  # the epoch outlives the run
    again.close()


def test_a_new_worker_count_moves_each_room_to_its_new_owner(tmp_path: Path) -> None:
    directory = tmp_path / "d"
    StorageDir.open(directory, 2).close()
    for shard in range(2):
        db = connect(store_path(directory, shard, 2))
        db.execute("BEGIN")
        store_rows(
            db,
            [
                (f"s{shard}r{i}", seq, time.time(), f"k-s{shard}r{i}-{seq}", b"%d" % seq)
                for i in range(20)
                for seq in range(1, i + 2)
            ],
        )
        db.execute("COMMIT")
        db.close()
    moved = StorageDir.open(directory, 3)
    try:
        seqs = [moved.seqs(shard) for shard in range(3)]
        assert sum(len(s) for s in seqs) == 40
        assert not list(directory.glob("rooms-*-of-2.db"))
        for shard, rooms in enumerate(seqs):
            assert all(zlib.crc32(room.encode()) % 3 == shard for room in rooms)
            store = open_store(moved.path(shard), Woken())
            for room, seq in rooms.items():  # the messages and keys moved with the seqs
                assert [m.payload for m in store.read(room, 1, seq, 100)] == [
                    b"%d" % s for s in range(1, seq + 1)
                ]
            keys = {key for key, *_ in store.restore().keys}
            assert keys == {f"k-{r}-{n}" for r, seq in rooms.items() for n in range(1, seq + 1)}
            store.close()
    finally:
        moved.close()


def test_a_move_interrupted_before_the_meta_file_is_done_again_or_undone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crash between copying the rooms to the new count's files and writing the
    meta file: the old files are still there, so a start with either count finds
    every room."""
    from shardchat.storage import boxdir

    directory = tmp_path / "d"
    StorageDir.open(directory, 2).close()
    for shard in range(2):
        db = connect(store_path(directory, shard, 2))
        db.execute("BEGIN")
        store_rows(
            db, [(f"s{shard}r{i}", 5, time.time(), f"k{shard}-{i}", b"m") for i in range(10)]
        )
        db.execute("COMMIT")
        db.close()

    def crash(directory: Path, meta: dict[str, object]) -> None:
        raise OSError("killed before the meta file was written")

    monkeypatch.setattr(boxdir, "_write_meta", crash)
    with pytest.raises(OSError):
        StorageDir.open(directory, 3)
    monkeypatch.undo()
    for workers in (3, 2):  # the move done again over its first copies, then back
        again = StorageDir.open(directory, workers)
        try:
            assert sum(len(again.seqs(shard)) for shard in range(workers)) == 20, workers
            keys = []
            for shard in range(workers):
                db = connect(again.path(shard))
                keys += [key for (key,) in db.execute("SELECT key FROM recent_keys")]
                db.close()
            assert sorted(keys) == sorted(f"k{s}-{i}" for s in range(2) for i in range(10))
        finally:
            again.close()
    assert not list(directory.glob("rooms-*-of-3.db"))


def test_history_ttl_deletes_older_messages_and_old_keys(tmp_path: Path) -> None:
    """The writer's prune (every PRUNE_EVERY): messages older than
    delivery.history_ttl and keys older than KEY_WINDOW go; the seq stays."""
    from shardchat.core.broker import KEY_WINDOW
    from shardchat.storage.transactions import Transactions

    db = connect(tmp_path / "t.db")
    writer = Transactions(db, history=1000, history_ttl=60.0)
    now = time.time()
    old, recent = now - 120, now - 10
    for row in [("r", 1, old, "k1", b"a"), ("r", 2, recent, "k2", b"b")]:
        assert writer.write([row]) and writer.fold([row])  # a span each
    db.execute("UPDATE recent_keys SET at = ? WHERE key = 'k1'", (now - KEY_WINDOW - 1,))
    writer.prune(now)
    assert db.execute("SELECT first, last FROM spans").fetchall() == [(2, 2)]
    assert db.execute("SELECT key FROM recent_keys").fetchall() == [("k2",)]
    assert db.execute("SELECT seq FROM rooms").fetchall() == [(2,)]
    db.close()


def test_a_writer_that_fails_fails_every_batch_instead_of_hanging(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An error that is not SQLite's (a bug): logged, the store full for good, and
    every batch handed over answered as failed (its publishes get `unavailable`)."""
    from shardchat.storage.transactions import Transactions

    def broken(self: object, rows: object) -> bool:
        raise RuntimeError("a bug")

    monkeypatch.setattr(Transactions, "write", broken)
    woken = Woken()
    store = open_store(tmp_path / "s.db", woken)
    for turn in range(3):
        store.add("r", turn + 1, time.time(), "", b"x")
        store.submit(f"t{turn}")
        assert finished(store, woken, 1) == [(f"t{turn}", False)]
    assert store.full
    store.close()


def test_a_crashed_runs_rings_give_the_store_what_it_lacked(tmp_path: Path) -> None:
    """The previous holder of the directory is gone and its rings are still in
    /dev/shm: the messages that follow on from each room's stored seq are stored
    (with their keys); what is already stored, and what would leave a hole, is
    not. The rooms its seq table has past what is stored then have a hole (their
    ring lapped messages members saw), and the epoch settled after the rescue
    is a new one."""
    from shardchat.brokers import segments
    from shardchat.ring import records
    from shardchat.ring.layout import HEADER_SIZE, RecordKind
    from shardchat.ring.ring import RingWriter
    from shardchat.storage.rescue import rescue

    dead = 4_000_000 + os.getpid() % 100_000  # above pid_max's default: never alive
    directory = tmp_path / "d"
    first = StorageDir.open(directory, 1)
    db = connect(first.path(0))
    db.execute("INSERT INTO rooms VALUES ('a', 2)")
    db.close()
    first.close()
    (directory / "lock").write_text(f"{dead}\n")
    fabric = segments.Fabric(dead, 1, 1 << 16, 16)
    try:
        view = memoryview(fabric.segments[0].buf)
        writer = RingWriter(view[: HEADER_SIZE + (1 << 16)])
        for room, seq in [("a", 1), ("a", 2), ("a", 3), ("a", 4), ("b", 1), ("c", 2)]:
            payload = records.encode_room_message(
                room, seq, 0, f"m{room}{seq}", b"{}", f"k{room}{seq}"
            )
            writer.append(int(RecordKind.ROOM_MSG), 0, payload)
        writer.commit()
        del writer, view
        fabric.seed_table(0, {"a": 4, "b": 1, "c": 2, "d": 7}, 1 << 16, 16)
        storage = StorageDir.open(directory, 1)
        try:
            assert storage.previous == dead
            epoch = storage.epoch
            rescued = rescue(storage)
            assert rescued.stored == 3  # a3, a4, b1; c2 would leave c1 a hole
            assert rescued.rings and rescued.holes == ["c", "d"]
            assert storage.settle(rings=True, hole=False, fsync="batch") == epoch
            assert storage.settle(rings=True, hole=True, fsync="batch") != epoch
            assert storage.seqs(0) == {"a": 4, "b": 1}
            db = connect(storage.path(0))
            keys = db.execute("SELECT key FROM recent_keys ORDER BY key").fetchall()
            db.close()
            assert keys == [("ka3",), ("ka4",), ("kb1",)]
        finally:
            storage.close()
    finally:
        fabric.close()
        segments.unlink_all(dead)
