"""The room store's write path alone: CPU per message, spans against a row per message, one run.

A :class:`~shardchat.storage.store.RoomStore` (its writer thread, fsync
``batch``, ``delivery.history`` 1000) is handed turns of ``--sizes``
messages spread over ``--rooms`` rooms, half of them with an idempotency key;
each turn waits for its hand-back (as the acks do), so each turn is one
transaction. The figure is the process's CPU time (the loop's side and the
writer thread's) per message, for the store as it is (``spans``: a row of
``groups`` per transaction, folded into per-room spans once a second) and for the
earlier design (``rows``: a row per message in a table keyed by (room, seq),
the rooms' seqs and the keys upserted in every transaction), alternately,
``--rounds`` times.

Usage: ``python -m perf.micro.store_write [--seconds 1.0] [--rounds 2]
[--sizes 1,4,32] [--rooms 100]``.
A benchmark, not a test: the figures go to perf/RESULTS.md.
"""

from __future__ import annotations

import argparse
import sqlite3
import tempfile
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from unittest import mock

from shardchat.storage import store as store_module
from shardchat.storage.store import RoomStore
from shardchat.storage.transactions import Row, Transactions

PAYLOAD = (
    b'{"type":"message","room":"room-00000","sender":"user-1","content":"'
    + b"x" * 100
    + b'","seq":1,"timestamp":1700000000000,"id":"b-1"}'
)
_ROWS_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    room TEXT NOT NULL, seq INTEGER NOT NULL, at REAL NOT NULL, json BLOB NOT NULL,
    PRIMARY KEY (room, seq));
CREATE TABLE IF NOT EXISTS keys (
    key TEXT PRIMARY KEY, room TEXT NOT NULL, seq INTEGER NOT NULL, at REAL NOT NULL)
    WITHOUT ROWID;
"""


class RowPerMessage(Transactions):
    """The earlier design's transaction: every message a row of its own."""

    def __init__(self, db: sqlite3.Connection, history: int, history_ttl: float) -> None:
        super().__init__(db, history, history_ttl)
        db.executescript(_ROWS_SCHEMA)  # once: not part of a write's cost

    def write(self, rows: list[Row]) -> bool:
        db = self.db
        latest = {row[0]: row[1] for row in rows}
        db.execute("BEGIN IMMEDIATE")
        db.executemany(
            "INSERT OR REPLACE INTO messages VALUES (?, ?, ?, ?)",
            [(room, seq, at, json) for room, seq, at, _, json in rows],
        )
        db.executemany("INSERT OR REPLACE INTO rooms VALUES (?, ?)", latest.items())
        keyed = [(key, room, seq, at) for room, seq, at, key, _ in rows if key]
        db.executemany("INSERT OR REPLACE INTO keys VALUES (?, ?, ?, ?)", keyed)
        db.execute("COMMIT")
        return True

    def fold(self, rows: Iterable[Row]) -> bool:
        return True


def per_message(path: Path, batch: int, rooms: int, seconds: float) -> float:
    """CPU microseconds per message over ``seconds`` of turns of ``batch``."""
    stored = threading.Event()
    store: RoomStore[int] = RoomStore(
        path, fsync="batch", max_bytes=0, history=1000, history_ttl=0, wake=stored.set
    )
    store.start()
    seqs: dict[str, int] = {}
    n = turns = 0
    cpu = time.process_time()
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(batch):
            room = f"room-{n % rooms}"
            seq = seqs[room] = seqs.get(room, 0) + 1
            store.add(room, seq, time.time(), f"k{n}" if n % 2 else "", PAYLOAD)
            n += 1
        store.submit(turns)
        turns += 1
        stored.wait()
        stored.clear()
        assert all(ok for _, ok in store.finished())
    store.close()  # its last fold counted
    cpu = time.process_time() - cpu
    return cpu / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--sizes", default="1,4,32")
    parser.add_argument("--rooms", type=int, default=100)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    print("| turn | round | spans (µs/message) | rows (µs/message) | ratio |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for batch in sizes:
        for round_ in range(args.rounds):
            got = {}
            with tempfile.TemporaryDirectory() as tmp:
                for design in ("rows", "spans"):
                    path = Path(tmp) / f"{design}.db"
                    if design == "rows":
                        with mock.patch.object(store_module, "Transactions", RowPerMessage):
                            got[design] = per_message(path, batch, args.rooms, args.seconds)
                    else:
                        got[design] = per_message(path, batch, args.rooms, args.seconds)
            spans, rows = got["spans"], got["rows"]
            print(f"| {batch} | {round_ + 1} | {spans:.1f} | {rows:.1f} | {spans / rows:.2f} |")


if __name__ == "__main__":
    main()
