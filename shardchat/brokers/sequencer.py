"""The owner's side of one box's sequencing: seqs, remembered ids, resends. Pure.

A room's owner (``crc32(room) % workers``) alone assigns
its ``seq``, so every member on every shard sees one order with no gaps. A
publish forwarded twice (its first answer was lost) must be sequenced once:
the owner remembers the last ``SEQUENCED_IDS`` message ids it sequenced and
answers a duplicate with the seq it got. It also remembers each publish's
idempotency key (the sender's user and the client's ``id``) for
``KEY_WINDOW``: a publish retried with the same ``id`` (after
``unavailable``, or after a reconnect) is answered with the original seq and
not sequenced again (PROTOCOL.md, Extensions). A shard that missed a range asks
the owner to resend it; :func:`plan_resend` cuts the answer into one chunk
that cannot lap the asker.

This is the part of one box's broker that a broker which sequences in a
store (Redis) does not need; it stays on the broker's side of the line.
"""

from __future__ import annotations

import zlib
from collections import OrderedDict
from collections.abc import Callable
from typing import NamedTuple

from shardchat.core.broker import KEY_WINDOW
from shardchat.core.roomlog import HeldMessage

__all__ = ["SEQUENCED_IDS", "Resend", "Sequencer", "owner_of", "plan_resend"]

SEQUENCED_IDS = 100_000  # message ids (and idempotency keys) the owner remembers at most
RESEND_OVERHEAD = 64  # bytes a REPLAY record adds to a message's JSON, at most


def owner_of(room: str, workers: int) -> int:
    """The shard that sequences ``room``: a stable hash, never Python's ``hash()``."""
    return zlib.crc32(room.encode()) % workers


class Sequencer:
    """The seq of every room this shard owns, and the ids it sequenced."""

    def __init__(self, known: Callable[[str], int | None], remember: int = SEQUENCED_IDS) -> None:
        self._known = known  # the seq table: where a room was when we first meet it
        self._limit = remember
        self.seqs: dict[str, int] = {}  # room -> latest seq assigned
        self.sequenced: OrderedDict[str, tuple[str, int]] = OrderedDict()  # id -> room, seq
        # Idempotency key -> (room, seq, monotonic ns when sequenced), oldest first.
        self.keys: OrderedDict[str, tuple[str, int, int]] = OrderedDict()

    def seen(self, msg_id: str) -> tuple[str, int] | None:
        """The (room, seq) ``msg_id`` was sequenced as, if it was."""
        return self.sequenced.get(msg_id)

    def seen_key(self, key: str, now_ns: int) -> tuple[str, int] | None:
        """The (room, seq) a publish with idempotency ``key`` was sequenced as, if it
        was within ``KEY_WINDOW`` of ``now_ns``."""
        if not key:
            return None
        seen = self.keys.get(key)
        if seen is None or now_ns - seen[2] > KEY_WINDOW * 1e9:
            return None
        return seen[0], seen[1]

    def assign(self, room: str, msg_id: str, key: str, now_ns: int) -> int:
        """The next seq of ``room``, for ``msg_id`` (with idempotency ``key``)."""
        seq = self.seqs.get(room)
        if seq is None:
            seq = self._known(room) or 0
        seq += 1
        self.seqs[room] = seq
        self.remember(msg_id, room, seq, key, now_ns)
        return seq

    def remember(self, msg_id: str, room: str, seq: int, key: str, at_ns: int) -> None:
        """``msg_id`` (with idempotency ``key``) was sequenced as ``seq`` at ``at_ns``."""
        sequenced = self.sequenced
        if msg_id:  # "": a key restored from the store, whose message id is not kept
            sequenced[msg_id] = (room, seq)
            if len(sequenced) > self._limit:
                sequenced.popitem(last=False)
        if key:
            keys = self.keys
            keys[key] = (room, seq, at_ns)
            keys.move_to_end(key)
            oldest = at_ns - int(KEY_WINDOW * 1e9)
            while keys and (len(keys) > self._limit or next(iter(keys.values()))[2] < oldest):
                keys.popitem(last=False)

    def restore(self, room: str, seq: int) -> None:
        """At start-up: ``room`` is known to have reached ``seq``; the larger wins,
        so that a room's seq never restarts or repeats."""
        if seq > self.seqs.get(room, 0):
            self.seqs[room] = seq


class Resend(NamedTuple):
    """One chunk of an answer to a shard that missed ``first..last`` of a room."""

    lost_to: int  # nothing up to this seq is held any more (0: nothing lost)
    messages: list[HeldMessage]  # the held messages of the chunk, in seq order
    end: int | None  # the chunk's end marker (the last seq asked for); None: all lost


def plan_resend(held: list[HeldMessage], first: int, last: int, budget: int) -> Resend:
    """What the owner resends for ``first..last`` from ``held`` (its messages from
    ``first`` on): at most ``budget`` bytes, so that a resend cannot lap the shard
    that asked for it (it asks for the next chunk at this one's end)."""
    if not held or held[0].seq > last:
        return Resend(last if not held else held[0].seq - 1, [], None)
    lost_to = held[0].seq - 1 if held[0].seq > first else 0
    chunk: list[HeldMessage] = []
    for message in held:
        if message.seq > last or budget < len(message.payload):
            break
        budget -= len(message.payload) + RESEND_OVERHEAD
        chunk.append(message)
    return Resend(lost_to, chunk, last)
