"""The in-shard bridge to the other shards: our ring writer, our readers of theirs, the doorbells.

One per shard. ``publish()`` appends to our ring and, once per loop turn,
rings every peer's doorbell. A bell thread blocks on our own doorbell (the
GIL is released in ``sem_wait``) and wakes the loop with
``call_soon_threadsafe``; the loop then absorbs extra posts and drains every
peer's ring, at most ``POLL_LIMIT`` records per ring per turn so that one
busy peer cannot starve our clients. In that order no post is lost between
a drain and the next wait (STYLE.md section 4). The thread never touches
ring memory.

Measured here: this thread-to-loop bridge adds about 15-20 us per wake-up
over an eventfd registered with ``loop.add_reader``; the doorbell stays
behind this one class so that it can be swapped.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable

from . import shm, stats
from .obs import log_event
from .ring import Record, RingReader, RingWriter
from .ringlayout import HEADER_SIZE
from .roomtable import SLOT_SIZE, RoomTable

__all__ = ["POLL_LIMIT", "Bus"]

log = logging.getLogger(__name__)

POLL_LIMIT = 4096
BELL_WAIT = 0.2  # seconds; the bell thread checks for shutdown this often
_S_WRITTEN = int(stats.Slot.RING_RECORDS_WRITTEN)
_S_READ = int(stats.Slot.RING_RECORDS_READ)
_S_LAPS = int(stats.Slot.RING_LAPS)
_S_LOST = int(stats.Slot.RING_RECORDS_LOST)

RecordHandler = Callable[[int, list[Record]], None]


class Bus:
    """Our ring, the peers' rings, their room tables and the doorbells."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        owner_pid: int,
        shard_id: int,
        workers: int,
        ring_bytes: int,
        table_slots: int,
    ) -> None:
        self.loop = loop
        self.shard_id = shard_id
        self.segments = [shm.Segment.attach(shm.ring_name(owner_pid, i)) for i in range(workers)]
        ring_end = HEADER_SIZE + ring_bytes
        views = [memoryview(segment.buf) for segment in self.segments]
        self._views = views
        self.tables = [
            RoomTable(view[ring_end : ring_end + table_slots * SLOT_SIZE], table_slots)
            for view in views
        ]
        # Pads over a record the previous incarnation died writing.
        self.writer = RingWriter(views[shard_id][:ring_end], writer_pid=os.getpid())
        self._ring_views = [view[:ring_end] for view in views]
        self.readers: dict[int, RingReader] = {}
        self.bells = [shm.Doorbell(shm.bell_name(owner_pid, i)) for i in range(workers)]
        self.peers = [i for i in range(workers) if i != shard_id]
        self.handler: RecordHandler | None = None
        self.on_lapped: Callable[[int], None] | None = None
        self.on_commit: Callable[[], None] | None = None  # after each commit of our tail
        self.counters: memoryview | None = None  # our stats block, once started
        self._bells_due = False
        self._written = 0
        self._uncommitted = 0
        self._commit_every = ring_bytes // 8
        self._wake_pending = False
        self._drain_scheduled = False
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    # Start-up

    def retained(self, shard: int) -> tuple[RingReader, list[Record]]:
        """Everything ``shard``'s ring still holds, and a reader left at its end."""
        reader = RingReader(self._ring_views[shard], from_oldest=True)
        records: list[Record] = []
        while True:
            batch = reader.poll(POLL_LIMIT)
            if not batch:
                return reader, records
            records += batch

    def start(
        self,
        handler: RecordHandler,
        on_lapped: Callable[[int], None],
        readers: dict[int, RingReader],
    ) -> None:
        """Begin delivering peers' records to ``handler`` from the given cursors;
        ``on_lapped(peer)`` hears of every lap, after the records before it."""
        self.handler = handler
        self.on_lapped = on_lapped
        self.readers = readers
        self._own_bell().drain()
        self._thread = threading.Thread(target=self._bell_loop, name="shardchat-bell", daemon=True)
        self._thread.start()
        self.drain()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(2 * BELL_WAIT)

    def _own_bell(self) -> shm.Doorbell:
        return self.bells[self.shard_id]

    # Writing

    def publish(self, kind: int, aux: int, payload: bytes) -> int:
        """Append a record; the loop turn's records become visible together."""
        position = self.writer.append(kind, aux, payload)
        self._written += 1
        self._uncommitted += len(payload)
        if not self._bells_due:
            self._bells_due = True
            self.loop.call_soon(self.commit)
        elif self._uncommitted > self._commit_every:
            # A burst: let the readers start on it before the turn ends.
            self.commit()
            self._bells_due = True
        return position

    def commit(self) -> None:
        """Make this turn's records visible, then ring every peer's bell once."""
        if not self._bells_due:
            return
        self._bells_due = False
        self._uncommitted = 0
        self.writer.commit()
        if self.on_commit is not None:
            self.on_commit()
        if self.counters is not None:
            self.counters[_S_WRITTEN] += self._written
        self._written = 0
        bells = self.bells
        for peer in self.peers:
            bells[peer].ring()

    def heartbeat(self) -> None:
        self.writer.heartbeat(time.monotonic_ns())

    # Reading

    def _bell_loop(self) -> None:
        bell = self._own_bell()
        loop = self.loop
        while not self._stopping.is_set():
            if bell.wait(BELL_WAIT) and not self._wake_pending:
                self._wake_pending = True
                try:
                    loop.call_soon_threadsafe(self._wake)
                except RuntimeError:
                    return  # the loop is closed: the shard is exiting

    def _wake(self) -> None:
        self._wake_pending = False
        if self.handler is None:
            return  # closed
        self._own_bell().drain()
        self.drain()

    def drain(self) -> None:
        """Hand every peer's new records to the handler, ``POLL_LIMIT`` per ring."""
        self._drain_scheduled = False
        handler = self.handler
        if handler is None:
            return
        more = False
        counters = self.counters
        for peer, reader in self.readers.items():
            laps = reader.lapped
            records = reader.poll(POLL_LIMIT)
            if records:
                if counters is not None:
                    counters[_S_READ] += len(records)
                handler(peer, records)
                if len(records) == POLL_LIMIT:
                    more = True
            if reader.lapped != laps:
                log_event(log, logging.WARNING, "ring_lapped", peer=peer, lost=reader.lost)
                if counters is not None:
                    counters[_S_LAPS] = sum(r.lapped for r in self.readers.values())
                    counters[_S_LOST] = sum(r.lost for r in self.readers.values())
                if self.on_lapped is not None:
                    self.on_lapped(peer)
                more = True
        if more and not self._drain_scheduled:
            self._drain_scheduled = True
            self.loop.call_soon(self.drain)

    def record_lag(self) -> None:
        """Set the gauges of how many bytes of each peer's ring we have not read yet."""
        if self.counters is not None:
            for peer, reader in self.readers.items():
                self.counters[stats.LAG_BASE + peer] = reader.backlog()

    def close(self) -> None:
        self.stop()
        self.handler = None
        for bell in self.bells:
            bell.close()
        self.readers = {}
        self.tables = []
        self._ring_views = []
        self._views = []
        for segment in self.segments:
            segment.close()
