"""Reliable delivery state of one connection in one room (PROTOCOL.md, Reliable delivery).

Pure: the caller passes ``now`` and does the I/O. A connection enters
reliable mode for a room with its first ``ack``; from then on the messages
after its cumulative ack are outstanding. They are resent after
``ack_timeout``, then after twice that, four times, ... and after
``ack_retries`` resends without progress the connection is closed with 4409.
The messages themselves are not copied per connection: they are the room's
held history, so a connection in reliable mode costs these three slots.
"""

from __future__ import annotations

__all__ = ["Reliable"]


class Reliable:
    __slots__ = ("acked", "deadline", "retries")

    def __init__(self, acked: int) -> None:
        self.acked = acked  # the client has everything up to this seq
        self.deadline = 0.0  # when the outstanding messages are due again; 0 = none
        self.retries = 0  # resends since the last progress

    def sent(self, latest: int, now: float, timeout: float) -> None:
        """Messages up to ``latest`` went out; start the clock if it is not running."""
        if self.deadline == 0.0 and latest > self.acked:
            self.deadline = now + timeout

    def ack(self, seq: int, latest: int, now: float, timeout: float) -> None:
        """A cumulative ack; progress resets the retries and the clock."""
        seq = min(seq, latest)
        if seq <= self.acked:
            return
        self.acked = seq
        self.retries = 0
        self.deadline = 0.0 if seq >= latest else now + timeout

    def due(self, now: float) -> bool:
        return self.deadline != 0.0 and now >= self.deadline

    def exhausted(self, max_retries: int) -> bool:
        return self.retries >= max_retries

    def resent(self, now: float, timeout: float) -> None:
        """The outstanding messages were sent again: back off exponentially."""
        self.retries += 1
        self.deadline = now + timeout * (2**self.retries)
