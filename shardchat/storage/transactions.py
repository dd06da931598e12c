"""The room store's transactions: its schema, and the writer thread's writes on its connection.

docs/ARCHITECTURE.md, The room store. A store file holds each room's
messages in *spans*: rows of up to ``SPAN_ROWS`` consecutive messages of
one room, keyed by (room, last seq). The writer stores each group of turns
it gathers as one row of ``groups`` (:meth:`Transactions.write`: a commit
that dirties a page or two, whatever the rooms), and *folds* the groups
into spans about once a second (:meth:`Transactions.fold`: an index entry
per room per second, not per message), with the rooms' seqs and the
idempotency keys; a fold trims each room to ``delivery.history`` (by whole
spans), and the writer prunes old keys and, with ``delivery.history_ttl``,
old spans. :func:`connect` opens a store file (WAL mode) with the schema,
moves a file of the earlier schema (a row per message) into spans, and
folds the groups a writer that is gone left.
"""

from __future__ import annotations

import logging
import sqlite3
import struct
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from shardchat.core.broker import KEY_WINDOW
from shardchat.core.errors import StorageError
from shardchat.logs import log_event

__all__ = [
    "PRUNE_EVERY",
    "SCHEMA_VERSION",
    "SPAN_ROWS",
    "SYNCHRONOUS",
    "TRIM_EVERY",
    "Row",
    "Transactions",
    "connect",
    "group_rows",
    "pack_group",
    "span_messages",
    "store_rows",
]

log = logging.getLogger(__name__)

TRIM_EVERY = 32  # a room's messages past delivery.history are deleted this many at a time
PRUNE_EVERY = 30.0  # seconds between deletions of expired keys (and messages by age)
SPAN_ROWS = 32  # a span holds at most this many messages (a room is trimmed by spans)
SCHEMA_VERSION = 2  # PRAGMA user_version: 0 is the earlier schema (a row per message)

# A WAL commit writes every page it dirtied (10-15 µs of CPU a page here), and
# a row per message keyed by (room, seq) dirtied one index page per room in
# each commit: most of the store's cost (perf/RESULTS.md, The room store's
# write path). `groups` is a rowid table appended at its end; a span is
# written once per room per fold. `recent_keys` is appended in time order
# and read whole at start-up: no key is ever looked up in the file.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS groups (id INTEGER PRIMARY KEY, rows BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS spans (
    room TEXT NOT NULL, last INTEGER NOT NULL, first INTEGER NOT NULL, count INTEGER NOT NULL,
    oldest REAL NOT NULL, newest REAL NOT NULL, rows BLOB NOT NULL,
    PRIMARY KEY (room, last));
CREATE TABLE IF NOT EXISTS rooms (
    room TEXT PRIMARY KEY, seq INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS recent_keys (
    key TEXT NOT NULL, room TEXT NOT NULL, seq INTEGER NOT NULL, at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS recent_keys_at ON recent_keys (at);
"""
SYNCHRONOUS = {"always": "FULL", "batch": "NORMAL", "off": "OFF"}

Row = tuple[str, int, float, str, bytes]  # room, seq, wall time, idempotency key, JSON

# A group: its messages one after the other, each a header and its room, key
# and JSON. A span: seq and JSON of each (its room is the row's).
_GROUP_HEAD = struct.Struct("<qdHHI")  # seq, wall time, len(room), len(key), len(JSON)
_SPAN_HEAD = struct.Struct("<qI")  # seq, len(JSON)


def pack_group(rows: list[Row]) -> bytes:
    head = _GROUP_HEAD.pack
    parts: list[bytes] = []
    for room, seq, at, key, json in rows:
        r, k = room.encode(), key.encode()
        parts += (head(seq, at, len(r), len(k), len(json)), r, k, json)
    return b"".join(parts)


def group_rows(blob: bytes) -> list[Row]:
    """The messages of one group."""
    rows: list[Row] = []
    unpack, size = _GROUP_HEAD.unpack_from, _GROUP_HEAD.size
    pos = 0
    end = len(blob)
    while pos < end:
        seq, at, r, k, j = unpack(blob, pos)
        pos += size
        room = blob[pos : pos + r].decode()
        key = blob[pos + r : pos + r + k].decode()
        pos += r + k
        rows.append((room, seq, at, key, blob[pos : pos + j]))
        pos += j
    return rows


def _pack_span(rows: list[Row]) -> bytes:
    head = _SPAN_HEAD.pack
    return b"".join(part for row in rows for part in (head(row[1], len(row[4])), row[4]))


def span_messages(blob: bytes) -> Iterator[tuple[int, bytes]]:
    """The (seq, JSON) of each message of one span, in seq order."""
    unpack, size = _SPAN_HEAD.unpack_from, _SPAN_HEAD.size
    pos = 0
    end = len(blob)
    while pos < end:
        seq, j = unpack(blob, pos)
        pos += size
        yield seq, blob[pos : pos + j]
        pos += j


def store_rows(
    db: sqlite3.Connection, rows: Iterable[Row], *, messages: bool = True
) -> dict[str, int]:
    """Write ``rows`` (each room's in seq order) as spans, with the rooms' seqs
    and the keys, in the caller's transaction; each room's newest seq. Without
    ``messages`` (``delivery.history = 0``) only the seqs and the keys."""
    by_room: dict[str, list[Row]] = {}
    keyed: list[tuple[str, str, int, float]] = []
    for row in rows:
        room = row[0]
        if room in by_room:
            by_room[room].append(row)
        else:
            by_room[room] = [row]
        if row[3]:
            keyed.append((row[3], room, row[1], row[2]))
    spans = []
    for room, held in by_room.items() if messages else ():
        for i in range(0, len(held), SPAN_ROWS):
            part = held[i : i + SPAN_ROWS]
            first, last = part[0], part[-1]
            spans.append((room, last[1], first[1], len(part), first[2], last[2], _pack_span(part)))
    db.executemany("INSERT OR REPLACE INTO spans VALUES (?, ?, ?, ?, ?, ?, ?)", spans)
    latest = {room: held[-1][1] for room, held in by_room.items()}
    db.executemany(
        "INSERT INTO rooms VALUES (?, ?) ON CONFLICT (room) DO UPDATE SET seq = excluded.seq"
        " WHERE excluded.seq > seq",
        latest.items(),
    )
    if keyed:
        db.executemany("INSERT INTO recent_keys VALUES (?, ?, ?, ?)", keyed)
    return latest


def connect(path: Path, synchronous: str = "NORMAL") -> sqlite3.Connection:
    """A connection to the store at ``path`` in WAL mode, with the schema.

    A file of the earlier schema is moved into spans, and the groups a writer
    that is gone left are folded: open a file this way only when no writer
    runs on it (the storage directory's lock, and a shard's store opening its
    reading connection before it starts its writer, make sure)."""
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=10.0)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={synchronous}")
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StorageError(
                f"{path}: made by a newer shardchat (layout {version}, this one reads"
                f" {SCHEMA_VERSION}): start that version, or move the file away"
            )
        if version != SCHEMA_VERSION:
            _upgrade(db)
        if db.execute("SELECT 1 FROM groups LIMIT 1").fetchone():
            _settle_groups(db)
    except sqlite3.OperationalError as exc:
        db.close()
        if exc.sqlite_errorcode == sqlite3.SQLITE_FULL:
            # Not an unreadable file (that one is set aside): nothing is lost,
            # the open needs room to write what it moves.
            raise StorageError(
                f"{path}: the disk is full; the store needs room to fold what its"
                " writer left (or to move a file of the earlier layout): free some"
                " and start again"
            ) from exc
        raise
    except BaseException:
        db.close()
        raise
    return db


def _upgrade(db: sqlite3.Connection) -> None:
    def upgrade() -> None:
        earlier = db.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'messages'"
        ).fetchone()
        for statement in _SCHEMA.split(";"):  # not executescript: it commits first
            if statement.strip():
                db.execute(statement)
        if earlier:
            moved = _move_earlier(db)
            log_event(log, logging.WARNING, "storage_schema_upgraded", messages=moved)
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    _transaction(db, upgrade)


def _move_earlier(db: sqlite3.Connection) -> int:
    """The earlier schema's rows (a row per message) into spans; how many."""
    cursor = db.execute("SELECT room, seq, at, json FROM messages ORDER BY room, seq")
    moved = 0
    while batch := cursor.fetchmany(8192):
        # a room cut between two batches gets two spans: a span need not be full
        store_rows(db, ((room, seq, at, "", bytes(json)) for room, seq, at, json in batch))
        moved += len(batch)
    db.execute("INSERT INTO recent_keys SELECT key, room, seq, at FROM keys")
    db.execute("DROP TABLE messages")
    db.execute("DROP TABLE keys")
    return moved


def _settle_groups(db: sqlite3.Connection) -> None:
    def settle() -> None:
        blobs = db.execute("SELECT rows FROM groups ORDER BY id").fetchall()
        store_rows(db, (row for (blob,) in blobs for row in group_rows(bytes(blob))))
        db.execute("DELETE FROM groups")

    _transaction(db, settle)


def _transaction(db: sqlite3.Connection, work: Callable[[], object]) -> None:
    """Run ``work`` in one write transaction, rolled back if it raises."""
    db.execute("BEGIN IMMEDIATE")
    try:
        work()
        db.execute("COMMIT")
    except BaseException:
        try:
            db.execute("ROLLBACK")
        except sqlite3.Error:
            pass
        raise


class Transactions:
    """The writer thread's transactions (its own connection)."""

    def __init__(self, db: sqlite3.Connection, history: int, history_ttl: float) -> None:
        self.db = db
        self.history = history
        self.history_ttl = history_ttl
        self._failing: set[str] = set()  # the events of what failed last time (logged once)
        self._trimmed: dict[str, int] = {}  # room -> the seq up to which it was trimmed
        self._next_prune = 0.0

    def write(self, rows: list[Row]) -> bool:
        """Store ``rows`` in one transaction: a row of ``groups``."""
        if not rows:
            return True
        # One statement in autocommit: a transaction of its own, and one release
        # of the GIL (each execute takes it back from the loop).
        blob = pack_group(rows)
        return self._run(
            "storage_write_failed",
            lambda: self.db.execute("INSERT INTO groups (rows) VALUES (?)", (blob,)),
        )

    def fold(self, rows: Iterable[Row]) -> bool:
        """Move the groups, whose messages are ``rows``, into spans, trimming
        each room they touched."""
        trims: list[tuple[str, int]] = []

        def move() -> None:
            db = self.db
            latest = store_rows(db, rows, messages=self.history > 0)
            db.execute("DELETE FROM groups")
            trims.extend(self._trims(latest))
            if trims:
                db.executemany("DELETE FROM spans WHERE room = ? AND last <= ?", trims)

        if not self._run("storage_fold_failed", lambda: _transaction(self.db, move)):
            return False
        for room, upto in trims:
            self._trimmed[room] = upto
        return True

    def _run(self, failed: str, work: Callable[[], object]) -> bool:
        """``work``'s SQLite error logged as ``failed`` (once until it succeeds)."""
        try:
            work()
        except sqlite3.Error as exc:
            if failed not in self._failing:
                log_event(log, logging.ERROR, failed, error=str(exc))
            self._failing.add(failed)
            return False
        self._failing.discard(failed)
        return True

    def _trims(self, latest: dict[str, int]) -> list[tuple[str, int]]:
        # With history 0 a fold writes no spans; this deletes those an open or a
        # rescue wrote.
        history = self.history
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
            self.db.execute("DELETE FROM recent_keys WHERE at < ?", (wall - KEY_WINDOW,))
            if self.history_ttl:
                self.db.execute("DELETE FROM spans WHERE newest < ?", (wall - self.history_ttl,))
        except sqlite3.Error as exc:
            log_event(log, logging.WARNING, "storage_prune_failed", error=str(exc))
