"""Fan-out: each room's local members and the frames queued for them this turn.

The hot path. A message is encoded once (by whoever
sequenced it) and framed once here; within one loop turn each room's frames
are queued, and at the end of the turn joined once into one buffer that goes
to each local member. So a busy shard batches by itself, a quiet one adds no
latency, and the caller's per-member work is one transport write. Rooms
without reliable members pay one dict lookup per flush for reliable delivery.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Generic

from shardchat.core import wire
from shardchat.core.counters import Counters, Slot
from shardchat.core.outputs import C, Output
from shardchat.core.reliable import ReliableRooms
from shardchat.core.roomlog import RoomLog

__all__ = ["Fanout"]

_S_DELIVERED = int(Slot.FRAMES_DELIVERED)
_S_BYTES_OUT = int(Slot.BYTES_OUT)


class Fanout(Generic[C]):
    """``members``: room -> this engine's member connections (insertion ordered)."""

    def __init__(
        self, logs: Mapping[str, RoomLog], reliable: ReliableRooms[C], counters: Counters
    ) -> None:
        self.members: dict[str, dict[C, None]] = {}
        self.logs = logs
        self.reliable = reliable
        self.counters = counters
        # This turn's frames, per room, until the flush (the engine's turn_due reads it).
        self.outbox: dict[str, list[bytes]] = {}
        # Bytes this turn's frames make, once per member: the shard's outgoing
        # bytes of the turn, which admission control bounds (overload.turn_bytes).
        self.turn_bytes = 0

    def queue(self, room: str, json: bytes) -> None:
        """Frame a message for the room's members; written at the next flush."""
        members = self.members.get(room)
        if members is None:
            return
        frame = wire.text_frame(json)
        self.turn_bytes += len(frame) * len(members)
        frames = self.outbox.get(room)
        if frames is None:
            self.outbox[room] = [frame]
        else:
            frames.append(frame)

    def flush(self, now: float, snapshot: bool = False) -> list[Output[C]]:
        """Each room's queued frames, joined once, for its members.

        The member dicts go out as they are (the caller writes at once) unless
        ``snapshot``: inside a request, members may change before the caller
        writes, so they are copied.
        """
        self.turn_bytes = 0
        if not self.outbox:
            return []
        outbox, self.outbox = self.outbox, {}
        members_of = self.members
        reliable = self.reliable.rooms
        out: list[Output[C]] = []
        delivered = 0
        sent = 0
        for room, frames in outbox.items():
            members = members_of.get(room)
            if not members:
                continue
            buf = frames[0] if len(frames) == 1 else b"".join(frames)
            out.append((tuple(members) if snapshot else members, buf))
            delivered += len(frames) * len(members)
            sent += len(buf) * len(members)
            if room in reliable:
                self.reliable.sent(room, self.logs[room].seq, now)
        counters = self.counters
        counters[_S_DELIVERED] += delivered
        counters[_S_BYTES_OUT] += sent
        return out
