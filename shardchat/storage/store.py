"""One owner shard's room store: what it sequenced, in SQLite (WAL), written by a thread.

docs/ARCHITECTURE.md, The room store. The owner shard adds each message it
sequences during a loop turn (:meth:`RoomStore.add`) and hands the turn's
batch to the writer thread at the turn's end (:meth:`RoomStore.submit`) with
a token (the turn's acks). The thread writes every batch that waits in one
transaction (a group commit), synced per ``storage.fsync``, and hands the
tokens back through :meth:`RoomStore.finished`, with whether they are
stored, then calls ``wake`` (the shard's own doorbell) so that the loop
sends the acks. The loop never waits for the disk.

- ``always``: every transaction is synced before its acks (``synchronous =
  FULL``): a power loss loses nothing acked.
- ``batch``: acks once written to the OS; the WAL is synced by a checkpoint
  every ``SYNC_EVERY`` seconds: a power loss loses at most that much.
- ``off``: never synced: the OS writes back when it likes. A crash of every
  process loses nothing in any mode (the data is in the OS's cache).

A write that fails (a full disk, ``storage.max_bytes``) fails the acks of
its batches, keeps their rows and tries them again every ``RETRY_EVERY``,
first in every later transaction: the store is :attr:`RoomStore.full` until
one succeeds, and the broker refuses new publishes meanwhile.

Retention: a room keeps its last ``delivery.history`` messages (trimmed every
``TRIM_EVERY`` messages, so at most that many more) and, with
``delivery.history_ttl``, none older than that; its seq is kept for ever in
``rooms``. Idempotency keys are kept for ``KEY_WINDOW``.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, TypeVar

from shardchat.core.broker import KEY_WINDOW
from shardchat.core.roomlog import HeldMessage
from shardchat.logs import log_event

__all__ = ["RETRY_EVERY", "SYNC_EVERY", "TRIM_EVERY", "Restored", "RoomStore", "connect"]

log = logging.getLogger(__name__)

SYNC_EVERY = 1.0  # seconds between syncs with storage.fsync = "batch"
RETRY_EVERY = 0.5  # seconds between tries of a write that failed (a full disk)
TRIM_EVERY = 32  # a room's messages past delivery.history are deleted this many at a time
PRUNE_EVERY = 30.0  # seconds between deletions of expired keys (and messages by age)

T = TypeVar("T")

# messages is a rowid table (appended in the order written) with its (room, seq)
# key as an index: a turn's rows, of many rooms, land on the table's last pages
# and only the small index entries are spread over one page per room. Keyed
# WITHOUT ROWID by (room, seq) each row of ~200 bytes dirtied its room's leaf
# page and a write cost about twice as much CPU (perf/RESULTS.md, The room
# store's write path). Files made before keep that schema: the statements are
# the same for both.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    room TEXT NOT NULL, seq INTEGER NOT NULL, at REAL NOT NULL, json BLOB NOT NULL,
    PRIMARY KEY (room, seq));
CREATE TABLE IF NOT EXISTS rooms (
    room TEXT PRIMARY KEY, seq INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS keys (
    key TEXT PRIMARY KEY, room TEXT NOT NULL, seq INTEGER NOT NULL, at REAL NOT NULL)
    WITHOUT ROWID;
"""
_SYNCHRONOUS = {"always": "FULL", "batch": "NORMAL", "off": "OFF"}

Row = tuple[str, int, float, str, bytes]  # room, seq, wall time, idempotency key, JSON


def connect(path: Path, synchronous: str = "NORMAL") -> sqlite3.Connection:
    """A connection to the store at ``path`` in WAL mode, with the schema."""
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=10.0)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute(f"PRAGMA synchronous={synchronous}")
    db.executescript(_SCHEMA)
    return db


@dataclass(frozen=True, slots=True)
class Restored:
    """What a store holds at start-up: each room's seq and the recent keys."""

    seqs: dict[str, int]
    keys: list[tuple[str, str, int, float]]  # key, room, seq, wall time


@dataclass(slots=True)
class _Batch(Generic[T]):
    rows: list[Row]
    token: T


@dataclass(slots=True)
class _Shared(Generic[T]):
    """What the loop and the writer thread share, under ``lock``."""

    lock: threading.Condition = field(default_factory=threading.Condition)
    queue: list[_Batch[T]] = field(default_factory=list)
    done: list[tuple[T, bool]] = field(default_factory=list)
    stop: bool = False


class RoomStore(Generic[T]):
    """One shard's store file, its writer thread and its read connection."""

    def __init__(
        self,
        path: Path,
        *,
        fsync: str,
        max_bytes: int,
        history: int,
        history_ttl: float,
        wake: Callable[[], None],
    ) -> None:
        self.path = path
        self.fsync = fsync
        self.max_bytes = max_bytes
        self.history = history
        self.history_ttl = history_ttl
        self._wake = wake
        self._reader = connect(path, _SYNCHRONOUS[fsync])
        self._turn: list[Row] = []
        self._shared: _Shared[T] = _Shared()
        self.full = False  # the last write failed: publishes are refused until one succeeds
        self._thread: threading.Thread | None = None

    # The loop's side

    def restore(self) -> Restored:
        """Each room's seq and the idempotency keys of the last ``KEY_WINDOW``."""
        db = self._reader
        seqs = dict(db.execute("SELECT room, seq FROM rooms").fetchall())
        since = time.time() - KEY_WINDOW
        keys = db.execute(
            "SELECT key, room, seq, at FROM keys WHERE at >= ? ORDER BY at", (since,)
        ).fetchall()
        return Restored(seqs, keys)

    def start(self) -> None:
        """Start the writer thread."""
        self._thread = threading.Thread(target=self._run, name="shardchat-store", daemon=True)
        self._thread.start()

    def add(self, room: str, seq: int, at: float, key: str, json: bytes) -> None:
        """Message ``seq`` of ``room`` was sequenced this turn (``at``: wall seconds)."""
        self._turn.append((room, seq, at, key, json))

    def submit(self, token: T) -> None:
        """Hand this turn's messages to the writer; ``token`` comes back through
        :meth:`finished` once they (and every earlier batch) are stored."""
        rows, self._turn = self._turn, []
        shared = self._shared
        with shared.lock:
            shared.queue.append(_Batch(rows, token))
            shared.lock.notify()

    def finished(self) -> list[tuple[T, bool]]:
        """The tokens of the batches written since the last call, in order, each
        with True when stored, False when the write failed."""
        shared = self._shared
        if not shared.done:
            return []
        with shared.lock:
            done, shared.done = shared.done, []
        return done

    def read(self, room: str, first: int, last: int, limit: int) -> list[HeldMessage]:
        """The stored messages ``first..last`` of ``room``, at most ``limit``."""
        rows = self._reader.execute(
            "SELECT seq, json FROM messages WHERE room = ? AND seq BETWEEN ? AND ?"
            " ORDER BY seq LIMIT ?",
            (room, first, last, limit),
        ).fetchall()
        return [HeldMessage(seq, bytes(json)) for seq, json in rows]

    def close(self) -> None:
        """Write what waits, stop the thread and close the connections."""
        shared = self._shared
        with shared.lock:
            shared.stop = True
            shared.lock.notify()
        if self._thread is not None:
            self._thread.join(10.0)
        self._reader.close()

    # The writer thread

    def _run(self) -> None:
        db = connect(self.path, _SYNCHRONOUS[self.fsync])
        if self.max_bytes:
            page_size = db.execute("PRAGMA page_size").fetchone()[0]
            db.execute(f"PRAGMA max_page_count={max(1, self.max_bytes // page_size)}")
        writer = _Writer(db, self.history, self.history_ttl)
        shared = self._shared
        next_sync = time.monotonic() + SYNC_EVERY
        dirty = False
        batches: list[_Batch[T]] = []
        try:
            while True:
                with shared.lock:
                    if not shared.queue and not shared.stop:
                        wait = RETRY_EVERY if writer.retry else SYNC_EVERY
                        shared.lock.wait(wait)
                    batches, shared.queue = shared.queue, []
                    stop = shared.stop
                if batches or writer.retry:
                    ok = writer.write([row for batch in batches for row in batch.rows])
                    dirty = dirty or ok
                    self._set_full(not ok)
                    if batches:
                        with shared.lock:
                            shared.done += [(batch.token, ok) for batch in batches]
                        batches = []  # answered
                        self._wake()
                now = time.monotonic()
                if now >= next_sync:
                    next_sync = now + SYNC_EVERY
                    writer.prune(time.time())
                    if dirty and self.fsync == "batch":
                        writer.checkpoint()  # syncs the WAL
                    dirty = False
                if stop:
                    return  # a full disk at shutdown: what is not stored was not acked
        except Exception as exc:
            # A bug, not a full disk (sqlite3.Error is handled above): the writer
            # is gone, so every later batch fails (`unavailable`) rather than
            # waiting for ever, and publishes are refused.
            log_event(log, logging.CRITICAL, "storage_writer_failed", error=repr(exc))
            self._set_full(True)
            with shared.lock:  # the round's own batches first, then every later one
                shared.done += [(batch.token, False) for batch in batches]
            self._wake()
            self._fail_all()
        finally:
            db.close()

    def _fail_all(self) -> None:
        shared = self._shared
        while True:
            with shared.lock:
                if not shared.queue and not shared.stop:
                    shared.lock.wait(SYNC_EVERY)
                batches, shared.queue = shared.queue, []
                shared.done += [(batch.token, False) for batch in batches]
                stop = shared.stop
            if batches:
                self._wake()
            if stop:
                return

    def _set_full(self, full: bool) -> None:
        if full != self.full:
            self.full = full
            event = "storage_full" if full else "storage_resumed"
            level = logging.ERROR if full else logging.WARNING
            log_event(log, level, event, path=str(self.path))


class _Writer:
    """The writer thread's transactions (its own connection)."""

    def __init__(self, db: sqlite3.Connection, history: int, history_ttl: float) -> None:
        self.db = db
        self.history = history
        self.history_ttl = history_ttl
        self.retry: list[Row] = []  # rows of failed writes, written first next time
        self._trimmed: dict[str, int] = {}  # room -> the seq up to which it was trimmed
        self._next_prune = 0.0

    def write(self, rows: list[Row]) -> bool:
        """Store ``rows`` after the ones that failed before, in one transaction."""
        if self.retry:
            rows = self.retry + rows
        db = self.db
        history = self.history
        latest: dict[str, int] = {}
        for row in rows:
            latest[row[0]] = row[1]
        try:
            db.execute("BEGIN IMMEDIATE")
            if history:
                db.executemany(
                    "INSERT OR REPLACE INTO messages VALUES (?, ?, ?, ?)",
                    [(room, seq, at, json) for room, seq, at, _, json in rows],
                )
            db.executemany("INSERT OR REPLACE INTO rooms VALUES (?, ?)", latest.items())
            keyed = [(key, room, seq, at) for room, seq, at, key, _ in rows if key]
            if keyed:
                db.executemany("INSERT OR REPLACE INTO keys VALUES (?, ?, ?, ?)", keyed)
            trims = self._trims(latest)
            if trims:
                db.executemany("DELETE FROM messages WHERE room = ? AND seq <= ?", trims)
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            try:
                db.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            if not self.retry:
                log_event(log, logging.ERROR, "storage_write_failed", error=str(exc))
            self.retry = rows
            return False
        self.retry = []
        for room, upto in trims:
            self._trimmed[room] = upto
        return True

    def _trims(self, latest: dict[str, int]) -> list[tuple[str, int]]:
        history = self.history
        if not history:
            return []
        trimmed = self._trimmed
        return [
            (room, seq - history)
            for room, seq in latest.items()
            if seq - history - trimmed.get(room, 0) >= TRIM_EVERY
        ]

    def checkpoint(self) -> None:
        """Copy the log into the database, syncing both (``synchronous = NORMAL``)."""
        try:
            self.db.execute("PRAGMA wal_checkpoint(PASSIVE)")
        except sqlite3.Error as exc:  # a full disk: the log keeps it until the next
            log_event(log, logging.WARNING, "storage_checkpoint_failed", error=str(exc))

    def prune(self, wall: float) -> None:
        """Delete the keys older than ``KEY_WINDOW`` and, with a ttl, older messages."""
        if wall < self._next_prune or self.retry:
            return
        self._next_prune = wall + PRUNE_EVERY
        try:
            self.db.execute("DELETE FROM keys WHERE at < ?", (wall - KEY_WINDOW,))
            if self.history_ttl:
                self.db.execute("DELETE FROM messages WHERE at < ?", (wall - self.history_ttl,))
        except sqlite3.Error as exc:
            log_event(log, logging.WARNING, "storage_prune_failed", error=str(exc))
