"""A single-writer, many-reader broadcast ring over shared memory.

Modelled on Agrona's BroadcastTransmitter/CopyBroadcastReceiver: the writer
never waits for readers, and a reader that falls a whole ring behind (is
lapped) notices, counts its loss and resynchronises; it never returns a torn
or overwritten record. Loss is repaired above the ring, by room ``seq``.

Pure: it works on a ``memoryview`` it is given (a bytearray in tests, an mmap
in production) and imports no I/O.

Memory ordering: on x86-64 (TSO) stores become visible to other cores in
program order, so a reader that sees ``tail`` advanced also sees the record
bytes written before it. Python has no fences; on weaker CPUs (aarch64) only
data read after a semaphore operation (a doorbell) would be safe. Counters
are 8-byte aligned and written with ``struct`` '<Q', one native 8-byte store
on little-endian CPython; the position check and the validate-after-copy
turn any torn read into a counted lap anyway.
"""

from __future__ import annotations

from shardchat.core.errors import RingLayoutError
from shardchat.ring.layout import (
    CHECKPOINTS,
    HEADER_SIZE,
    MAGIC,
    OFF_CAPACITY,
    OFF_CHECKPOINTS,
    OFF_HEARTBEAT,
    OFF_LATEST,
    OFF_MAGIC,
    OFF_PUBLISHED,
    OFF_TABLE_SLOTS,
    OFF_TAIL,
    OFF_TAIL_INTENT,
    OFF_VERSION,
    OFF_WRITER_PID,
    RECORD_HEADER,
    RECORD_HEADER_SIZE,
    U16,
    U32,
    U64,
    VERSION,
    RecordKind,
    check_capacity,
    check_payload,
)

__all__ = [
    "Record",
    "RingReader",
    "RingWriter",
    "init_ring",
    "ring_capacity",
    "ring_heartbeat_ns",
]

# One record as a reader copied it out: (position, kind, aux, payload), its own
# position in the ring, its RecordKind, the kind's aux field (the target shard of
# a FORWARD, ...) and its payload. Readers unpack it by those names, never index
# it. Not a NamedTuple: building one costs about 100 ns more per record (measured
# here: 145 ns against 43 ns), a quarter of a ring read.
Record = tuple[int, int, int, bytes]

_PAD = int(RecordKind.PAD)
assert _PAD == 0, "poll() tests `if kind:` for a real record"
_u64_pack = U64.pack_into
_u64_unpack = U64.unpack_from
_header_pack = RECORD_HEADER.pack_into
_header_unpack = RECORD_HEADER.unpack_from


def init_ring(buf: memoryview, capacity: int, table_slots: int = 0) -> None:
    """Write a fresh header (the supervisor, before any shard exists)."""
    check_capacity(capacity)
    if len(buf) < HEADER_SIZE + capacity:
        raise RingLayoutError(f"buffer of {len(buf)} bytes is too small for {capacity}")
    buf[:HEADER_SIZE] = bytes(HEADER_SIZE)
    U32.pack_into(buf, OFF_MAGIC, MAGIC)
    U16.pack_into(buf, OFF_VERSION, VERSION)
    _u64_pack(buf, OFF_CAPACITY, capacity)
    _u64_pack(buf, OFF_TABLE_SLOTS, table_slots)


def ring_capacity(buf: memoryview) -> int:
    """Validate a ring header and return its capacity."""
    if len(buf) < HEADER_SIZE or U32.unpack_from(buf, OFF_MAGIC)[0] != MAGIC:
        raise RingLayoutError("not a shardchat ring (bad magic)")
    if U16.unpack_from(buf, OFF_VERSION)[0] != VERSION:
        raise RingLayoutError("ring layout version mismatch")
    capacity = int(_u64_unpack(buf, OFF_CAPACITY)[0])
    check_capacity(capacity)
    if len(buf) < HEADER_SIZE + capacity:
        raise RingLayoutError("segment smaller than its ring")
    return capacity


def ring_heartbeat_ns(buf: memoryview) -> int:
    """The writer's last heartbeat (its shard's loop stamps it once per sweep)."""
    return int(_u64_unpack(buf, OFF_HEARTBEAT)[0])


class RingWriter:
    """The one writer of a ring. Only its shard's loop thread calls it."""

    __slots__ = (
        "_buf",
        "_capacity",
        "_claim_ahead",
        "_claimed",
        "_data",
        "_latest",
        "_mask",
        "_max_payload",
        "_next_checkpoint",
        "_published",
        "_segment_shift",
        "_tail",
    )

    def __init__(self, buf: memoryview, writer_pid: int = 0) -> None:
        self._buf = buf
        self._capacity = capacity = ring_capacity(buf)
        self._mask = capacity - 1
        self._segment_shift = (capacity // CHECKPOINTS).bit_length() - 1
        tail = int(_u64_unpack(buf, OFF_TAIL)[0])
        intent = int(_u64_unpack(buf, OFF_TAIL_INTENT)[0])
        self._published = int(_u64_unpack(buf, OFF_PUBLISHED)[0])
        if intent > tail:
            # A writer died mid-record: cover [tail, intent) with padding so that
            # readers step over the torn bytes (Agrona's unblock()); positions
            # never go backwards.
            self._pad_region(tail, intent)
            tail = intent
            _u64_pack(buf, OFF_TAIL, tail)
        self._tail = tail
        self._claimed = tail
        # The intent runs ahead of the tail by up to this much, so that it is
        # stored once per this many bytes rather than once per record. Readers
        # then count a lap up to this much early: loss is over-reported, never
        # a torn record returned.
        self._claim_ahead = capacity // 64
        self._latest = int(_u64_unpack(buf, OFF_LATEST)[0])
        self._data = buf[HEADER_SIZE : HEADER_SIZE + capacity]
        self._max_payload = capacity // 8 - RECORD_HEADER_SIZE
        self._next_checkpoint = tail  # the next record starts a checkpoint
        _u64_pack(buf, OFF_WRITER_PID, writer_pid)

    @property
    def tail(self) -> int:
        return self._tail

    def _pad_region(self, start: int, end: int) -> None:
        while start < end:
            off = start & self._mask
            length = min(end - start, self._capacity - off)
            _header_pack(self._buf, HEADER_SIZE + off, length, _PAD, 0, start)
            start += length

    def publish(self, kind: int, aux: int, payload: bytes) -> int:
        """Append one record and make it visible; returns its position. Never blocks.

        Raises:
            MessageTooLarge: the payload exceeds capacity / 8.
        """
        position = self.append(kind, aux, payload)
        self.commit()
        return position

    def append(self, kind: int, aux: int, payload: bytes) -> int:
        """Write one record without making it visible yet (see :meth:`commit`).

        Records appended in one loop turn become visible together, so the
        writer stores ``latest``, ``published`` and ``tail`` once per batch.
        This is the fan-out's hot path across shards: written for speed.
        """
        plen = len(payload)
        if plen > self._max_payload:
            check_payload(plen, self._capacity)
        size = (RECORD_HEADER_SIZE + 15 + plen) & ~15
        tail = self._tail
        off = tail & self._mask
        left = self._capacity - off
        if left < size:
            self._wrap(tail, left, size)
            tail += left
            off = 0
        elif tail + size > self._claimed:
            # The intent covers the record before it is written.
            self._claimed = tail + size + self._claim_ahead
            _u64_pack(self._buf, OFF_TAIL_INTENT, self._claimed)
        data = self._data
        data[off + RECORD_HEADER_SIZE : off + RECORD_HEADER_SIZE + plen] = payload
        _header_pack(data, off, RECORD_HEADER_SIZE + plen, kind, aux, tail)
        if tail >= self._next_checkpoint:
            self._checkpoint(tail)
        self._latest = tail
        self._published += 1
        self._tail = tail + size
        return tail

    def _wrap(self, tail: int, left: int, size: int) -> None:
        """Claim the pad and the record, then pad to the end of the ring."""
        end = tail + left + size
        if end > self._claimed:
            self._claimed = end + self._claim_ahead
            _u64_pack(self._buf, OFF_TAIL_INTENT, self._claimed)
        _header_pack(self._data, tail & self._mask, left, _PAD, 0, tail)

    def _checkpoint(self, position: int) -> None:
        """Record the first record start of each eighth of the ring (for restarts)."""
        segment = position >> self._segment_shift
        _u64_pack(self._buf, OFF_CHECKPOINTS + 8 * (segment % CHECKPOINTS), position)
        self._next_checkpoint = (segment + 1) << self._segment_shift

    def commit(self) -> None:
        """Make every appended record visible: ``latest``, ``published``, then ``tail``."""
        buf = self._buf
        _u64_pack(buf, OFF_LATEST, self._latest)
        _u64_pack(buf, OFF_PUBLISHED, self._published)
        _u64_pack(buf, OFF_TAIL, self._tail)

    @property
    def uncommitted(self) -> bool:
        return self._tail != int(_u64_unpack(self._buf, OFF_TAIL)[0])

    def heartbeat(self, now_ns: int) -> None:
        _u64_pack(self._buf, OFF_HEARTBEAT, now_ns)


class RingReader:
    """One reader's private cursor over a ring; it writes nothing shared."""

    __slots__ = ("_buf", "_capacity", "_mask", "cursor", "lapped", "lost", "passed")

    def __init__(self, buf: memoryview, *, from_oldest: bool = False) -> None:
        self._buf = buf
        self._capacity = ring_capacity(buf)
        self._mask = self._capacity - 1
        self.lapped = 0  # times this reader was lapped (or met a torn record)
        self.lost = 0  # records skipped because of laps (approximate: see _resync)
        self.passed = int(_u64_unpack(buf, OFF_PUBLISHED)[0])  # records behind the cursor
        self.cursor = int(_u64_unpack(buf, OFF_TAIL)[0])
        if from_oldest:
            self.cursor = self._oldest_boundary()
            self.passed = 0

    def tail(self) -> int:
        return int(_u64_unpack(self._buf, OFF_TAIL)[0])

    def backlog(self) -> int:
        """Bytes written and not yet read (the reader's lag)."""
        return max(0, self.tail() - self.cursor)

    def _oldest_boundary(self) -> int:
        """The oldest record start still intact, from the writer's checkpoints."""
        buf = self._buf
        intent = int(_u64_unpack(buf, OFF_TAIL_INTENT)[0])
        tail = int(_u64_unpack(buf, OFF_TAIL)[0])
        if intent <= self._capacity:
            return 0  # never wrapped: position 0 is the first record
        floor = intent - self._capacity
        best = tail
        for i in range(CHECKPOINTS):
            point = int(_u64_unpack(buf, OFF_CHECKPOINTS + 8 * i)[0])
            if floor <= point < best:
                header = _header_unpack(buf, HEADER_SIZE + (point & self._mask))
                if header[3] == point:
                    best = point
        return best

    def _lapped_at(self, cursor: int, out: list[Record]) -> list[Record]:
        self.passed += len(out)
        self.cursor = cursor
        self._resync()
        return out

    def _resync(self) -> None:
        # Jump to the tail, a known record boundary. The records between are
        # lost to this reader; `published` is stored before `tail`, so reading
        # the tail first makes the count at worst an over-estimate by the
        # records written in between.
        buf = self._buf
        self.lapped += 1
        self.cursor = int(_u64_unpack(buf, OFF_TAIL)[0])
        published = int(_u64_unpack(buf, OFF_PUBLISHED)[0])
        self.lost += max(0, published - self.passed)
        self.passed = published

    def poll(self, limit: int, max_bytes: int = 1 << 20) -> list[Record]:
        """Copy out up to ``limit`` records after the cursor, oldest first.

        The bytes from the cursor to the tail (at most ``max_bytes``) are
        copied in one go and validated once: if the writer's intent came
        within a capacity of the cursor during the copy, the whole copy is
        dropped as possibly overwritten (CopyBroadcastReceiver). The writer
        claims positions below its intent and so overwrites the positions one
        capacity lower, from the cursor upward. Records are then parsed from
        the private copy, which nobody else writes.
        """
        buf = self._buf
        capacity = self._capacity
        cursor = self.cursor
        tail = int(_u64_unpack(buf, OFF_TAIL)[0])
        if cursor >= tail:
            return []
        if int(_u64_unpack(buf, OFF_TAIL_INTENT)[0]) - cursor > capacity:
            return self._lapped_at(cursor, [])
        end = min(tail, cursor + max_bytes)
        off = cursor & self._mask
        n = end - cursor
        if off + n <= capacity:
            copy = bytes(buf[HEADER_SIZE + off : HEADER_SIZE + off + n])
        else:
            first = capacity - off
            copy = bytes(buf[HEADER_SIZE + off : HEADER_SIZE + capacity]) + bytes(
                buf[HEADER_SIZE : HEADER_SIZE + n - first]
            )
        if int(_u64_unpack(buf, OFF_TAIL_INTENT)[0]) - cursor > capacity:
            return self._lapped_at(cursor, [])
        out: list[Record] = []
        append = out.append
        pos = 0
        last = n - RECORD_HEADER_SIZE
        left = limit
        while pos <= last and left:
            length, kind, aux, position = _header_unpack(copy, pos)
            size = (length + 15) & ~15
            if position - pos != cursor or length < RECORD_HEADER_SIZE:
                return self._lapped_at(cursor + pos, out)
            if pos + size > n:
                if size > capacity - ((cursor + pos) & self._mask):
                    return self._lapped_at(cursor + pos, out)
                break  # the rest of this record is past max_bytes: next poll
            if kind:  # not PAD
                append((position, kind, aux, copy[pos + RECORD_HEADER_SIZE : pos + length]))
                left -= 1
            pos += size
        self.cursor = cursor + pos
        self.passed += len(out)
        return out
