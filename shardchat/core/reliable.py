"""Reliable delivery (PROTOCOL.md): one connection's ack state in one room, and the
resends of every room.

Pure: the caller passes ``now`` and does the I/O. A connection enters
reliable mode for a room with its first ``ack``; from then on the messages
after its cumulative ack are outstanding. They are resent after
``ack_timeout``, then after twice that, four times, ... and after
``ack_retries`` resends without progress the connection is closed with 4409.
The messages themselves are not copied per connection: they are the room's
held history, so a connection in reliable mode costs these three slots.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Generic

from shardchat.core import wire
from shardchat.core.config import DeliveryConfig
from shardchat.core.counters import Counters, Slot
from shardchat.core.messages import AppCloseCode
from shardchat.core.outputs import C, Close, Output
from shardchat.core.roomlog import RoomLog

__all__ = ["Reliable", "ReliableRooms"]

_S_RESENDS = int(Slot.RESENDS)


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


class ReliableRooms(Generic[C]):
    """Every room's connections in reliable mode, and the resends they are due.

    The first ``ack`` of a connection for a room puts it here. The fan-out calls
    :meth:`sent` when it writes a room's frames (starting the clocks); the
    engine's tick calls :meth:`resend_due`.
    """

    def __init__(self, delivery: DeliveryConfig, counters: Counters) -> None:
        self.delivery = delivery
        self.counters = counters
        self.rooms: dict[str, dict[C, Reliable]] = {}

    def ack(self, conn: C, room: str, seq: int, latest: int, now: float) -> None:
        """A cumulative ack; ``latest`` (the room's seq) bounds what can be acked."""
        timeout = self.delivery.ack_timeout
        states = self.rooms.setdefault(room, {})
        state = states.get(conn)
        if state is None:
            states[conn] = state = Reliable(min(seq, latest))
            state.sent(latest, now, timeout)
        else:
            state.ack(seq, latest, now, timeout)

    def forget(self, conn: C, room: str) -> None:
        states = self.rooms.get(room)
        if states is not None and states.pop(conn, None) is not None and not states:
            del self.rooms[room]

    def sent(self, room: str, latest: int, now: float) -> None:
        """The room's messages up to ``latest`` went out to its members."""
        states = self.rooms.get(room)
        if states:
            timeout = self.delivery.ack_timeout
            for state in states.values():
                state.sent(latest, now, timeout)

    def resend_due(
        self, now: float, logs: Mapping[str, RoomLog]
    ) -> tuple[list[Output[C]], float | None]:
        """What is due at ``now``: resends of everything after each late connection's
        ack (the same JSON, so the same seq and id), and 4409 closes after
        ``ack_retries`` resends without progress; and the next deadline."""
        out: list[Output[C]] = []
        soonest: float | None = None
        retries, timeout = self.delivery.ack_retries, self.delivery.ack_timeout
        for room, states in list(self.rooms.items()):
            log_ = logs.get(room)
            for conn, state in list(states.items()):
                if state.due(now):
                    # A log that no longer holds the next unacked message cannot
                    # resend it: 4409 says so, and a resume with `since` fetches it.
                    if (
                        state.exhausted(retries)
                        or log_ is None
                        or log_.oldest_seq > state.acked + 1
                    ):
                        out.append(((conn,), Close(AppCloseCode.ACK_TIMEOUT, "ack timeout")))
                        del states[conn]
                        continue
                    held = log_.after(state.acked)
                    if held:
                        out.append(((conn,), b"".join(wire.text_frame(m.payload) for m in held)))
                        self.counters[_S_RESENDS] += len(held)
                    state.resent(now, timeout)
                if state.deadline and (soonest is None or state.deadline < soonest):
                    soonest = state.deadline
            if not states:
                del self.rooms[room]
        return out, soonest
