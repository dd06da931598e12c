"""Which embedded store: the three candidates' costs per turn, in one run.

For each candidate, in a fresh temporary directory: a turn's batch of
messages appended and committed (batches of 1 and of 32, the per-message
cost and the commit's), with and without a sync to the disk; the last
50 messages of a room paged by seq; and the start-up read of every room's
latest seq over ``--messages`` stored messages. Candidates:

- ``file``: an append-only log file (length, CRC, record) written with
  ``os.write`` and synced with ``fdatasync``: the cost floor of a memory-mapped
  ring file, without its index (paging by room needs one of its own);
- ``lmdb`` (py-lmdb, when installed): one environment, a key per (room, seq);
- ``sqlite``: WAL mode, a table keyed (room, seq) WITHOUT ROWID, ``synchronous``
  OFF (no sync), NORMAL (synced at checkpoints) and FULL (every commit synced);
  then a rowid table with (room, seq) as its index (the store's schema).

Usage: ``python -m perf.micro.storage_choice [--messages 200000] [--rooms 2000]``.
A benchmark, not a test: the figures go to perf/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import struct
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path

PAYLOAD = (
    b'{"type":"message","room":"room-00000","sender":"user-1","content":"' + b"x" * 100 + b'"}'
)


def _per_turn(
    commit: Callable[[list[tuple[str, int, bytes]]], None], batch: int, seqs: dict[str, int]
) -> float:
    """Microseconds per turn of ``batch`` messages, over about 0.5 s."""
    turns = 0
    start = time.perf_counter()
    while time.perf_counter() - start < 0.5:
        rows = []
        for i in range(batch):
            room = f"room-{(turns * batch + i) % 500}"
            seq = seqs[room] = seqs.get(room, 0) + 1
            rows.append((room, seq, PAYLOAD))
        commit(rows)
        turns += 1
    return (time.perf_counter() - start) / turns * 1e6


def bench_file(d: Path, sync: bool) -> Callable[[list[tuple[str, int, bytes]]], None]:
    fd = os.open(d / "log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    head = struct.Struct("<II")

    def commit(rows: list[tuple[str, int, bytes]]) -> None:
        parts = []
        for room, seq, payload in rows:
            body = room.encode() + seq.to_bytes(8, "little") + payload
            parts.append(head.pack(len(body), zlib.crc32(body)) + body)
        os.write(fd, b"".join(parts))
        if sync:
            os.fdatasync(fd)

    return commit


def bench_lmdb(d: Path, sync: bool) -> Callable[[list[tuple[str, int, bytes]]], None] | None:
    try:
        import lmdb  # type: ignore[import-not-found]
    except ImportError:
        return None
    env = lmdb.open(str(d / "lmdb"), map_size=1 << 32, sync=sync, metasync=sync)

    def commit(rows: list[tuple[str, int, bytes]]) -> None:
        with env.begin(write=True) as txn:
            for room, seq, payload in rows:
                txn.put(room.encode() + b"\0" + seq.to_bytes(8, "big"), payload)

    return commit


def open_sqlite(path: Path, sync: str, rowid: bool = False) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute(f"PRAGMA synchronous={sync}")
    db.execute(
        "CREATE TABLE IF NOT EXISTS m (room TEXT, seq INTEGER, json BLOB,"
        f" PRIMARY KEY (room, seq)){'' if rowid else ' WITHOUT ROWID'}"
    )
    return db


def bench_sqlite(
    d: Path, sync: str, rowid: bool = False
) -> Callable[[list[tuple[str, int, bytes]]], None]:
    db = open_sqlite(d / f"s-{sync}-{rowid}.db", sync, rowid)

    def commit(rows: list[tuple[str, int, bytes]]) -> None:
        db.execute("BEGIN")
        db.executemany("INSERT INTO m VALUES (?, ?, ?)", rows)
        db.execute("COMMIT")

    return commit


def start_reads(d: Path, messages: int, rooms: int) -> dict[str, float]:
    """Seconds to read every room's latest seq, and ms to page 50, over ``messages``."""
    out: dict[str, float] = {}
    db = open_sqlite(d / "start.db", "OFF")
    per_room = messages // rooms
    db.execute("BEGIN")
    db.executemany(
        "INSERT INTO m VALUES (?, ?, ?)",
        ((f"room-{r}", s, PAYLOAD) for r in range(rooms) for s in range(1, per_room + 1)),
    )
    db.execute("COMMIT")
    db.close()
    t = time.perf_counter()
    db = open_sqlite(d / "start.db", "OFF")
    latest = db.execute("SELECT room, MAX(seq) FROM m GROUP BY room").fetchall()
    out["sqlite start (s)"] = time.perf_counter() - t
    assert len(latest) == rooms
    t = time.perf_counter()
    for r in range(200):
        db.execute(
            "SELECT seq, json FROM m WHERE room = ? AND seq < ? ORDER BY seq DESC LIMIT 50",
            (f"room-{r}", per_room // 2),
        ).fetchall()
    out["sqlite page of 50 (ms)"] = (time.perf_counter() - t) / 200 * 1e3
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--rooms", type=int, default=2_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=os.environ.get("STORE_BENCH_DIR")) as tmp:
        d = Path(tmp)
        print("| candidate | sync | us/turn of 1 | us/turn of 32 | us/message at 32 |")
        print("| --- | --- | ---: | ---: | ---: |")
        cases: list[tuple[str, str, Callable[[], Callable[..., None] | None]]] = [
            ("file", "none", lambda: bench_file(d, False)),
            ("file", "fdatasync", lambda: bench_file(d, True)),
            ("lmdb", "none", lambda: bench_lmdb(d / "a", False)),
            ("lmdb", "sync", lambda: bench_lmdb(d / "b", True)),
            ("sqlite WAL", "OFF", lambda: bench_sqlite(d, "OFF")),
            ("sqlite WAL", "NORMAL", lambda: bench_sqlite(d, "NORMAL")),
            ("sqlite WAL", "FULL", lambda: bench_sqlite(d, "FULL")),
            ("sqlite WAL, rowid table", "OFF", lambda: bench_sqlite(d, "OFF", True)),
            ("sqlite WAL, rowid table", "NORMAL", lambda: bench_sqlite(d, "NORMAL", True)),
        ]
        for name, sync, make in cases:
            (d / "a").mkdir(exist_ok=True)
            (d / "b").mkdir(exist_ok=True)
            commit = make()
            if commit is None:
                print(f"| {name} | {sync} | (not installed) | | |")
                continue
            seqs: dict[str, int] = {}
            one = _per_turn(commit, 1, seqs)
            many = _per_turn(commit, 32, seqs)
            print(f"| {name} | {sync} | {one:.1f} | {many:.1f} | {many / 32:.2f} |")
        for key, value in start_reads(d, args.messages, args.rooms).items():
            print(f"{key}: {value:.3f} ({args.messages} messages, {args.rooms} rooms)")


if __name__ == "__main__":
    main()
