"""Gaps in a room's seq, filled through the broker before later messages go out.

Each engine delivers a room's messages in seq order. When
a message arrives past a gap (on one box: our reader of the owner's ring was
lapped), the room's later messages are parked and the broker is asked to
resend the missing range (:meth:`Broker.fill`). It answers in chunks; at each
chunk's end the next one is asked for. Only what the broker says is gone
(``on_replay_lost``) is counted as lost at once. A range that does not come
within ``GAP_TIMEOUT`` (the request or its answer was lapped too, or the
owner restarted) is asked for again, with a doubling wait, and again at once
when the broker resyncs (a lap, a peer's restart); it is given up only after
``GAP_GIVE_UP`` without any progress, since a room must not stall for ever.

The same path fetches a room's history for an engine that has no copy of it
(dropped as idle, or just restarted) when a ``join`` with ``since`` needs it.

Every hold ends, filled or announced: a range the broker says is gone, a range
older than the last ``history`` messages (more than that many are parked after
it: no holder keeps it), or one that made no progress for ``GAP_GIVE_UP`` is
given up, and the room's members get a ``gap`` frame naming it
(PROTOCOL.md, Extensions) in the place of those messages. A join or
``history`` that waits for a parked room is answered after ``GAP_JOIN_WAIT`` at
the latest, from what the log holds then; the fill goes on for it.

One chunk at a time: a chunk's end asks for the next only when the log moved
since the newest request. A lap asks again at once (its answer may be lost),
and the answer to the request it replaced then ends with nothing new: without
this, every lap added a request that asked again at each of its ends, and the
resends of those requests lapped the readers again.

Pure: the engine passes the time, and the broker does the I/O.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from shardchat.core import wire
from shardchat.core.broker import Broker
from shardchat.core.counters import Counters, Slot
from shardchat.core.interfaces import INFO, NO_LOG, WARNING, EventLog
from shardchat.core.roomlog import RoomLog

__all__ = [
    "GAP_GIVE_UP",
    "GAP_JOIN_WAIT",
    "GAP_TIMEOUT",
    "GAP_TIMEOUT_MAX",
    "GapFill",
    "Parked",
    "gap_json",
]

GAP_TIMEOUT = 1.0  # seconds to wait for the broker to resend a missed range, then ask again
GAP_TIMEOUT_MAX = 4.0  # the longest wait between two requests of one range
GAP_GIVE_UP = 10.0  # seconds without progress before a range is given up as lost
GAP_JOIN_WAIT = 2.0  # the longest a join or history waits for a parked room's fill

_S_GAPS_LOST = int(Slot.GAPS_LOST)


@dataclass(slots=True)
class Parked:
    """A room's gap being filled, and the messages that came after it."""

    deadline: float  # when to ask again
    last: int  # the last seq asked for
    give_up_at: float  # GAP_GIVE_UP after the last progress
    progress: int = 0  # the log's seq when progress was last seen
    asked: int = 0  # the log's seq when the newest request was sent
    wait: float = GAP_TIMEOUT  # the current wait for an answer
    messages: dict[int, bytes] = field(default_factory=dict)  # seq -> JSON
    # The log's seq at the end of the last release: none of ``messages`` is at or
    # below it. Only a log moved since by something else (a replay, a give-up)
    # can leave duplicates behind, so only then are they looked for: a look at
    # each parked message made parking n messages cost n * n / 2.
    clean_to: int = -1


class GapFill:
    """The parked rooms of one engine.

    ``logs`` is the engine's own dict of room logs (shared, not copied);
    ``deliver(room, json)`` hands a message that now follows its log to the
    fan-out.
    """

    def __init__(
        self,
        broker: Broker,
        logs: dict[str, RoomLog],
        deliver: Callable[[str, bytes], None],
        counters: Counters,
        epoch: str,
        history: int,
        log: EventLog = NO_LOG,
        give_up: float = GAP_GIVE_UP,
        *,
        capacity: Callable[[str], int] | None = None,
    ) -> None:
        self.broker = broker
        self.give_up = give_up  # delivery.gap_give_up
        self.logs = logs
        self.deliver = deliver
        self.counters = counters
        self.epoch = epoch
        self.history = history  # what a holder keeps of a room (its retention)
        # How many messages a room's log here holds (at most `history`).
        self.capacity = capacity or (lambda room: history)
        self.log = log
        self.parked: dict[str, Parked] = {}
        # Joins and history awaiting a room's fill: (answer by then, continue).
        self._waiting: dict[str, list[tuple[float, Callable[[], None]]]] = {}

    def park(self, log_: RoomLog, room: str, seq: int, json: bytes, now: float) -> None:
        """Message ``seq`` came past a gap in ``log_``: park it until the gap is filled."""
        gap = self.parked.get(room)
        if gap is None:
            gap = self.request(room, log_.seq + 1, seq - 1, now)
        elif seq - 1 > gap.last:
            # Past the range asked for: what lies between is wanted too (asked for at
            # the current chunk's end). Left out, the room waited on that hole until
            # it was given up, although its holder had it.
            gap.last = seq - 1
        gap.messages[seq] = json
        if len(gap.messages) > self.history:
            # More messages after the gap than any holder keeps (the last
            # `history`): what is missing is gone everywhere. Said now, not after
            # the waits of a fill that cannot succeed.
            self._give_up(room, min(gap.messages) - 1)
        self.release(room)

    def request(self, room: str, first: int, last: int, now: float, why: str = "gap") -> Parked:
        """Ask for ``first..last``; hold later messages meanwhile."""
        gap = self.parked.get(room)
        if gap is None:
            gap = self.parked[room] = Parked(now + GAP_TIMEOUT, last, now + self.give_up, first - 1)
            level = WARNING if why == "gap" else INFO
            self.log.event(level, why, room=room, first=first, last=last)
        else:
            gap.deadline = now + gap.wait
            gap.last = max(gap.last, last)
        gap.asked = first - 1
        self.broker.fill(room, first, gap.last)
        return gap

    def resync(self, latest: Callable[[str], int | None], now: float) -> None:
        """The broker lost records: ask again for every room it says we are behind
        on (``latest(room)``: where the room is now, None for rooms the loss did not
        touch). Fills under way are asked again too: the loss may have taken them."""
        for room, log_ in self.logs.items():
            seq = latest(room)
            if seq is None:
                continue
            gap = self.parked.get(room)
            if gap is not None:
                gap.wait = GAP_TIMEOUT
                self.request(room, log_.seq + 1, max(gap.last, seq), now)
            elif seq > log_.seq:
                self.request(room, log_.seq + 1, seq, now)

    def release(self, room: str) -> None:
        """Deliver parked messages that now follow the log without a gap."""
        gap = self.parked.get(room)
        if gap is None:
            return
        log_ = self.logs[room]
        messages = gap.messages
        moved = log_.seq != gap.clean_to
        while (json := messages.pop(log_.seq + 1, None)) is not None:
            log_.append(log_.seq + 1, json)
            self.deliver(room, json)
        if moved:
            # Duplicates of what the log now has are dropped.
            for seq in [s for s in messages if s <= log_.seq]:
                del messages[seq]
        gap.clean_to = log_.seq
        if not messages and log_.seq >= gap.last:
            del self.parked[room]
            for _, then in self._waiting.pop(room, ()):
                then()

    def restart(self, room: str) -> list[Callable[[], None]]:
        """The room's sequence started again (a new epoch): what was parked is
        of the old one. Returns the joins that waited for it, to be asked again."""
        self.parked.pop(room, None)
        return [then for _, then in self._waiting.pop(room, [])]

    def on_replay(self, room: str, seq: int, json: bytes) -> None:
        log_ = self.logs.get(room)
        if log_ is None or room not in self.parked:
            return
        if seq == log_.seq + 1:
            log_.append(seq, json)
            self.deliver(room, json)

    def on_lost(self, room: str, last: int) -> None:
        """The broker no longer holds anything up to ``last``."""
        log_ = self.logs.get(room)
        if log_ is None or room not in self.parked:
            return
        if log_.seq < last:
            self._give_up(room, last)
        self.release(room)

    def on_end(self, room: str, now: float) -> None:
        """End of a resent chunk: ask for the next one, or release. Only when the log
        moved since the newest request: otherwise this ends an older request, and
        the newest is still out (its loss is the sweep's business)."""
        log_ = self.logs.get(room)
        gap = self.parked.get(room)
        if log_ is None or gap is None:
            return
        self.release(room)  # first: what was parked behind the chunk is not asked again
        if room in self.parked and gap.asked < log_.seq < gap.last:
            self.request(room, log_.seq + 1, gap.last, now)

    def ensure_history(self, room: str, since: int, now: float, then: Callable[[], None]) -> bool:
        """True when a join with ``since`` (0 without one) or a ``history`` (0) can be
        answered now; otherwise fetch the room's held history (this engine has no log
        of it: dropped as idle, or a restart) and call ``then`` once it is here, or
        after ``GAP_JOIN_WAIT`` with what is here by then."""
        answer_by = now + GAP_JOIN_WAIT
        if room in self.parked:
            # A gap being filled: answered once it is, so that `since` is judged
            # against everything the server holds (a resume after a reconnect).
            self._waiting.setdefault(room, []).append((answer_by, then))
            return False
        log_ = self.logs.get(room)
        if log_ is not None and since > log_.seq:
            # The client has seen more than this engine has yet (it published or
            # read on another engine an instant ago): fetch up to the latest seq
            # the broker knows first, so that the resume is judged on it.
            latest = self.broker.latest_seq(room) or 0
            if latest > log_.seq:
                self._waiting.setdefault(room, []).append((answer_by, then))
                self.request(room, log_.seq + 1, latest, now, "resume_fetch")
                return False
        if room in self.logs or not self.history:
            return True
        latest = self.broker.latest_seq(room) or 0
        if latest <= since:
            return True
        capacity = self.capacity(room)
        first = max(1, latest - capacity + 1)
        epoch = self.broker.epoch_of(room) or self.epoch
        self.logs[room] = RoomLog(epoch, capacity, first - 1, now)
        self._waiting.setdefault(room, []).append((answer_by, then))
        if room not in self.parked:
            self.request(room, first, latest, now, "history_fetch")
        return False

    def sweep(self, now: float) -> None:
        """Answer the joins that waited ``GAP_JOIN_WAIT``; ask again for the ranges
        whose answer did not come in time (the request or the replay may have been
        lost); give up only on a range that made no progress for ``GAP_GIVE_UP``
        (whoever holds it is stopped or gone that long)."""
        for room, waits in list(self._waiting.items()):
            due = [then for answer_by, then in waits if answer_by <= now]
            if due:
                left = [(answer_by, then) for answer_by, then in waits if answer_by > now]
                if left:
                    self._waiting[room] = left
                else:
                    del self._waiting[room]
                for then in due:
                    then()
        for room, gap in list(self.parked.items()):
            if now < gap.deadline:
                continue
            log_ = self.logs[room]
            if log_.seq > gap.progress:
                gap.progress = log_.seq
                gap.give_up_at = now + self.give_up
                gap.wait = GAP_TIMEOUT
            if now >= gap.give_up_at:
                last = min(gap.messages) - 1 if gap.messages else gap.last
                self._give_up(room, last)
                self.release(room)
                if room in self.parked:
                    # Another hole after the messages just released: a range of its
                    # own, with its own time to come.
                    gap.progress = log_.seq
                    gap.give_up_at = now + self.give_up
                    gap.wait = GAP_TIMEOUT
                    self.request(room, log_.seq + 1, gap.last, now)
            else:
                gap.wait = min(GAP_TIMEOUT_MAX, gap.wait * 2)
                self.request(room, log_.seq + 1, gap.last, now)

    def next_deadline(self) -> float | None:
        deadlines = [gap.deadline for gap in self.parked.values()]
        deadlines += [answer_by for waits in self._waiting.values() for answer_by, _ in waits]
        return min(deadlines, default=None)

    def _give_up(self, room: str, last: int) -> None:
        """Accept that ``log.seq + 1 .. last`` is lost here, and tell the members."""
        log_ = self.logs[room]
        first = log_.seq + 1
        if last < first:
            return
        self.counters[_S_GAPS_LOST] += 1
        self.log.event(WARNING, "gap_lost", room=room, first=first, last=last)
        log_.skip_to(last)
        self.deliver(room, gap_json(room, first, last))


def gap_json(room: str, first: int, last: int) -> bytes:
    """PROTOCOL.md, Extensions: the ``gap`` frame that stands for messages
    ``first..last`` of ``room`` that this server could not deliver."""
    return wire.encode({"type": "gap", "room": room, "first": first, "last": last})
