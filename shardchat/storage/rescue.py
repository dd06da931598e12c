"""What a crashed run's rings hold that its stores lack, stored before the sweep.

docs/ARCHITECTURE.md, The room store. The writer thread stores a message a
moment after the owner made it visible in its ring; when every process of
the box dies in that moment (kill -9, OOM), the shared-memory rings outlive
them (not a reboot). The next start reads the rings of the previous holder
of the storage directory, before it sweeps them, and stores each room's
messages that follow on from its stored seq, so that no message a member saw
is lost. Each ring's seq table says how far each room was sequenced: a room
whose store still lacks some of that (the ring lapped messages members saw
before they were stored) has a hole, and the start takes a new epoch rather
than give those seqs again under the old one (:attr:`Rescue.hole`).
"""

from __future__ import annotations

import logging
import time
import zlib
from collections import defaultdict
from dataclasses import dataclass, field

from shardchat.brokers import segments
from shardchat.core.errors import RingError
from shardchat.logs import log_event
from shardchat.ring import records
from shardchat.ring.layout import HEADER_SIZE, RecordKind
from shardchat.ring.ring import RingReader, ring_capacity
from shardchat.ring.seqtable import SLOT_SIZE, SeqTable
from shardchat.storage.boxdir import StorageDir
from shardchat.storage.transactions import connect, store_rows

__all__ = ["Rescue", "rescue"]

log = logging.getLogger(__name__)

_ROOM_MSG = int(RecordKind.ROOM_MSG)

Row = tuple[str, int, str, bytes]  # room, seq, key, JSON


@dataclass(slots=True)
class Rescue:
    """What a start found in the previous holder's rings."""

    rings: bool = False  # they were there (no reboot, no clean stop since)
    stored: int = 0  # messages stored from them
    rows: list[Row] = field(default_factory=list)
    seqs: dict[str, int] = field(default_factory=dict)  # room -> seq sequenced (seq tables)
    holes: list[str] = field(default_factory=list)  # rooms sequenced past what is stored

    @property
    def hole(self) -> bool:
        return bool(self.holes)


def _read_rings(owner_pid: int, found: Rescue) -> None:
    """The ROOM_MSG records and the seq tables still in every ring of supervisor
    ``owner_pid``."""
    shard = 0
    while True:
        segment = segments.attach_if_present(segments.ring_name(owner_pid, shard))
        if segment is None:
            return  # no such ring: we have read them all
        found.rings = True
        try:
            view = memoryview(segment.buf)
            capacity = ring_capacity(view)
            table = view[HEADER_SIZE + capacity :]
            for room, seq in SeqTable(table, len(table) // SLOT_SIZE).entries().items():
                found.seqs[room] = max(seq, found.seqs.get(room, 0))
            del table
            reader = RingReader(view[: HEADER_SIZE + capacity], from_oldest=True)
            while batch := reader.poll(4096):
                for _, kind, _, payload in batch:
                    if kind == _ROOM_MSG:
                        msg = records.decode_room_message(payload)
                        found.rows.append((msg.room, msg.seq, msg.key, msg.json))
            del reader, view
        except RingError as exc:
            log_event(log, logging.WARNING, "storage_rescue_skipped", shard=shard, error=str(exc))
        finally:
            segment.close()
        shard += 1


def rescue(storage: StorageDir) -> Rescue:
    """Store what the previous holder's rings hold past each room's stored seq,
    and find the rooms they sequenced past what is stored now. Only a holder
    that is gone is read (its rings, if any, are swept after this)."""
    found = Rescue()
    previous = storage.previous
    if previous is None or segments.is_live(previous):
        return found
    _read_rings(previous, found)
    if found.rows:
        found.stored = _store(storage, found.rows, previous)
    if found.seqs:
        found.holes = _holes(storage, found.seqs)
    if found.holes:
        log_event(
            log, logging.ERROR, "storage_rescue_hole", rooms=len(found.holes),
            example=found.holes[0], previous=previous,
        )  # fmt: skip
    segments.unlink_all(previous)  # stored: no other start sweeps them (stored_name)
    return found


def _holes(storage: StorageDir, sequenced: dict[str, int]) -> list[str]:
    """The rooms whose stored seq is behind the seq they were sequenced to."""
    by_shard: dict[int, list[str]] = defaultdict(list)
    for room in sequenced:
        by_shard[zlib.crc32(room.encode()) % storage.workers].append(room)
    holes: list[str] = []
    for shard, rooms in by_shard.items():
        stored = storage.seqs(shard)
        holes += [room for room in rooms if stored.get(room, 0) < sequenced[room]]
    return sorted(holes)


def _store(storage: StorageDir, rows: list[Row], previous: int) -> int:
    workers = storage.workers
    by_shard: dict[int, list[Row]] = defaultdict(list)
    for row in rows:
        by_shard[zlib.crc32(row[0].encode()) % workers].append(row)
    stored = 0
    now = time.time()
    for shard, found in by_shard.items():
        db = connect(storage.path(shard))
        try:
            seqs: dict[str, int] = dict(db.execute("SELECT room, seq FROM rooms").fetchall())
            new: list[Row] = []
            for room, seq, key, json in sorted(found, key=lambda r: (r[0], r[1])):
                if seq == seqs.get(room, 0) + 1:  # follows on: no hole left behind
                    seqs[room] = seq
                    new.append((room, seq, key, json))
            if new:
                db.execute("BEGIN IMMEDIATE")
                store_rows(db, [(room, seq, now, key, json) for room, seq, key, json in new])
                db.execute("COMMIT")
                stored += len(new)
        finally:
            db.close()
    if stored:
        log_event(log, logging.WARNING, "storage_rescued", messages=stored, previous=previous)
    return stored
