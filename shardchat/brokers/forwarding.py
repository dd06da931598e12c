"""Publishes to rooms another shard owns: kept, forwarded again, given up. Pure.

DESIGN.md, Rooms: a forwarded publish can be lost (the ring is lossy, and the
owner may die before it sequences it). The publishing shard keeps it until
the owner's sequenced record (or the owner's answer to a duplicate) comes
back, forwards it again every ``FORWARD_RETRY``, and gives up after
``FORWARD_GIVE_UP``. The owner deduplicates by message id
(:class:`~shardchat.brokers.sequencer.Sequencer`), so forwarding again is
safe.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["FORWARD_GIVE_UP", "FORWARD_RETRY", "Forwarder", "PendingForward"]

FORWARD_RETRY = 1.0  # seconds before an unsequenced forward is sent again
FORWARD_GIVE_UP = 30.0  # seconds before the publisher is told the publish failed


@dataclass(slots=True)
class PendingForward:
    """A forwarded publish waiting for its owner to sequence it."""

    msg_id: str
    room: str
    owner: int
    payload: bytes  # the FORWARD record, to send again
    first_sent: float
    last_sent: float


class Forwarder:
    """The publishing shard's forwards that the owner has not answered yet."""

    def __init__(self) -> None:
        self.pending: dict[str, PendingForward] = {}

    def add(self, msg_id: str, room: str, owner: int, payload: bytes, now: float) -> None:
        self.pending[msg_id] = PendingForward(msg_id, room, owner, payload, now, now)

    def answered(self, msg_id: str) -> bool:
        """The owner sequenced ``msg_id``: True the first time, if it was ours."""
        return self.pending.pop(msg_id, None) is not None

    def due(self, now: float) -> tuple[list[PendingForward], list[PendingForward]]:
        """(forwards to send again now, forwards given up). Both leave or renew
        their timers here."""
        again: list[PendingForward] = []
        failed: list[PendingForward] = []
        for pending in list(self.pending.values()):
            if now - pending.first_sent >= FORWARD_GIVE_UP:
                del self.pending[pending.msg_id]
                failed.append(pending)
            elif now - pending.last_sent >= FORWARD_RETRY:
                pending.last_sent = now
                again.append(pending)
        return again, failed

    def next_deadline(self) -> float | None:
        if not self.pending:
            return None
        return min(
            min(p.last_sent + FORWARD_RETRY, p.first_sent + FORWARD_GIVE_UP)
            for p in self.pending.values()
        )
