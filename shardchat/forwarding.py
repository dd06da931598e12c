"""Publishes to rooms that another shard owns: forwarded, retried, acknowledged once.

DESIGN.md, Rooms: a forwarded publish can be lost (the ring is lossy, and the
owner may die before it sequences it). The publishing shard keeps it until
the owner's sequenced record (or a FORWARD_SEEN for a duplicate) comes back,
then acks the sender; it forwards it again after ``FORWARD_RETRY``, doubling
the wait up to ``FORWARD_RETRY_MAX`` (a stopped owner must not have its small
ring refilled with the same forwards every second), and gives up after
``delivery.publish_timeout`` with an ``unavailable`` error, which means "not known to
be published": the forward may still be sequenced later.

The owner remembers the message ids it sequenced, so a forward that arrives
twice is sequenced once and the second copy is answered with FORWARD_SEEN.
It also remembers each publish's idempotency key (the sender's user and the
client's ``id``) for ``KEY_WINDOW``: a publish retried with the same ``id``
(after ``unavailable``, or after a reconnect) is answered with the original
``seq`` and not sequenced again (PROTOCOL.md, Extensions).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from . import records, stats, wire
from .connection import Connection
from .context import ShardContext
from .obs import log_event
from .ringlayout import RecordKind

__all__ = [
    "FORWARD_RETRY",
    "FORWARD_RETRY_MAX",
    "KEY_WINDOW",
    "SEQUENCED_IDS",
    "Forwarder",
    "PendingPublish",
    "send_ack",
]

log = logging.getLogger(__name__)

FORWARD_RETRY = 1.0  # seconds before an unsequenced forward is sent again (then doubled)
FORWARD_RETRY_MAX = 8.0  # the longest wait between two sends of one forward
SEQUENCED_IDS = 100_000  # message ids (and idempotency keys) the owner remembers at most
KEY_WINDOW = 600.0  # seconds the owner remembers an idempotency key (PROTOCOL.md)

_FORWARD = int(RecordKind.FORWARD)
_FORWARD_SEEN = int(RecordKind.FORWARD_SEEN)
_S_RETRIED = int(stats.Slot.FORWARDS_RETRIED)
_S_UNAVAILABLE = stats.error_slot("unavailable")


@dataclass(slots=True)
class PendingPublish:
    """A forwarded publish waiting for its owner to sequence it."""

    conn: Connection | None  # None once the sender has gone
    request_id: str | None
    forward: records.Forward
    payload: bytes  # the FORWARD record, to send again
    owner: int
    first_sent: float
    next_send: float  # when to forward it again
    wait: float  # the current wait between two sends (doubles up to FORWARD_RETRY_MAX)


class Forwarder:
    """Both ends of forwarding: the publishing shard's pending publishes and the
    owner's memory of the ids it sequenced."""

    def __init__(self, ctx: ShardContext, sequence: Callable[[records.Forward], int]) -> None:
        self.bus = ctx.bus
        self.loop = ctx.loop
        self.stats = ctx.counters
        self.give_up = ctx.config.delivery.publish_timeout
        self.sequence = sequence  # the owner's sequencing of one publish
        self.pending: dict[str, PendingPublish] = {}
        self.sequenced: OrderedDict[str, tuple[str, int]] = OrderedDict()
        # Idempotency key -> (room, seq, CLOCK_MONOTONIC ns when sequenced), oldest first.
        self.keys: OrderedDict[str, tuple[str, int, int]] = OrderedDict()

    # Publishing shard

    def send(
        self, conn: Connection, request_id: str | None, forward: records.Forward, owner: int
    ) -> None:
        payload = records.encode_forward(forward)
        self.bus.publish(_FORWARD, owner, payload)
        now = self.loop.time()
        self.pending[forward.msg_id] = PendingPublish(
            conn, request_id, forward, payload, owner, now, now + FORWARD_RETRY, FORWARD_RETRY
        )

    def acknowledge(self, msg_id: str, room: str, seq: int) -> None:
        """The owner sequenced ``msg_id`` as ``seq``: the sender gets its ack, once."""
        pending = self.pending.pop(msg_id, None)
        if pending is not None and pending.conn is not None:
            send_ack(pending.conn, room, seq, pending.request_id)

    def forget(self, conn: Connection) -> None:
        """The sender of pending publishes is gone: they still get sequenced."""
        for pending in self.pending.values():
            if pending.conn is conn:
                pending.conn = None

    def sweep(self, now: float) -> None:
        """Forward again what the owner has not sequenced yet; give up on what it
        never will."""
        for msg_id, pending in list(self.pending.items()):
            if now - pending.first_sent >= self.give_up:
                del self.pending[msg_id]
                log_event(log, logging.ERROR, "forward_failed", msg=msg_id, owner=pending.owner)
                if pending.conn is not None:
                    reason = (
                        f"the owner of room {pending.forward.room} did not answer: not known"
                        " to be published; retrying with the same id is safe"
                    )
                    self.stats[_S_UNAVAILABLE] += 1
                    pending.conn.send(
                        wire.text_frame(
                            wire.error_payload("unavailable", reason, pending.request_id)
                        )
                    )
            elif now >= pending.next_send:
                pending.wait = min(FORWARD_RETRY_MAX, pending.wait * 2)
                pending.next_send = now + pending.wait
                self.stats[_S_RETRIED] += 1
                self.bus.publish(_FORWARD, pending.owner, pending.payload)

    # Owner

    def on_forward(self, origin: int, forward: records.Forward) -> None:
        seen = self.sequenced.get(forward.msg_id) or self.seen_key(forward.key)
        if seen is None:
            self.sequence(forward)
            return
        room, seq = seen
        payload = records.encode_forward_seen(records.ForwardSeen(forward.msg_id, room, seq))
        self.bus.publish(_FORWARD_SEEN, origin, payload)

    def seen_key(self, key: str) -> tuple[str, int] | None:
        """The (room, seq) a publish with this idempotency key was sequenced as, if it
        was within ``KEY_WINDOW``."""
        if not key:
            return None
        seen = self.keys.get(key)
        if seen is None or time.monotonic_ns() - seen[2] > KEY_WINDOW * 1e9:
            return None
        return seen[0], seen[1]

    def remember(self, msg_id: str, room: str, seq: int, key: str = "", at_ns: int = 0) -> None:
        """The owner sequenced ``msg_id`` (with idempotency ``key``, at ``at_ns``)."""
        self.sequenced[msg_id] = (room, seq)
        if len(self.sequenced) > SEQUENCED_IDS:
            self.sequenced.popitem(last=False)
        if key:
            keys = self.keys
            keys[key] = (room, seq, at_ns or time.monotonic_ns())
            keys.move_to_end(key)
            oldest = time.monotonic_ns() - int(KEY_WINDOW * 1e9)
            while keys and (len(keys) > SEQUENCED_IDS or next(iter(keys.values()))[2] < oldest):
                keys.popitem(last=False)


def send_ack(conn: Connection, room: str, seq: int, request_id: str | None) -> None:
    ack: dict[str, object] = {"type": "ack", "room": room, "seq": seq}
    if request_id is not None:
        ack["id"] = request_id
    conn.send(wire.text_frame(wire.encode(ack)))
