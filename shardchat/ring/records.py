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

A REPLAY carries one resent message, or, with no JSON, a marker named by
its msg id field: ``skip`` (the owner holds nothing up to ``seq`` any more)
or ``end`` (the end of one resent chunk; ``seq`` is the last seq asked for).

FORWARD carries a :class:`~shardchat.core.broker.Publication` as it left
the publishing engine.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

import orjson

from shardchat.core.broker import PresenceAnswer, Publication
from shardchat.core.wire import compact

__all__ = [
    "REPLAY_END",
    "REPLAY_SKIP",
    "ForwardSeen",
    "HistoryRequest",
    "Presence",
    "PresenceEvent",
    "PresenceQuery",
    "RoomMessage",
    "decode_forward",
    "decode_forward_seen",
    "decode_history_request",
    "decode_presence",
    "decode_presence_answer",
    "decode_presence_event",
    "decode_presence_query",
    "decode_room_message",
    "decode_snapshot",
    "encode_forward",
    "encode_forward_seen",
    "encode_history_request",
    "encode_presence",
    "encode_presence_answer",
    "encode_presence_event",
    "encode_presence_query",
    "encode_room_message",
    "encode_snapshot",
]

R = TypeVar("R")

REPLAY_SKIP = "skip"  # a REPLAY marker: the owner holds nothing up to its seq
REPLAY_END = "end"  # a REPLAY marker: the end of one resent chunk

_PREFIX = struct.Struct("<QQBBH")
_PREFIX_SIZE = _PREFIX.size


@dataclass(frozen=True, slots=True)
class RoomMessage:
    room: str
    seq: int
    publish_ns: int  # CLOCK_MONOTONIC at publish: system-wide, so valid across shards
    msg_id: str
    json: bytes
    key: str = ""  # the publish's idempotency key (core.broker.idempotency_key), "" for none


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


def encode_forward(f: Publication) -> bytes:
    """Kept by the publishing shard until the owner sequences it (resent meanwhile):
    right-sized, not in orjson's 4 KB buffer (wire.compact)."""
    return compact(
        orjson.dumps(
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
    )


def decode_forward(payload: bytes) -> Publication:
    o = orjson.loads(payload)
    return Publication(o["m"], o["r"], o["s"], o["c"], o["t"], o["n"], o.get("k", ""))


class _Fields(Generic[R]):
    """The payload codec of a record made of a few JSON values: each field under
    a one-letter key, in the JSON object's order (``keys``: key -> field name)."""

    __slots__ = ("_keys", "_make")

    def __init__(self, make: Callable[..., R], keys: dict[str, str]) -> None:
        self._make = make
        self._keys = tuple(keys.items())

    def encode(self, record: R) -> bytes:
        return orjson.dumps({key: getattr(record, name) for key, name in self._keys})

    def decode(self, payload: bytes) -> R:
        o = orjson.loads(payload)
        return self._make(**{name: o[key] for key, name in self._keys})


@dataclass(frozen=True, slots=True)
class ForwardSeen:
    """The owner had already sequenced a re-forwarded publish, at ``seq``."""

    msg_id: str
    room: str
    seq: int


@dataclass(frozen=True, slots=True)
class HistoryRequest:
    """A shard missed ``first..last`` of a room (a lapped reader) and asks its owner."""

    room: str
    first: int
    last: int


@dataclass(frozen=True, slots=True)
class Presence:
    room: str
    user: str
    joined: bool  # True: the user's first connection in the room there; False: its last left
    info: str | None = None  # a joining connection's connect-proxy info (JSON)


def encode_presence(p: Presence) -> bytes:
    if p.info is None:
        return orjson.dumps({"r": p.room, "u": p.user, "j": p.joined})
    return orjson.dumps({"r": p.room, "u": p.user, "j": p.joined, "i": p.info})


def decode_presence(payload: bytes) -> Presence:
    o = orjson.loads(payload)
    return Presence(o["r"], o["u"], o["j"], o.get("i"))


@dataclass(frozen=True, slots=True)
class PresenceEvent:
    """The room's owner: ``user`` became present (``joined``) or absent."""

    room: str
    user: str
    joined: bool
    count: int  # the room's users after the change


@dataclass(frozen=True, slots=True)
class PresenceQuery:
    """Who is in ``room`` (at most ``limit`` names), and is ``user``: query ``qid``."""

    qid: int
    room: str
    user: str
    limit: int


_FORWARD_SEEN = _Fields(ForwardSeen, {"m": "msg_id", "r": "room", "q": "seq"})
_HISTORY_REQUEST = _Fields(HistoryRequest, {"r": "room", "f": "first", "l": "last"})
_PRESENCE_EVENT = _Fields(PresenceEvent, {"r": "room", "u": "user", "j": "joined", "c": "count"})
_PRESENCE_QUERY = _Fields(PresenceQuery, {"q": "qid", "r": "room", "u": "user", "l": "limit"})
encode_forward_seen, decode_forward_seen = _FORWARD_SEEN.encode, _FORWARD_SEEN.decode
encode_history_request = _HISTORY_REQUEST.encode
decode_history_request = _HISTORY_REQUEST.decode
encode_presence_event, decode_presence_event = _PRESENCE_EVENT.encode, _PRESENCE_EVENT.decode
encode_presence_query, decode_presence_query = _PRESENCE_QUERY.encode, _PRESENCE_QUERY.decode


def encode_presence_answer(qid: int, answer: PresenceAnswer) -> bytes:
    """At most the query's limit of names, cut to fit a record by the holder."""
    o = {"q": qid, "c": answer.total, "u": answer.users, "t": answer.truncated, "h": answer.has}
    if answer.info:
        o["i"] = answer.info
    return orjson.dumps(o)


def decode_presence_answer(payload: bytes) -> tuple[int, PresenceAnswer]:
    o = orjson.loads(payload)
    return o["q"], PresenceAnswer(o["c"], o["u"], o["t"], o["h"], o.get("i"))


def encode_snapshot(pairs: list[tuple[str, str]]) -> bytes:
    """(room, user) pairs: a shard's whole local presence (SNAPSHOT), or what
    members were told (TOLD), in chunks; an empty chunk ends either."""
    return orjson.dumps(pairs)


def decode_snapshot(payload: bytes) -> list[tuple[str, str]]:
    return [(room, user) for room, user in orjson.loads(payload)]
