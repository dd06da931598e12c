"""Publishes to rooms another shard owns: kept, forwarded again, given up. Pure.

A forwarded publish can be lost (the ring is lossy, and the
owner may die before it sequences it). The publishing shard keeps it until
the owner's sequenced record (or the owner's answer to a duplicate) comes
back, forwards it again after ``FORWARD_RETRY``, doubling the wait up to
``FORWARD_RETRY_MAX`` (a stopped owner must not have its small ring refilled
with the same forwards every second), and gives up after
``delivery.publish_timeout``: then the publish is "not known to be
published" (it may still be sequenced later). The owner deduplicates by
message id and idempotency key
(:class:`~shardchat.brokers.sequencer.Sequencer`), so forwarding again, and
a client's retry with the same ``id``, are safe.

The forwards in flight to each owner are counted: admission control refuses
a publish to an owner that has ``overload.forwards`` of ours unanswered
(PROTOCOL.md, Extensions, Overload), so that a busy or stopped owner makes
the excess fail at once instead of after ``publish_timeout``.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["FORWARD_PACE", "FORWARD_RETRY", "FORWARD_RETRY_MAX", "Forwarder", "PendingForward"]

FORWARD_RETRY = 1.0  # seconds before an unsequenced forward is sent again (then doubled)
FORWARD_RETRY_MAX = 8.0  # the longest wait between two sends of one forward
FORWARD_PACE = 0.02  # seconds between two batches of forwards sent again


@dataclass(slots=True)
class PendingForward:
    """A forwarded publish waiting for its owner to sequence it."""

    msg_id: str
    room: str
    owner: int
    payload: bytes  # the FORWARD record, to send again
    first_sent: float
    next_send: float  # when to forward it again
    wait: float  # the current wait between two sends (doubles up to FORWARD_RETRY_MAX)


class Forwarder:
    """The publishing shard's forwards that the owner has not answered yet."""

    def __init__(self, give_up: float) -> None:
        self.give_up = give_up  # delivery.publish_timeout
        self.pending: dict[str, PendingForward] = {}
        self._in_flight: dict[int, int] = {}  # owner -> its entries in pending

    def add(self, msg_id: str, room: str, owner: int, payload: bytes, now: float) -> None:
        self.pending[msg_id] = PendingForward(
            msg_id, room, owner, payload, now, now + FORWARD_RETRY, FORWARD_RETRY
        )
        self._in_flight[owner] = self._in_flight.get(owner, 0) + 1

    def in_flight(self, owner: int) -> int:
        """Our forwards ``owner`` has not answered yet."""
        return self._in_flight.get(owner, 0)

    def answered(self, msg_id: str) -> bool:
        """The owner sequenced ``msg_id``: True the first time, if it was ours."""
        pending = self.pending.pop(msg_id, None)
        if pending is None:
            return False
        self._in_flight[pending.owner] -= 1
        return True

    def due(
        self, now: float, budget: int | None = None
    ) -> tuple[list[PendingForward], list[PendingForward]]:
        """(forwards to send again now, forwards given up). Both leave or renew
        their timers here. At most ``budget`` bytes are sent again at once, oldest
        first; the rest ``FORWARD_PACE`` later. Forwards are lost when the owner's
        reader is lapped; all of them sent again at once (up to overload.forwards
        of them, several rings) lapped it again, every time, until they failed."""
        again: list[PendingForward] = []
        failed: list[PendingForward] = []
        left = budget
        for pending in list(self.pending.values()):
            if now - pending.first_sent >= self.give_up:
                del self.pending[pending.msg_id]
                self._in_flight[pending.owner] -= 1
                failed.append(pending)
            elif now >= pending.next_send:
                if left is not None:
                    if left < len(pending.payload) and again:
                        pending.next_send = now + FORWARD_PACE
                        continue
                    left -= len(pending.payload)
                pending.wait = min(FORWARD_RETRY_MAX, pending.wait * 2)
                pending.next_send = now + pending.wait
                again.append(pending)
        return again, failed

    def next_deadline(self) -> float | None:
        if not self.pending:
            return None
        give_up = self.give_up
        return min(min(p.next_send, p.first_sent + give_up) for p in self.pending.values())
