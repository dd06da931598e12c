"""Gaps in a room's seq, filled from the room's owner before later messages go out.

DESIGN.md, Rooms: each shard delivers a room's messages in seq order. When a
message arrives past a gap (our reader of the owner's ring was lapped), the
room's later messages are held back and the owner is asked, with a
HISTORY_REQ, to resend the missing range as REPLAY records. The owner answers
in chunks of at most 1/8 of a ring, so that a resend cannot lap the shard
that asked for it; the asker asks for the next chunk at each chunk's end. If
the owner no longer holds a part of the range it says so (a skip marker): only
then are the messages counted as lost and the room moves on. A range that does
not come within ``GAP_TIMEOUT`` (the request or its answer was lapped too, or
the owner restarted) is asked for again, with a doubling wait, and again at
once when the owner restarts (its RESET); it is given up only after
``GAP_GIVE_UP`` without any progress, since a room must not stall for ever.

The same path fetches a room's history for a shard that has no copy of it
(dropped as idle, or just restarted) when a ``join`` with ``since`` needs it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from . import records, stats
from .context import ShardContext
from .obs import log_event
from .ringlayout import RecordKind, max_payload
from .rooms import RoomLog, owner_of

__all__ = ["GAP_GIVE_UP", "GAP_TIMEOUT", "GapFill", "HeldBack"]

log = logging.getLogger(__name__)

GAP_TIMEOUT = 2.0  # seconds to wait for the owner to resend a missed range, then ask again
GAP_TIMEOUT_MAX = 8.0  # the longest wait between two requests of one range
GAP_GIVE_UP = 30.0  # seconds without progress before a range is given up as lost

_HISTORY_REQ = int(RecordKind.HISTORY_REQ)
_REPLAY = int(RecordKind.REPLAY)
_S_GAPS_LOST = int(stats.Slot.GAPS_LOST)
# Markers in a REPLAY's msg id field (a REPLAY with no JSON carries no message):
_REPLAY_SKIP = "skip"  # the owner holds nothing up to this seq
_REPLAY_END = "end"  # end of one resent chunk


@dataclass(slots=True)
class HeldBack:
    """A room's gap being filled by its owner, and the messages that came after it."""

    deadline: float  # when to ask again
    last: int  # the last seq asked for
    give_up_at: float  # GAP_GIVE_UP after the last progress
    progress: int = 0  # the log's seq when progress was last seen
    wait: float = GAP_TIMEOUT  # the current wait for an answer
    messages: dict[int, records.RoomMessage] = field(default_factory=dict)


class GapFill:
    """Both ends of a fill: the asking shard's held-back rooms, the owner's answers.

    ``logs`` is the router's own dict of room logs (shared, not copied);
    ``queue`` hands a message's JSON to the fan-out once it follows its log.
    """

    def __init__(
        self, ctx: ShardContext, logs: dict[str, RoomLog], queue: Callable[[str, bytes], None]
    ) -> None:
        self.shard_id = ctx.shard_id
        self.workers = ctx.config.workers
        self.history = ctx.config.delivery.history
        self.epoch = ctx.epoch
        self.bus = ctx.bus
        self.loop = ctx.loop
        self.stats = ctx.counters
        self.logs = logs
        self.queue = queue
        self.held_back: dict[str, HeldBack] = {}
        self._waiting: dict[str, list[Callable[[], None]]] = {}  # joins awaiting a fetch
        self._max_payload = max_payload(ctx.config.ring.bytes)

    # Asking shard

    def hold_back(self, log_: RoomLog, msg: records.RoomMessage) -> None:
        """``msg`` came past a gap in ``log_``: keep it until the gap is filled."""
        held = self.held_back.get(msg.room)
        if held is None:
            held = self.request(msg.room, log_.seq + 1, msg.seq - 1)
        held.messages[msg.seq] = msg
        self.release(msg.room)

    def request(self, room: str, first: int, last: int, why: str = "gap") -> HeldBack:
        """Ask the room's owner to resend ``first..last``; hold later messages meanwhile."""
        held = self.held_back.get(room)
        now = self.loop.time()
        if held is None:
            held = self.held_back[room] = HeldBack(
                now + GAP_TIMEOUT, last, now + GAP_GIVE_UP, first - 1
            )
            level = logging.WARNING if why == "gap" else logging.INFO
            log_event(log, level, why, room=room, first=first, last=last)
        else:
            held.deadline = now + held.wait
            held.last = max(held.last, last)
        request = records.HistoryRequest(room, first, held.last)
        owner = owner_of(room, self.workers)
        self.bus.publish(_HISTORY_REQ, owner, records.encode_history_request(request))
        return held

    def on_lapped(self, peer: int) -> None:
        """Our reader of ``peer``'s ring was lapped: find the rooms it sequences that
        we are now behind on (its room table says where they are) and ask for them.
        Fills under way from that peer are asked again: the lap may have taken them."""
        table = self.bus.tables[peer]
        for room, log_ in self.logs.items():
            if owner_of(room, self.workers) != peer:
                continue
            seq = table.lookup(room)
            held = self.held_back.get(room)
            if held is not None:
                self.request(room, log_.seq + 1, max(held.last, seq or 0))
            elif seq is not None and seq > log_.seq:
                self.request(room, log_.seq + 1, seq)

    def on_owner_reset(self, peer: int) -> None:
        """``peer`` restarted: requests to its previous incarnation may be lost, and the
        new one holds what its ring kept. Ask it again for every range it owes us."""
        for room, held in list(self.held_back.items()):
            log_ = self.logs.get(room)
            if log_ is not None and owner_of(room, self.workers) == peer:
                held.wait = GAP_TIMEOUT
                self.request(room, log_.seq + 1, held.last)

    def release(self, room: str) -> None:
        """Deliver held-back messages that now follow the log without a gap."""
        held = self.held_back.get(room)
        if held is None:
            return
        log_ = self.logs[room]
        while (msg := held.messages.pop(log_.seq + 1, None)) is not None:
            log_.append(msg.seq, msg.json)
            self.queue(room, msg.json)
        # Duplicates of what the log now has are dropped.
        for seq in [s for s in held.messages if s <= log_.seq]:
            del held.messages[seq]
        if not held.messages and log_.seq >= held.last:
            del self.held_back[room]
            for then in self._waiting.pop(room, ()):
                then()

    def on_replay(self, msg: records.RoomMessage) -> None:
        room = msg.room
        log_ = self.logs.get(room)
        held = self.held_back.get(room)
        if log_ is None or held is None:
            return
        if msg.json:
            if msg.seq == log_.seq + 1:
                log_.append(msg.seq, msg.json)
                self.queue(room, msg.json)
            return
        if msg.msg_id == _REPLAY_SKIP:
            # The owner no longer holds anything up to msg.seq.
            if log_.seq < msg.seq:
                self._give_up(room, msg.seq)
        elif log_.seq < held.last:
            # End of a chunk: ask for the next one.
            self.request(room, log_.seq + 1, held.last)
        self.release(room)

    def ensure_history(self, room: str, since: int | None, then: Callable[[], None]) -> bool:
        """True when a join with ``since`` can be answered now; otherwise fetch the
        room's held history from its owner (this shard has no log of it: dropped
        as idle, or a restart) and call ``then`` once it is here."""
        if since is None or room in self.logs or not self.history:
            return True
        owner = owner_of(room, self.workers)
        if owner == self.shard_id:
            return True
        latest = self.bus.tables[owner].lookup(room) or 0
        if latest <= since:
            return True
        first = max(1, latest - self.history + 1)
        self.logs[room] = RoomLog(self.epoch, self.history, first - 1, self.loop.time())
        self._waiting.setdefault(room, []).append(then)
        if room not in self.held_back:
            self.request(room, first, latest, "history_fetch")
        return False

    def sweep(self, now: float) -> None:
        """Ask again for the ranges whose answer did not come in time (the request or
        the replay may have been lapped); give up only on a range that made no
        progress for ``GAP_GIVE_UP`` (its owner is stopped or gone for that long)."""
        for room, held in list(self.held_back.items()):
            if now < held.deadline:
                continue
            log_ = self.logs[room]
            if log_.seq > held.progress:
                held.progress = log_.seq
                held.give_up_at = now + GAP_GIVE_UP
                held.wait = GAP_TIMEOUT
            if now >= held.give_up_at:
                last = min(held.messages) - 1 if held.messages else held.last
                self._give_up(room, last)
                held.last = 0
                self.release(room)
            else:
                held.wait = min(GAP_TIMEOUT_MAX, held.wait * 2)
                self.request(room, log_.seq + 1, held.last)

    def _give_up(self, room: str, last: int) -> None:
        self.stats[_S_GAPS_LOST] += 1
        log_event(log, logging.WARNING, "gap_lost", room=room, last=last)
        self.logs[room].skip_to(last)

    # Owner

    def answer(self, requester: int, req: records.HistoryRequest) -> None:
        """Resend one chunk of ``req``'s range: at most 1/8 of the ring, so that a
        resend cannot lap the shard that asked for it; it asks for the next."""
        log_ = self.logs.get(req.room)
        held = [] if log_ is None else log_.after(req.first - 1)
        publish = self.bus.publish
        if not held or held[0].seq > req.last:
            skip_to = req.last if not held else held[0].seq - 1
            publish(_REPLAY, requester, _replay_marker(req.room, skip_to, _REPLAY_SKIP))
            return
        if held[0].seq > req.first:
            publish(_REPLAY, requester, _replay_marker(req.room, held[0].seq - 1, _REPLAY_SKIP))
        budget = self._max_payload
        for message in held:
            if message.seq > req.last or budget < len(message.payload):
                break
            budget -= len(message.payload) + 64
            payload = records.encode_room_message(req.room, message.seq, 0, "", message.payload)
            publish(_REPLAY, requester, payload)
        publish(_REPLAY, requester, _replay_marker(req.room, req.last, _REPLAY_END))


def _replay_marker(room: str, seq: int, kind: str) -> bytes:
    return records.encode_room_message(room, seq, 0, kind, b"")
