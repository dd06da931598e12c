"""The owner's seq table: each owned room's latest seq, in shared memory.

A shard that owns rooms writes their seq here after every message it
sequences, so a restarted owner continues every room's sequence where it
was, even for a room whose messages the ring no longer holds; and any shard
can read a room's current seq from its owner's table without asking.

Open addressing with linear probing over fixed slots; rooms are never
removed. Single writer (the owning shard), so no lock: an insert writes the
name and seq first and the key last, and on x86-64 (TSO) a reader that sees
the key also sees what was written before it.

Slot (96 bytes)::

     0 u64 key (0 = empty; a 64-bit hash of the name, never 0)
     8 u64 seq
    16 u16 name_len
    18 name (UTF-8, at most 64 bytes)
"""

from __future__ import annotations

import hashlib
import struct

from shardchat.core.errors import SeqTableError

__all__ = ["SLOT_SIZE", "SeqTable", "room_key"]

SLOT_SIZE = 96
MAX_NAME = 64
_KEY_SEQ = struct.Struct("<QQ")
_U64 = struct.Struct("<Q")
_U16 = struct.Struct("<H")


def room_key(name: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(name, digest_size=8).digest(), "little") | 1


class SeqTable:
    """A view of one shard's room table (``slots`` slots at the start of ``buf``)."""

    __slots__ = ("_buf", "_slots")

    def __init__(self, buf: memoryview, slots: int) -> None:
        if len(buf) < slots * SLOT_SIZE:
            raise SeqTableError("buffer too small for the room table")
        self._buf = buf
        self._slots = slots

    def _probe(self, name: bytes, key: int) -> tuple[int, bool]:
        """(slot offset, found); offset -1 when the table is full."""
        buf = self._buf
        slots = self._slots
        start = key % slots if slots else 0
        for i in range(slots):
            off = ((start + i) % slots) * SLOT_SIZE
            slot_key = _U64.unpack_from(buf, off)[0]
            if slot_key == 0:
                return off, False
            if slot_key == key:
                length = _U16.unpack_from(buf, off + 16)[0]
                if bytes(buf[off + 18 : off + 18 + length]) == name:
                    return off, True
        return -1, False

    def lookup(self, room: str) -> int | None:
        """The room's latest seq, or None when the owner never sequenced it."""
        name = room.encode()
        off, found = self._probe(name, room_key(name))
        if not found:
            return None
        return int(_U64.unpack_from(self._buf, off + 8)[0])

    def slot(self, room: str) -> int | None:
        """The offset of the room's seq word, inserting the room (writer only).

        None when the table is full: the room's seq then lives only in the ring.
        """
        name = room.encode()
        if len(name) > MAX_NAME:
            raise SeqTableError("room name too long")
        key = room_key(name)
        off, found = self._probe(name, key)
        if off < 0:
            return None
        if not found:
            buf = self._buf
            _U64.pack_into(buf, off + 8, 0)
            _U16.pack_into(buf, off + 16, len(name))
            buf[off + 18 : off + 18 + len(name)] = name
            _U64.pack_into(buf, off, key)  # last: the slot is published
        return off + 8

    def set_seq(self, seq_offset: int, seq: int) -> None:
        _U64.pack_into(self._buf, seq_offset, seq)

    def entries(self) -> dict[str, int]:
        """Every room in the table with its seq."""
        buf = self._buf
        out: dict[str, int] = {}
        for i in range(self._slots):
            off = i * SLOT_SIZE
            key, seq = _KEY_SEQ.unpack_from(buf, off)
            if key:
                length = _U16.unpack_from(buf, off + 16)[0]
                out[bytes(buf[off + 18 : off + 18 + length]).decode()] = int(seq)
        return out
