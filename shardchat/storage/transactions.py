"""The room store's transactions: its schema, and the writer thread's writes on its connection.

docs/ARCHITECTURE.md, The room store. :class:`Transactions` stores a group of
rows (with their rooms' seqs and idempotency keys) in one transaction, trims
each room to ``delivery.history``, and prunes old keys and, with
``delivery.history_ttl``, old messages; :func:`connect` opens a store file
(WAL mode) with the schema.
"""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

from shardchat.core.broker import KEY_WINDOW
from shardchat.logs import log_event

__all__ = ["PRUNE_EVERY", "SYNCHRONOUS", "TRIM_EVERY", "Row", "Transactions", "connect"]

log = logging.getLogger(__name__)

TRIM_EVERY = 32  # a room's messages past delivery.history are deleted this many at a time
PRUNE_EVERY = 30.0  # seconds between deletions of expired keys (and messages by age)

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
SYNCHRONOUS = {"always": "FULL", "batch": "NORMAL", "off": "OFF"}

Row = tuple[str, int, float, str, bytes]  # room, seq, wall time, idempotency key, JSON


def connect(path: Path, synchronous: str = "NORMAL") -> sqlite3.Connection:
    """A connection to the store at ``path`` in WAL mode, with the schema."""
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=10.0)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute(f"PRAGMA synchronous={synchronous}")
    db.executescript(_SCHEMA)
    return db


class Transactions:
    """The writer thread's transactions (its own connection)."""

    def __init__(self, db: sqlite3.Connection, history: int, history_ttl: float) -> None:
        self.db = db
        self.history = history
        self.history_ttl = history_ttl
        self._failing = False  # the last write failed (logged once until one succeeds)
        self._trimmed: dict[str, int] = {}  # room -> the seq up to which it was trimmed
        self._next_prune = 0.0

    def write(self, rows: list[Row]) -> bool:
        """Store ``rows`` in one transaction."""
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
            if not self._failing:
                log_event(log, logging.ERROR, "storage_write_failed", error=str(exc))
            self._failing = True
            return False
        self._failing = False
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
        if wall < self._next_prune:
            return
        self._next_prune = wall + PRUNE_EVERY
        try:
            self.db.execute("DELETE FROM keys WHERE at < ?", (wall - KEY_WINDOW,))
            if self.history_ttl:
                self.db.execute("DELETE FROM messages WHERE at < ?", (wall - self.history_ttl,))
        except sqlite3.Error as exc:
            log_event(log, logging.WARNING, "storage_prune_failed", error=str(exc))
