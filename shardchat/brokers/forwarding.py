"""Publishes to rooms that another shard owns: forwarded, retried, acknowledged once.

DESIGN.md, Rooms: a forwarded publish can be lost (the ring is lossy, and the
owner may die before it sequences it). The publishing shard keeps it until
the owner's sequenced record (or a FORWARD_SEEN for a duplicate) comes back,
then acks the sender; it forwards it again every ``FORWARD_RETRY`` and gives
up after ``FORWARD_GIVE_UP`` with an ``unavailable`` error. The owner
remembers the ids it sequenced, so a forward that arrives twice is sequenced
once and the second copy is answered with FORWARD_SEEN.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from shardchat import stats
from shardchat.core import wire
from shardchat.logs import log_event
from shardchat.ring import records
from shardchat.ring.layout import RecordKind
from shardchat.shard.connection import Connection
from shardchat.shard.context import ShardContext

__all__ = [
    "FORWARD_GIVE_UP",
    "FORWARD_RETRY",
    "SEQUENCED_IDS",
    "Forwarder",
    "PendingPublish",
    "send_ack",
]

log = logging.getLogger(__name__)

FORWARD_RETRY = 1.0  # seconds before an unsequenced forward is sent again
FORWARD_GIVE_UP = 30.0  # seconds before the sender is told the publish failed
SEQUENCED_IDS = 100_000  # forwarded message ids the owner remembers, for duplicates

_FORWARD = int(RecordKind.FORWARD)
_FORWARD_SEEN = int(RecordKind.FORWARD_SEEN)
_S_RETRIED = int(stats.Slot.FORWARDS_RETRIED)


@dataclass(slots=True)
class PendingPublish:
    """A forwarded publish waiting for its owner to sequence it."""

    conn: Connection | None  # None once the sender has gone
    request_id: str | None
    forward: records.Forward
    payload: bytes  # the FORWARD record, to send again
    owner: int
    first_sent: float
    last_sent: float


class Forwarder:
    """Both ends of forwarding: the publishing shard's pending publishes and the
    owner's memory of the ids it sequenced."""

    def __init__(self, ctx: ShardContext, sequence: Callable[[records.Forward], int]) -> None:
        self.bus = ctx.bus
        self.loop = ctx.loop
        self.stats = ctx.counters
        self.sequence = sequence  # the owner's sequencing of one publish
        self.pending: dict[str, PendingPublish] = {}
        self.sequenced: OrderedDict[str, tuple[str, int]] = OrderedDict()

    # Publishing shard

    def send(
        self, conn: Connection, request_id: str | None, forward: records.Forward, owner: int
    ) -> None:
        payload = records.encode_forward(forward)
        self.bus.publish(_FORWARD, owner, payload)
        now = self.loop.time()
        self.pending[forward.msg_id] = PendingPublish(
            conn, request_id, forward, payload, owner, now, now
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
            if now - pending.first_sent >= FORWARD_GIVE_UP:
                del self.pending[msg_id]
                log_event(log, logging.ERROR, "forward_failed", msg=msg_id, owner=pending.owner)
                if pending.conn is not None:
                    reason = f"the owner of room {pending.forward.room} did not answer"
                    pending.conn.send(
                        wire.text_frame(
                            wire.error_payload("unavailable", reason, pending.request_id)
                        )
                    )
            elif now - pending.last_sent >= FORWARD_RETRY:
                pending.last_sent = now
                self.stats[_S_RETRIED] += 1
                self.bus.publish(_FORWARD, pending.owner, pending.payload)

    # Owner

    def on_forward(self, origin: int, forward: records.Forward) -> None:
        seen = self.sequenced.get(forward.msg_id)
        if seen is None:
            self.sequence(forward)
            return
        room, seq = seen
        payload = records.encode_forward_seen(records.ForwardSeen(forward.msg_id, room, seq))
        self.bus.publish(_FORWARD_SEEN, origin, payload)

    def remember(self, msg_id: str, room: str, seq: int) -> None:
        self.sequenced[msg_id] = (room, seq)
        if len(self.sequenced) > SEQUENCED_IDS:
            self.sequenced.popitem(last=False)


def send_ack(conn: Connection, room: str, seq: int, request_id: str | None) -> None:
    ack: dict[str, object] = {"type": "ack", "room": room, "seq": seq}
    if request_id is not None:
        ack["id"] = request_id
    conn.send(wire.text_frame(wire.encode(ack)))
