"""The shared-memory broker's seam to its room store: what it sequenced, kept.

docs/ARCHITECTURE.md, The room store. The owner shard's broker
(:class:`~shardchat.brokers.shm.ShmBroker`) calls :class:`Durable` at four
points: :meth:`~Durable.sequenced` for each message it sequences,
:meth:`~Durable.submit` at the turn's commit with the turn's acks (its own
publishers' and the forwarding peers'), :meth:`~Durable.finished` when it
drains (the acks whose messages are stored, or failed), and
:meth:`~Durable.held` to answer a fill from the store. Messages handed to
the writer and not written yet are kept here meanwhile, so that a fill
never misses the newest ones.
"""

from __future__ import annotations

from dataclasses import dataclass

from shardchat.core.roomlog import HeldMessage
from shardchat.storage.store import Restored, RoomStore

__all__ = ["Ack", "Durable", "PeerAck", "Turn"]

FILL_LIMIT = 1000  # stored messages read for one fill chunk at most (then the next is asked)

Ack = tuple[str, str, int]  # msg id, room, seq: our own publisher's
PeerAck = tuple[int, str, str, int]  # peer, msg id, room, seq: a forwarded publish's


@dataclass(frozen=True, slots=True)
class Turn:
    """One turn's acks, and its messages (room, seq) handed to the writer."""

    acks: list[Ack]
    peer_acks: list[PeerAck]
    rows: list[tuple[str, int]]


class Durable:
    """The store of one owner shard, as its broker uses it."""

    def __init__(self, store: RoomStore[Turn]) -> None:
        self.store = store
        self._rows: list[tuple[str, int]] = []  # this turn's
        self._unstored: dict[str, dict[int, bytes]] = {}  # room -> seq -> JSON
        self._peer_acks: list[PeerAck] = []
        self.waiting = 0  # messages sequenced and not stored yet (overload.store bounds it)

    @property
    def full(self) -> bool:
        """The last write failed: a publish is refused at once (``unavailable``)."""
        return self.store.full

    def restore(self) -> Restored:
        return self.store.restore()

    def sequenced(self, room: str, seq: int, at: float, key: str, json: bytes) -> None:
        self.store.add(room, seq, at, key, json)
        self._rows.append((room, seq))
        self._unstored.setdefault(room, {})[seq] = json
        self.waiting += 1

    def ack_peer(self, peer: int, msg_id: str, room: str, seq: int) -> None:
        """Answer ``peer``'s forward once everything sequenced so far is stored."""
        self._peer_acks.append((peer, msg_id, room, seq))

    @property
    def due(self) -> bool:
        return bool(self._rows or self._peer_acks)

    def submit(self, acks: list[Ack]) -> None:
        """The turn's end: its messages to the writer, with the acks that wait for them."""
        rows, self._rows = self._rows, []
        peer_acks, self._peer_acks = self._peer_acks, []
        self.store.submit(Turn(acks, peer_acks, rows))

    def finished(self) -> list[tuple[Turn, bool]]:
        """The turns written since the last call (True: stored)."""
        done = self.store.finished()
        unstored = self._unstored
        for turn, ok in done:
            self.waiting -= len(turn.rows)  # a failed write refuses publishes as full
            if not ok:
                continue  # the writer keeps the rows and tries again
            for room, seq in turn.rows:
                held = unstored.get(room)
                if held is not None:
                    held.pop(seq, None)
                    if not held:
                        del unstored[room]
        return done

    def held(self, room: str, first: int, last: int) -> list[HeldMessage]:
        """``room``'s messages ``first..last`` that the store holds or will."""
        out = self.store.read(room, first, last, FILL_LIMIT)
        pending = self._unstored.get(room)
        if pending and len(out) < FILL_LIMIT:  # a cut read: the rest in the next chunk
            have = {m.seq for m in out}
            out += [
                HeldMessage(seq, json)
                for seq, json in pending.items()
                if first <= seq <= last and seq not in have
            ]
            out.sort(key=lambda m: m.seq)
        return out

    def close(self) -> None:
        self.store.close()
