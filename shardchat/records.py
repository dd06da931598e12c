"""Payloads of the ring's records: what shards tell each other. Pure.

The hot record, ROOM_MSG, is a small binary prefix and the message's JSON
exactly as clients receive it, so that a reader delivers it without
re-encoding. The rest are rare and carried as orjson objects.

ROOM_MSG / REPLAY::

    u64 seq | u64 publish_ns | u8 room_len | u8 id_len | u16 key_len | room | msg id |
    idempotency key | JSON frame

The idempotency key (``user\nclient id``, empty when the client sent no
``id``) travels in the owner's record so that a restarted owner rebuilds its
memory of the keys it sequenced from its own ring.

A REPLAY with an empty msg id and JSON marks the end of a resend: ``seq`` is
the last seq the request asked for.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import orjson

__all__ = [
    "Forward",
    "ForwardSeen",
    "HistoryRequest",
    "Presence",
    "RoomMessage",
    "decode_forward",
    "decode_forward_seen",
    "decode_history_request",
    "decode_presence",
    "decode_room_message",
    "decode_snapshot",
    "encode_forward",
    "encode_forward_seen",
    "encode_history_request",
    "encode_presence",
    "encode_room_message",
    "encode_snapshot",
    "idempotency_key",
]

_PREFIX = struct.Struct("<QQBBH")
_PREFIX_SIZE = _PREFIX.size


@dataclass(frozen=True, slots=True)
class RoomMessage:
    room: str
    seq: int
    publish_ns: int  # CLOCK_MONOTONIC at publish: system-wide, so valid across shards
    msg_id: str
    json: bytes
    key: str = ""  # the publish's idempotency key (see idempotency_key), "" for none


def idempotency_key(user: str, client_id: str | None) -> str:
    """PROTOCOL.md, Extensions: a publish's ``id`` is deduplicated per user. A user
    name never holds a newline, so the pair is one unambiguous string."""
    return "" if client_id is None else f"{user}\n{client_id}"


def encode_room_message(
    room: str, seq: int, publish_ns: int, msg_id: str, json: bytes, key: str = ""
) -> bytes:
    room_b = room.encode()
    id_b = msg_id.encode()
    key_b = key.encode()
    prefix = _PREFIX.pack(seq, publish_ns, len(room_b), len(id_b), len(key_b))
    return prefix + room_b + id_b + key_b + json


def decode_room_message(payload: bytes) -> RoomMessage:
    seq, publish_ns, room_len, id_len, key_len = _PREFIX.unpack_from(payload)
    a = _PREFIX_SIZE + room_len
    b = a + id_len
    c = b + key_len
    return RoomMessage(
        payload[_PREFIX_SIZE:a].decode(),
        seq,
        publish_ns,
        payload[a:b].decode(),
        payload[c:],
        payload[b:c].decode() if key_len else "",
    )


@dataclass(frozen=True, slots=True)
class Forward:
    """A publish on a shard that does not own the room, on its way to the owner."""

    msg_id: str
    room: str
    sender: str
    content: str
    timestamp: int  # ms since the Unix epoch, when the publish was accepted
    publish_ns: int  # CLOCK_MONOTONIC at publish
    key: str = ""  # idempotency key: the owner sequences one publish per key


def encode_forward(f: Forward) -> bytes:
    return orjson.dumps(
        {
            "m": f.msg_id,
            "r": f.room,
            "s": f.sender,
            "c": f.content,
            "t": f.timestamp,
            "n": f.publish_ns,
            "k": f.key,
        }
    )


def decode_forward(payload: bytes) -> Forward:
    o = orjson.loads(payload)
    return Forward(o["m"], o["r"], o["s"], o["c"], o["t"], o["n"], o.get("k", ""))


@dataclass(frozen=True, slots=True)
class ForwardSeen:
    """The owner had already sequenced a re-forwarded publish, at ``seq``."""

    msg_id: str
    room: str
    seq: int


def encode_forward_seen(f: ForwardSeen) -> bytes:
    return orjson.dumps({"m": f.msg_id, "r": f.room, "q": f.seq})


def decode_forward_seen(payload: bytes) -> ForwardSeen:
    o = orjson.loads(payload)
    return ForwardSeen(o["m"], o["r"], o["q"])


@dataclass(frozen=True, slots=True)
class HistoryRequest:
    """A shard missed ``first..last`` of a room (a lapped reader) and asks its owner."""

    room: str
    first: int
    last: int


def encode_history_request(h: HistoryRequest) -> bytes:
    return orjson.dumps({"r": h.room, "f": h.first, "l": h.last})


def decode_history_request(payload: bytes) -> HistoryRequest:
    o = orjson.loads(payload)
    return HistoryRequest(o["r"], o["f"], o["l"])


@dataclass(frozen=True, slots=True)
class Presence:
    room: str
    user: str
    joined: (
        bool  # True: the user's first connection in the room on that shard; False: its last left
    )


def encode_presence(p: Presence) -> bytes:
    return orjson.dumps({"r": p.room, "u": p.user, "j": p.joined})


def decode_presence(payload: bytes) -> Presence:
    o = orjson.loads(payload)
    return Presence(o["r"], o["u"], o["j"])


def encode_snapshot(pairs: list[tuple[str, str]]) -> bytes:
    """A shard's whole local presence: (room, user) pairs."""
    return orjson.dumps(pairs)


def decode_snapshot(payload: bytes) -> list[tuple[str, str]]:
    return [(room, user) for room, user in orjson.loads(payload)]
