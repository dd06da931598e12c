"""A room's log: the latest seq an engine has seen and the history it holds.

Pure: no sockets, no processes. Every engine keeps a :class:`RoomLog` of the
rooms it has seen, so that ``join`` with ``since`` and ``history`` are
answered locally. Who assigns a room's seq is the broker's business
(:mod:`shardchat.core.broker`).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from itertools import islice

import orjson

from shardchat.core.errors import SequenceError

__all__ = ["TAIL", "HeldMessage", "Replay", "RoomLog", "unexpired"]

# Messages a shard keeps of a room whose recent history another shard of the
# box keeps (Holding.ELSEWHERE): enough for a reliable client's resends and a
# resume of a moment ago; anything older is fetched from the room's owner.
TAIL = 128


@dataclass(frozen=True, slots=True)
class HeldMessage:
    seq: int
    payload: bytes  # the exact JSON of the `message` frame clients receive


@dataclass(frozen=True, slots=True)
class Replay:
    """What a ``join`` with ``since`` (or a ``history`` request) gets back."""

    messages: list[HeldMessage]
    recovered: bool  # epoch matched and nothing after `since` was missing


class RoomLog:
    """One room's sequence and its last ``capacity`` messages, in seq order."""

    __slots__ = ("_capacity", "_held", "epoch", "seq", "touched")

    def __init__(self, epoch: str, capacity: int, seq: int = 0, touched: float = 0.0) -> None:
        self.epoch = epoch  # names this run of the room's sequence
        self.seq = seq  # the latest seq this log has seen (0: none yet)
        self.touched = touched  # when the log was last used (the caller's clock)
        self._capacity = capacity
        # The deque is made at the first message: an empty deque is 624 bytes, and
        # every shard with a member of a room keeps the room's log, so a box of
        # quiet small rooms would pay that once per room per shard.
        self._held: deque[HeldMessage] | tuple[()] = ()

    def __len__(self) -> int:
        return len(self._held)

    @property
    def capacity(self) -> int:
        """The most messages this log holds."""
        return self._capacity

    def resize(self, capacity: int) -> None:
        """Hold up to ``capacity`` messages from now on (the oldest go when fewer)."""
        if capacity == self._capacity:
            return
        self._capacity = capacity
        if self._held:
            self._held = deque(self._held, maxlen=capacity) if capacity else ()

    @property
    def oldest_seq(self) -> int:
        """The seq of the oldest held message; ``seq + 1`` when nothing is held."""
        return self._held[0].seq if self._held else self.seq + 1

    def append(self, seq: int, payload: bytes) -> None:
        """Hold message ``seq``, which must be the next one (``self.seq + 1``)."""
        if seq != self.seq + 1:
            raise SequenceError(f"seq {seq} does not follow {self.seq}")
        self.seq = seq
        if self._capacity:
            held = self._held
            if isinstance(held, tuple):
                held = self._held = deque(maxlen=self._capacity)
            held.append(HeldMessage(seq, payload))

    def skip_to(self, seq: int) -> None:
        """Accept that the messages up to ``seq`` are lost here: the held ones no
        longer run without a gap into what comes next, so they are dropped too."""
        if seq > self.seq:
            self._held = ()
            self.seq = seq

    def after(self, since: int, limit: int | None = None) -> list[HeldMessage]:
        """The held messages with ``seq > since``, oldest first, at most ``limit``."""
        return self.page(since, None, limit)

    def page(self, since: int | None, before: int | None, limit: int | None) -> list[HeldMessage]:
        """``history`` paging: the held messages with ``since < seq < before``, oldest
        first. With ``since``, the first ``limit`` of them (catching up); without, the
        last ``limit`` (the latest messages, or the ones just before ``before``)."""
        held = self._held
        if not held:
            return []
        first = held[0].seq
        start = 0 if since is None else max(0, since + 1 - first)
        end = len(held) if before is None else max(0, min(len(held), before - first))
        if limit is not None:
            if since is None:
                start = max(start, end - limit)
            else:
                end = min(end, start + limit)
        # islice, not held[i]: indexing a deque walks its blocks from an end each time.
        return list(islice(held, start, end))

    def replay(
        self, since: int, epoch: str | None, older: Mapping[int, bytes] | None = None
    ) -> Replay:
        """PROTOCOL.md, Reliable delivery: what a rejoin with ``since`` gets.

        ``older``: messages older than the held ones, fetched for this replay
        (from the store behind the room's owner). From another epoch, or when
        messages after ``since`` are no longer held, the replay starts at the
        oldest message there is and ``recovered`` is false.
        """
        if epoch is not None and epoch != self.epoch:
            return Replay(list(self._held), recovered=False)
        if since > self.seq:
            # A seq this epoch never reached: the client's state is not ours.
            return Replay(list(self._held), recovered=False)
        held = self.after(since)
        if older:
            first = held[0].seq if held else self.seq + 1
            held = [
                HeldMessage(seq, older[seq]) for seq in sorted(older) if since < seq < first
            ] + held
        # Every seq after `since` is there once (ascending, none above self.seq):
        # a fetch cut short or a retention passed leaves fewer.
        return Replay(held, recovered=len(held) == self.seq - since)


def _timestamp(payload: bytes) -> int:
    stamp = orjson.loads(payload).get("timestamp")
    return stamp if isinstance(stamp, int) else 0


def unexpired(messages: list[HeldMessage], cutoff_ms: int) -> list[HeldMessage]:
    """``messages`` (in seq order) without the leading ones stamped before
    ``cutoff_ms`` (``delivery.history_ttl``). Stamps grow with seq (up to the
    shards' clocks' skew of a publish or two), so only the oldest are read."""
    count = 0
    for message in messages:
        if _timestamp(message.payload) >= cutoff_ms:
            break
        count += 1
    return messages[count:] if count else messages
