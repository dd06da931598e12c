"""Byte layout of a shard's ring segment. Layout only, no logic.

A segment is a 256-byte header, the ring's data area (``capacity`` bytes, a
power of two), then the owner's room table (see :mod:`shardchat.ring.seqtable`).
Little-endian; every u64 is 8-byte aligned, so each counter is written with
one native 8-byte store.

Header::

      0 u32 magic | 4 u16 version | 6 u16 reserved | 8 u64 capacity
     16 u64 reserved (was a writer generation no reader read: a restarted
            writer announces itself with a RESET record instead)
     24 u64 writer_pid
     64 u64 tail_intent | 72 u64 tail | 80 u64 latest | 88 u64 heartbeat_ns
     96 u64 published (records, PAD excluded)   -- cache line 1: writer-hot
    128 u64 checkpoint[8]: the first record start in each eighth of the ring
    192 u64 table_slots                        -- size of the room table

Record (16-byte header, records aligned to 16 so a PAD header always fits)::

      0 u32 length (header + payload, unaligned)
      4 u16 kind  (0 PAD, 1 ROOM_MSG, 2 FORWARD, 3 PRESENCE, 4 RESET, ...)
      6 u16 aux   (kind-specific: the target shard of a FORWARD, ...)
      8 u64 position (the record's own position: a lap/torn-read check)
     16 payload
"""

from __future__ import annotations

import enum
import struct

from shardchat.core.errors import MessageTooLarge, RingLayoutError

__all__ = [
    "ALIGNMENT",
    "CHECKPOINTS",
    "HEADER_SIZE",
    "MAGIC",
    "OFF_CAPACITY",
    "OFF_CHECKPOINTS",
    "OFF_HEARTBEAT",
    "OFF_LATEST",
    "OFF_MAGIC",
    "OFF_PUBLISHED",
    "OFF_TABLE_SLOTS",
    "OFF_TAIL",
    "OFF_TAIL_INTENT",
    "OFF_VERSION",
    "OFF_WRITER_PID",
    "RECORD_HEADER",
    "RECORD_HEADER_SIZE",
    "U64",
    "VERSION",
    "RecordKind",
    "align",
    "check_capacity",
    "max_payload",
    "record_size",
    "segment_size",
]

MAGIC = 0x53484331  # "SHC1"
VERSION = 1
HEADER_SIZE = 256
ALIGNMENT = 16
RECORD_HEADER_SIZE = 16
CHECKPOINTS = 8

OFF_MAGIC = 0
OFF_VERSION = 4
OFF_CAPACITY = 8
OFF_WRITER_PID = 24
OFF_TAIL_INTENT = 64
OFF_TAIL = 72
OFF_LATEST = 80
OFF_HEARTBEAT = 88
OFF_PUBLISHED = 96
OFF_CHECKPOINTS = 128
OFF_TABLE_SLOTS = 192

U64 = struct.Struct("<Q")
U32 = struct.Struct("<I")
U16 = struct.Struct("<H")
RECORD_HEADER = struct.Struct("<IHHQ")  # length, kind, aux, position


class RecordKind(enum.IntEnum):
    PAD = 0
    ROOM_MSG = 1  # a sequenced room message, from the room's owner
    FORWARD = 2  # a publish forwarded to the room's owner (aux = owner)
    PRESENCE = 3  # a user joined or left a room on the writer's shard
    RESET = 4  # the writer (re)started: forget its presence
    FORWARD_SEEN = 5  # the owner had already sequenced a re-forwarded publish (aux = origin)
    HISTORY_REQ = 6  # a shard asks a room's owner to resend a range (aux = owner)
    REPLAY = 7  # the owner resends held messages to one shard (aux = that shard)
    SNAPSHOT = 8  # a shard's whole local presence, after a peer's RESET (aux = that peer)
    PRESENCE_EVENT = 9  # a room's owner: a user became present or absent
    TOLD = 10  # what members were told of the rooms a restarted co-holder holds (aux = it)
    PRESENCE_QUERY = 11  # a shard asks a room's holder for its users (aux = the holder)
    PRESENCE_ANSWER = 12  # the holder's answer (aux = the shard that asked)
    CONTROL = 13  # a server API call for every shard, or an answer to one (orjson)


def segment_size(capacity: int, table_slots: int, slot_size: int) -> int:
    """A shard segment: the ring (header and data), then the room table."""
    return HEADER_SIZE + capacity + table_slots * slot_size


def align(n: int) -> int:
    return (n + ALIGNMENT - 1) & ~(ALIGNMENT - 1)


def record_size(payload_len: int) -> int:
    """Bytes a record with this payload takes in the ring (header and padding included)."""
    return align(RECORD_HEADER_SIZE + payload_len)


def max_payload(capacity: int) -> int:
    """The largest payload: a record may take at most capacity / 8 (Agrona's rule)."""
    return capacity // 8 - RECORD_HEADER_SIZE


def check_capacity(capacity: int) -> None:
    if capacity < 1024 or capacity & (capacity - 1):
        raise RingLayoutError(f"ring capacity {capacity} is not a power of two >= 1024")


def check_payload(payload_len: int, capacity: int) -> None:
    limit = max_payload(capacity)
    if payload_len > limit:
        raise MessageTooLarge(payload_len, limit)
