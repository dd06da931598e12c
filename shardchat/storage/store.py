"""One owner shard's room store: what it sequenced, in SQLite (WAL), written by a thread.

docs/ARCHITECTURE.md, The room store. The owner shard adds each message it
sequences during a loop turn (:meth:`RoomStore.add`) and hands the turn's
batch to the writer thread at the turn's end (:meth:`RoomStore.submit`). The
thread gathers the turns of ``write_every`` seconds (woken once per gathering,
not once per turn) and writes them in one transaction (a group commit: SQLite
writes each page a commit dirtied, so a larger group shares them), one row of
the file's ``groups``, folded into per-room spans about once a second
(transactions.py), synced per ``storage.fsync``; a turn that finds the
writer's last transaction begun longer ago than that is written at once.
The loop never waits for the disk.

Acks (durable.py) wait for their messages to be stored, handed back per
gathering through :meth:`RoomStore.finished`, the thread waking the loop
with ``wake`` (``call_soon_threadsafe``); with ``always`` a batch with acks
is written at once. The writer is kept within ``overload.store`` messages of
the loop. A message members saw and the store lacks is in the owner's
shared-memory ring, which outlives every process (not a reboot): a shard
restarted after kill -9 stores from its ring what its store lacks before it
serves, and a start after a crash of every process stores it from the dead
run's rings (rescue.py).

- ``always``: every transaction is synced before its acks (``synchronous =
  FULL``): a power loss loses nothing acked.
- ``batch``: the WAL is synced by a checkpoint every ``SYNC_EVERY`` seconds: a
  power loss loses at most that much, plus the writer's backlog
  (``write_every``, at most ``overload.store`` messages).
- ``off``: never synced: the OS writes back when it likes.

A write that fails (a full disk, ``storage.max_bytes``) keeps its rows in
flight and tries them again every ``RETRY_EVERY``: the store is
:attr:`RoomStore.full` until one succeeds, the broker refuses new publishes
meanwhile, and tokens of batches that fail come back failed. What is still
unstored at shutdown is counted by :meth:`RoomStore.close`: it is in the
ring, which the supervisor then keeps for the next start.

Retention: a room keeps its last ``delivery.history`` messages (trimmed every
``TRIM_EVERY`` messages by whole spans, so at most ``TRIM_EVERY`` +
``SPAN_ROWS`` more) and, with ``delivery.history_ttl``, its spans are deleted
once their newest message is older than that (no replay sends an older
message); its seq is kept for ever in ``rooms``. Idempotency keys are kept
for ``KEY_WINDOW``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, TypeVar

from shardchat.core.broker import KEY_WINDOW
from shardchat.core.roomlog import HeldMessage
from shardchat.logs import log_event
from shardchat.storage.transactions import (
    SYNCHRONOUS,
    TRIM_EVERY,
    Row,
    Transactions,
    connect,
    span_messages,
)

__all__ = ["RETRY_EVERY", "SYNC_EVERY", "TRIM_EVERY", "Restored", "RoomStore", "connect"]

log = logging.getLogger(__name__)

SYNC_EVERY = 1.0  # seconds between syncs with storage.fsync = "batch"
RETRY_EVERY = 0.5  # seconds between tries of a write that failed (a full disk)
GROUP_ROWS = 2048  # rows waiting that wake the writer before write_every is up
FOLD_ROWS = 4096  # rows not folded yet that make the writer fold before its second is up

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Restored:
    """What a store holds at start-up: each room's seq and the recent keys."""

    seqs: dict[str, int]
    keys: list[tuple[str, str, int, float]]  # key, room, seq, wall time


@dataclass(slots=True)
class _Batch(Generic[T]):
    rows: list[Row]
    token: T | None  # handed back through finished(); None: nobody waits for it


@dataclass(slots=True)
class _Shared(Generic[T]):
    """What the loop and the writer thread share, under ``lock``."""

    lock: threading.Condition = field(default_factory=threading.Condition)
    queue: list[_Batch[T]] = field(default_factory=list)
    # Taken by the writer and not stored yet (a failed write's until it succeeds),
    # and stored in groups but not folded into spans yet: a fill reads them
    # here, before it reads the file's spans.
    inflight: list[_Batch[T]] = field(default_factory=list)
    unfolded: list[_Batch[T]] = field(default_factory=list)
    done: list[tuple[T, bool]] = field(default_factory=list)
    idle: bool = False  # the writer waits for a first batch: the next submit wakes it
    urgent: bool = False  # written at once, not gathered (fsync "always", far behind)
    stop: bool = False
    stored: int = 0  # rows stored since the start
    batches: int = 0  # batches stored since the start (in order)


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
        write_every: float = 0.0,
    ) -> None:
        self.path = path
        self.fsync = fsync
        self.max_bytes = max_bytes
        self.history = history
        self.history_ttl = history_ttl
        self.wake = wake  # called by the writer thread when tokens are back (finished)
        self.write_every = write_every
        self._last_write = 0.0  # monotonic, when the writer's last transaction began
        self._reader = connect(path, SYNCHRONOUS[fsync])
        self._turn: list[Row] = []
        self._shared: _Shared[T] = _Shared()
        self.submitted = 0  # rows handed to the writer
        self.batches = 0  # batches handed to the writer
        self.full = False  # the last write failed: publishes are refused until one succeeds
        self._thread: threading.Thread | None = None

    # The loop's side

    def restore(self) -> Restored:
        """Each room's seq and the idempotency keys of the last ``KEY_WINDOW``."""
        db = self._reader
        seqs = dict(db.execute("SELECT room, seq FROM rooms").fetchall())
        since = time.time() - KEY_WINDOW
        keys = db.execute(
            "SELECT key, room, seq, at FROM recent_keys WHERE at >= ? ORDER BY at, rowid", (since,)
        ).fetchall()
        return Restored(seqs, keys)

    def start(self) -> None:
        """Start the writer thread."""
        self._thread = threading.Thread(target=self._run, name="shardchat-store", daemon=True)
        self._thread.start()

    def add(self, room: str, seq: int, at: float, key: str, json: bytes) -> None:
        """Message ``seq`` of ``room`` was sequenced this turn (``at``: wall seconds)."""
        self._turn.append((room, seq, at, key, json))

    def submit(self, token: T | None = None, *, hurry: bool = False, urgent: bool = False) -> int:
        """Hand this turn's messages to the writer; its number (batches are stored
        in order: :attr:`stored_batches`). ``token`` comes back through
        :meth:`finished` once they (and every earlier batch) are stored. The
        writer gathers turns for ``write_every``, unless ``urgent`` (fsync
        "always": the acks wait for this batch alone), ``hurry`` (it is far
        behind) or ``GROUP_ROWS`` wait."""
        rows, self._turn = self._turn, []
        self.submitted += len(rows)
        number = self.batches
        self.batches += 1
        shared = self._shared
        with shared.lock:
            shared.queue.append(_Batch(rows, token))
            if urgent or hurry or self.submitted - shared.stored >= GROUP_ROWS:
                shared.urgent = True  # written without gathering
                shared.lock.notify()
            elif shared.idle:
                # One wake-up per gathering, not one per turn: the thread's
                # wake-ups and its turns at the GIL were most of the store's cost.
                shared.idle = False
                shared.lock.notify()
        return number

    @property
    def backlog(self) -> int:
        """Messages added and not stored yet."""
        return self.submitted + len(self._turn) - self._shared.stored

    @property
    def stored_batches(self) -> int:
        """How many of the batches submitted are stored (the first ones)."""
        return self._shared.batches

    def finished(self) -> list[tuple[T, bool]]:
        """The tokens of the batches written since the last call, in order, each
        with True when stored, False when the write failed."""
        shared = self._shared
        if not shared.done:
            return []
        with shared.lock:
            done, shared.done = shared.done, []
        return done

    def pending(self, room: str, first: int, last: int) -> dict[int, bytes]:
        """``room``'s messages ``first..last`` added and not stored yet (seq -> JSON).

        Taken before the file is read: a row that is not here any more was
        stored before, so that read sees it."""
        out: dict[int, bytes] = {}
        shared = self._shared
        with shared.lock:
            batches = shared.unfolded + shared.inflight + shared.queue
        rows = [row for batch in batches for row in batch.rows] + self._turn
        for r, seq, _, _, json in rows:
            if r == room and first <= seq <= last:
                out[seq] = json
        return out

    def read(self, room: str, first: int, last: int, limit: int) -> list[HeldMessage]:
        """The stored messages ``first..last`` of ``room``, at most ``limit``."""
        # Spans do not overlap: in the order of their last seq, the ones wanted
        # are those before the first that begins after ``last``. The scan stops
        # there (a condition on `first` in SQL would read every later span).
        spans = self._reader.execute(
            "SELECT first, rows FROM spans WHERE room = ? AND last >= ? ORDER BY last",
            (room, first),
        )
        out: list[HeldMessage] = []
        newest = first - 1
        try:
            for begins, blob in spans:
                if begins > last:
                    break
                for seq, json in span_messages(blob):
                    if newest < seq <= last:
                        out.append(HeldMessage(seq, json))
                        newest = seq
                        if len(out) == limit:
                            return out
        finally:
            spans.close()  # ends the read (a snapshot held open would stop checkpoints)
        return out

    def close(self) -> int:
        """Write what waits, stop the thread and close the connections; the
        messages left unstored (a full disk: they are still in our ring)."""
        if self._turn:
            self.submit()
        shared = self._shared
        with shared.lock:
            shared.stop = True
            shared.lock.notify()
        if self._thread is not None:
            self._thread.join(10.0)
        self._reader.close()
        return self.backlog

    # The writer thread

    def _run(self) -> None:
        db = connect(self.path, SYNCHRONOUS[self.fsync])
        if self.max_bytes:
            page_size = db.execute("PRAGMA page_size").fetchone()[0]
            db.execute(f"PRAGMA max_page_count={max(1, self.max_bytes // page_size)}")
        writer = Transactions(db, self.history, self.history_ttl)
        shared = self._shared
        self._last_write = time.monotonic()  # a start is not an idle writer
        next_sync = time.monotonic() + SYNC_EVERY
        dirty = False
        next_fold = 0.0  # after a failed fold: when to try again
        try:
            while True:
                stop = self._take()
                batches = shared.inflight
                if batches:
                    self._last_write = time.monotonic()
                    ok = writer.write([row for batch in batches for row in batch.rows])
                    dirty = dirty or ok
                    self._set_full(not ok)
                    self._answer(batches, ok)
                now = time.monotonic()
                if (
                    shared.unfolded
                    and (stop or now >= next_sync or self._unfolded_rows() >= FOLD_ROWS)
                    and now >= next_fold
                    and not shared.inflight
                ):
                    if not self._fold(writer):
                        # A full disk: the groups stay stored, folded once there is
                        # room (tried at the next second, not after every write).
                        next_fold = now + RETRY_EVERY
                if now >= next_sync:
                    next_sync = now + SYNC_EVERY
                    if not shared.inflight:
                        writer.prune(time.time())
                    if dirty and self.fsync == "batch":
                        writer.checkpoint()  # syncs the WAL
                    dirty = False
                if stop:
                    return  # a full disk at shutdown: the unstored rows are in our ring
        except Exception as exc:
            # A bug, not a full disk (SQLite's errors are handled in write): the writer
            # is gone, so every later token fails (`unavailable`) rather than
            # waiting for ever, and publishes are refused.
            log_event(log, logging.CRITICAL, "storage_writer_failed", error=repr(exc))
            self._set_full(True)
            self._fail_all()
        finally:
            db.close()

    def _take(self) -> bool:
        """Wait for batches and move them to ``inflight``, after a failed write's;
        whether to stop. Transactions begin at least ``write_every`` apart: a
        batch that comes longer than that after the last one began is written
        at once (a lone publish is acked after one write, not a gathering);
        one that comes sooner waits for the rest of the interval, and the turns
        that come meanwhile join it."""
        shared = self._shared
        with shared.lock:
            if not shared.queue and not shared.stop:
                shared.idle = True
                shared.lock.wait(RETRY_EVERY if shared.inflight else SYNC_EVERY)
            if (
                self.write_every
                and shared.queue
                and not (shared.stop or shared.urgent or shared.inflight)
            ):
                wait = self._last_write + self.write_every - time.monotonic()
                if wait > 0:
                    shared.idle = False
                    shared.lock.wait(wait)  # more turns join this transaction
            shared.idle = shared.urgent = False
            shared.inflight += shared.queue
            shared.queue = []
            return shared.stop

    def _unfolded_rows(self) -> int:
        return sum(len(batch.rows) for batch in self._shared.unfolded)

    def _fold(self, writer: Transactions) -> bool:
        """The groups into spans; their batches are then read from the file."""
        shared = self._shared  # only this thread changes the list of unfolded
        if not writer.fold(row for batch in shared.unfolded for row in batch.rows):
            return False
        with shared.lock:
            shared.unfolded = []
        return True

    def _answer(self, batches: list[_Batch[T]], ok: bool) -> None:
        """Count what was stored and hand back the tokens (a failed write's
        tokens fail at once; its rows stay in flight and are tried again)."""
        shared = self._shared
        tokens = False
        with shared.lock:
            for batch in batches:
                if batch.token is not None:
                    shared.done.append((batch.token, ok))
                    batch.token = None
                    tokens = True
            if ok:
                shared.stored += sum(len(batch.rows) for batch in batches)
                shared.batches += len(batches)
                shared.unfolded += batches
                shared.inflight = []
        if tokens:
            self.wake()

    def _fail_all(self) -> None:
        shared = self._shared
        while True:
            with shared.lock:
                if not shared.queue and not shared.stop:
                    shared.lock.wait(SYNC_EVERY)
                batches = shared.inflight + shared.queue
                shared.queue = []
                shared.inflight = [_Batch(b.rows, None) for b in batches]
                shared.done += [(b.token, False) for b in batches if b.token is not None]
                stop = shared.stop
            if any(b.token is not None for b in batches):
                self.wake()
            if stop:
                return

    def _set_full(self, full: bool) -> None:
        if full != self.full:
            self.full = full
            event = "storage_full" if full else "storage_resumed"
            level = logging.ERROR if full else logging.WARNING
            log_event(log, level, event, path=str(self.path))
