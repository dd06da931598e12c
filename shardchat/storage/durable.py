"""The shared-memory broker's seam to its room store: what it sequenced, kept.

docs/ARCHITECTURE.md, The room store. The owner shard's broker
(:class:`~shardchat.brokers.shm.ShmBroker`) calls :class:`Durable` at four
points: :meth:`~Durable.sequenced` for each message it sequences,
:meth:`~Durable.ack` and :meth:`~Durable.ack_peer` for each ack (every
ack waits for its message to be stored),
:meth:`~Durable.submit` at the turn's commit, :meth:`~Durable.finished` when
the writer hands back the acks that waited, and :meth:`~Durable.held` to
answer a fill from the store, with the messages not written yet.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from shardchat.core.roomlog import HeldMessage
from shardchat.storage.store import Restored, RoomStore

__all__ = ["Ack", "Durable", "PeerAck", "Turn"]

FILL_LIMIT = 1000  # stored messages read for one fill chunk at most (then the next is asked)

Ack = tuple[str, str, int]  # msg id, room, seq: our own publisher's
PeerAck = tuple[int, str, str, int]  # peer, msg id, room, seq: a forwarded publish's


@dataclass(frozen=True, slots=True)
class Turn:
    """One turn's acks that wait for its messages to be stored."""

    acks: list[Ack]
    peer_acks: list[PeerAck]


class Durable:
    """The store of one owner shard, as its broker uses it."""

    def __init__(
        self, store: RoomStore[Turn], *, acks_wait: bool = False, ring_bytes: int = 1 << 24
    ) -> None:
        self.store = store
        # Every ack waits for its message to be stored, with every storage.fsync
        # (with "always", for its synced commit): an ack means "in SQLite", so no
        # overwrite of the owner's ring (its other records move it too: forwards,
        # fill answers, presence) can lap an acked row the store lacks. The
        # writer still gathers storage.write_every of turns per transaction and
        # hands the acks back per gathering; with "always" it writes at once.
        self.always = acks_wait
        self._hurry = ring_bytes // 8  # behind this much, the writer is woken at once
        self._acks: list[Ack] = []  # this turn's acks that wait
        self._peer_acks: list[PeerAck] = []
        self._turn_start = -1  # the ring position of this turn's first message
        self._starts: deque[tuple[int, int]] = deque()  # (batch, ring position) not stored

    @property
    def full(self) -> bool:
        """The last write failed: a publish is refused at once (``unavailable``)."""
        return self.store.full

    @property
    def waiting(self) -> int:
        """Messages sequenced and not stored yet (overload.store bounds it)."""
        return self.store.backlog

    def behind(self, tail: int) -> int:
        """Bytes of our ring written since the oldest message not stored yet
        (``tail``: the ring's position now)."""
        starts = self._starts
        stored = self.store.stored_batches
        while starts and starts[0][0] < stored:
            starts.popleft()
        if starts:
            return tail - starts[0][1]
        return 0 if self._turn_start < 0 else tail - self._turn_start

    def restore(self) -> Restored:
        return self.store.restore()

    def sequenced(
        self, room: str, seq: int, at: float, key: str, json: bytes, position: int = 0
    ) -> None:
        """Message ``seq`` of ``room`` was sequenced; its record goes to our ring
        at ``position``."""
        self.store.add(room, seq, at, key, json)
        if self._turn_start < 0:
            self._turn_start = position

    def ack(self, msg_id: str, room: str, seq: int) -> None:
        """Our publisher's ack, sent once everything sequenced so far is stored."""
        self._acks.append((msg_id, room, seq))

    def ack_peer(self, peer: int, msg_id: str, room: str, seq: int) -> None:
        """Answer ``peer``'s forward once everything sequenced so far is stored."""
        self._peer_acks.append((peer, msg_id, room, seq))

    @property
    def due(self) -> bool:
        return self._turn_start >= 0 or bool(self._acks) or bool(self._peer_acks)

    def submit(self, tail: int) -> None:
        """The turn's end: its messages to the writer, with the acks that wait for
        them (back through :meth:`finished`). ``tail``: our ring's position."""
        hurry = self.behind(tail) > self._hurry
        start, self._turn_start = self._turn_start, -1
        if self._acks or self._peer_acks:
            turn = Turn(self._acks, self._peer_acks)
            self._acks, self._peer_acks = [], []
            batch = self.store.submit(turn, hurry=hurry, urgent=self.always)
        elif start >= 0:
            batch = self.store.submit(hurry=hurry)
        else:
            return
        if start >= 0:
            self._starts.append((batch, start))

    def finished(self) -> list[tuple[Turn, bool]]:
        """The turns whose acks waited, written since the last call (True: stored)."""
        return self.store.finished()

    def held(self, room: str, first: int, last: int) -> list[HeldMessage]:
        """``room``'s messages ``first..last`` that the store holds or will."""
        pending = self.store.pending(room, first, last)  # before the read: see pending()
        out = self.store.read(room, first, last, FILL_LIMIT)
        if pending and len(out) < FILL_LIMIT:  # a cut read: the rest in the next chunk
            have = {m.seq for m in out}
            out += [HeldMessage(seq, json) for seq, json in pending.items() if seq not in have]
            out.sort(key=lambda m: m.seq)
        return out

    def close(self) -> int:
        """Store what waits and close; the messages left unstored (in our ring)."""
        return self.store.close()
