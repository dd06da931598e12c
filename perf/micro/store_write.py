"""The room store's write path alone: CPU per message, both message schemas, one run.

A :class:`~shardchat.storage.store.RoomStore` (its writer thread, fsync
``batch``, ``delivery.history`` 1000) is handed turns of 1, 4 and 32
messages spread over 100 rooms, half of them with an idempotency key; each
turn waits for its hand-back (as the acks do). The figure is the process's
CPU time (the loop's side and the writer thread's) per message. Each size
runs on a file made with the store's schema (``rowid``: a rowid table with
(room, seq) as its index) and on one made with the earlier schema
(``without rowid``: the table keyed by (room, seq)), alternately, ``--rounds``
times.

With ``--parts``: the writer's transaction alone (no thread), on groups of
``--sizes`` messages over 100 rooms, CPU per message of the whole write and
of the same write without each of its parts in turn: the (room, seq) index
(a table without a key), the rooms' seq upsert, the idempotency keys.

Usage: ``python -m perf.micro.store_write [--seconds 1.0] [--rounds 2]
[--sizes 1,4,32] [--parts]``.
A benchmark, not a test: the figures go to perf/RESULTS.md.
"""

from __future__ import annotations

import argparse
import sqlite3
import tempfile
import threading
import time
from contextlib import closing
from pathlib import Path

from shardchat.storage.store import RoomStore
from shardchat.storage.transactions import Row, Transactions, connect

PAYLOAD = (
    b'{"type":"message","room":"room-00000","sender":"user-1","content":"'
    + b"x" * 100
    + b'","seq":1,"timestamp":1700000000000,"id":"b-1"}'
)
_EARLIER = (
    "CREATE TABLE messages (room TEXT NOT NULL, seq INTEGER NOT NULL, at REAL NOT NULL,"
    " json BLOB NOT NULL, PRIMARY KEY (room, seq)) WITHOUT ROWID"
)


def per_message(path: Path, batch: int, seconds: float) -> float:
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
            room = f"room-{n % 100}"
            seq = seqs[room] = seqs.get(room, 0) + 1
            store.add(room, seq, time.time(), f"k{n}" if n % 2 else "", PAYLOAD)
            n += 1
        store.submit(turns)
        turns += 1
        stored.wait()
        stored.clear()
        assert all(ok for _, ok in store.finished())
    cpu = time.process_time() - cpu
    store.close()
    return cpu / n * 1e6


_PARTS = ("whole", "no (room, seq) index", "no rooms upsert", "no keys")


class _Without(Transactions):
    """The writer's transaction less one part (``_PARTS``)."""

    def __init__(self, path: Path, part: str) -> None:
        db = connect(path, "NORMAL")
        if part == _PARTS[1]:
            db.executescript(
                "DROP TABLE messages; CREATE TABLE messages"
                " (room TEXT NOT NULL, seq INTEGER NOT NULL, at REAL NOT NULL, json BLOB NOT NULL)"
            )
        super().__init__(db, 1 << 40, 0.0)  # no trims: the same work in every variant
        self.part = part

    def write(self, rows: list[Row]) -> bool:
        if self.part == _PARTS[3]:
            rows = [(room, seq, at, "", json) for room, seq, at, _, json in rows]
        if self.part != _PARTS[2]:
            return super().write(rows)
        db = self.db  # the write's statements but the rooms' upsert
        db.execute("BEGIN IMMEDIATE")
        db.executemany(
            "INSERT OR REPLACE INTO messages VALUES (?, ?, ?, ?)",
            [(room, seq, at, json) for room, seq, at, _, json in rows],
        )
        keyed = [(key, room, seq, at) for room, seq, at, key, _ in rows if key]
        db.executemany("INSERT OR REPLACE INTO keys VALUES (?, ?, ?, ?)", keyed)
        db.execute("COMMIT")
        return True


def part_cost(path: Path, part: str, size: int, seconds: float) -> float:
    """CPU microseconds per message of ``part``'s transactions of ``size`` messages."""
    writer = _Without(path, part)
    seqs: dict[str, int] = {}
    n = 0
    cpu = time.thread_time()
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        rows: list[Row] = []
        for _ in range(size):
            room = f"room-{n % 100}"
            seq = seqs[room] = seqs.get(room, 0) + 1
            rows.append((room, seq, time.time(), f"k{n}" if n % 2 else "", PAYLOAD))
            n += 1
        assert writer.write(rows)
        if n % 20_000 < size:
            writer.checkpoint()  # as the store does once a second
    cpu = time.thread_time() - cpu
    writer.db.close()
    return cpu / n * 1e6


def parts(sizes: list[int], seconds: float, rounds: int) -> None:
    print("| group | round | " + " | ".join(_PARTS) + " |")
    print("| ---: | ---: |" + " ---: |" * len(_PARTS))
    for size in sizes:
        for round_ in range(rounds):
            got = []
            for part in _PARTS:
                with tempfile.TemporaryDirectory() as tmp:
                    got.append(part_cost(Path(tmp) / "s.db", part, size, seconds))
            print(f"| {size} | {round_ + 1} | " + " | ".join(f"{c:.1f}" for c in got) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--sizes", default="1,4,32")
    parser.add_argument("--parts", action="store_true")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.parts:
        parts(sizes, args.seconds, args.rounds)
        return
    print("| turn | round | rowid (us/message) | without rowid (us/message) | ratio |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for batch in sizes:
        for round_ in range(args.rounds):
            got = {}
            with tempfile.TemporaryDirectory() as tmp:
                for schema in ("without rowid", "rowid"):
                    path = Path(tmp) / f"{schema.replace(' ', '-')}.db"
                    if schema == "without rowid":
                        with closing(sqlite3.connect(path)) as early:
                            early.execute(_EARLIER)  # kept: the store's schema says IF NOT EXISTS
                    got[schema] = per_message(path, batch, args.seconds)
            rowid, earlier = got["rowid"], got["without rowid"]
            print(
                f"| {batch} | {round_ + 1} | {rowid:.1f} | {earlier:.1f} | {rowid / earlier:.2f} |"
            )


if __name__ == "__main__":
    main()
