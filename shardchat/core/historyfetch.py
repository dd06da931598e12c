"""Messages a ``history`` answer needs that the engine's room log lacks, fetched for it alone.

An engine's log of a room can lack seqs that the server still holds: a range
given up as a ``gap`` here (the log skipped it), or messages older than the
log's first (it started late, or keeps only the recent part: with a store,
``delivery.history_memory`` on the room's owner and a tail elsewhere). A
``history``, or a ``join`` resuming from ``since``, that asks for such seqs has them
fetched through the same path as a gap fill (:meth:`Broker.fill`: the room's
owner, its store, or Redis), and answered from the fetched messages and the
log together. The fetched messages are kept for that answer only: they never
go to the room's members nor into the log, whose order stays as it was (the
engine holds the log whole meanwhile, so that its part is still there).

A fetch ends when the holder has answered the whole range (messages, or the
part it no longer holds), or after ``wait`` (the holder is stopped or gone):
the answer then has what came by then. The holder answers in chunks; the end
of a chunk that brought the first seq still wanted asks for the rest. An end
that brought nothing answered an older request (a gap fill of the room asked
while the holder was stopped answers the same range): the newest request's
answer is still to come, and waiting for it keeps the answer whole.

Pure: the engine passes the time, and the broker does the I/O.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from shardchat.core.broker import Broker

__all__ = ["Fetch", "HistoryFetches"]


@dataclass(slots=True, eq=False)
class Fetch:
    """One ``history`` answer's missing range and what came of it."""

    first: int
    last: int
    deadline: float  # answered with what came by then
    then: Callable[[dict[int, bytes]], None]  # the answer, handed the messages
    asked: int  # the first seq of the newest request
    lost_to: int = 0  # the holder no longer has the seqs up to this one
    got: dict[int, bytes] = field(default_factory=dict)  # seq -> JSON

    def next_seq(self) -> int:
        """The first seq of the range neither fetched nor known to be gone."""
        seq = max(self.first, self.lost_to + 1)
        while seq in self.got:
            seq += 1
        return seq


class HistoryFetches:
    """The fetches under way of one engine, per room."""

    def __init__(self, broker: Broker, wait: float) -> None:
        self.broker = broker
        self.wait = wait
        self.pending: dict[str, list[Fetch]] = {}

    def fetch(
        self, room: str, first: int, last: int, now: float, then: Callable[[dict[int, bytes]], None]
    ) -> None:
        """Fetch ``first..last`` of ``room``; ``then(messages)`` once it is here, or
        after ``wait`` with what came."""
        self.pending.setdefault(room, []).append(Fetch(first, last, now + self.wait, then, first))
        self.broker.fill(room, first, last)

    def on_replay(self, room: str, seq: int, json: bytes) -> None:
        for fetch in self.pending.get(room, ()):
            if fetch.first <= seq <= fetch.last:
                fetch.got[seq] = json

    def on_lost(self, room: str, last: int) -> None:
        """The holder no longer has anything up to ``last``."""
        fetches = self.pending.get(room)
        if not fetches:
            return
        for fetch in fetches:
            fetch.lost_to = max(fetch.lost_to, last)
        self._finish(room, [f for f in fetches if f.next_seq() > f.last])

    def on_end(self, room: str, last: int, now: float | None = None) -> None:
        """The end of an answer for ``..last``. Only a fetch that asked up to ``last``
        takes it as its own: it asks for the rest when the first seq it still
        wanted came (the answer to its newest request), and waits otherwise.
        A chunk that came gives the rest ``wait`` again from ``now``: a long
        range (a resume from far back in a store) comes in many chunks."""
        fetches = self.pending.get(room)
        if not fetches:
            return
        done = []
        for fetch in fetches:
            if fetch.last != last:
                continue
            seq = fetch.next_seq()
            if seq > fetch.last:
                done.append(fetch)
            elif seq > fetch.asked:
                fetch.asked = seq
                if now is not None:
                    fetch.deadline = now + self.wait
                self.broker.fill(room, seq, fetch.last)
        self._finish(room, done)

    def ask_again(self, latest: Callable[[str], int | None], now: float) -> None:
        """The broker lost records (a lap, the holder restarted): the fetches of
        the rooms it names (``latest(room)`` not None) ask again for what they
        still want, with ``wait`` again, since the request or its answer may be
        gone with them."""
        for room, fetches in self.pending.items():
            if latest(room) is None:
                continue
            for fetch in fetches:
                seq = fetch.next_seq()
                if seq <= fetch.last:
                    fetch.asked = seq
                    fetch.deadline = now + self.wait
                    self.broker.fill(room, seq, fetch.last)

    def sweep(self, now: float) -> None:
        """Answer the fetches whose holder did not answer within ``wait``."""
        for room, fetches in list(self.pending.items()):
            self._finish(room, [f for f in fetches if f.deadline <= now])

    def next_deadline(self) -> float | None:
        return min((f.deadline for fs in self.pending.values() for f in fs), default=None)

    def _finish(self, room: str, done: list[Fetch]) -> None:
        if not done:
            return
        left = [f for f in self.pending[room] if f not in done]
        if left:
            self.pending[room] = left
        else:
            del self.pending[room]
        for fetch in done:
            fetch.then(fetch.got)
