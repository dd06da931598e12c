"""The shm broker's reading of the peers' rings: records to their handlers, laps
and peer restarts to a resync of the engine's rooms.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from shardchat import stats
from shardchat.brokers.sequencer import owner_of
from shardchat.brokers.shm.presence import Presence
from shardchat.brokers.shm.state import (
    _FORWARD_SEEN,
    _S_LAPS,
    _S_LOST,
    _S_READ,
    _TOLD,
    POLL_LIMIT,
)
from shardchat.core.broker import BrokerListener
from shardchat.logs import log_event
from shardchat.ring import records

__all__ = ["Reading"]

log = logging.getLogger(__name__)


class Reading(Presence):
    """The peers' rings, read."""

    __slots__ = ()

    def read_peers(self, now: float | None = None) -> bool:
        """Hand every peer's new records to the listener, ``POLL_LIMIT`` per ring;
        True when there is more to read at once. ``now``: monotonic seconds."""
        listener = self.listener
        if listener is None:
            return False
        if now is not None:
            self._now_ns = int(now * 1e9)
        if self._answers_due:
            answers, self._answers_due = self._answers_due, []
            for room, last in answers:
                listener.on_replay_lost(room, last)
        if self.durable is not None:
            self._stored(listener)
        more = False
        counters = self.stats
        handlers = self._handlers
        # What waited for us when we came to read: the forwards we are to sequence
        # are among it (admission control, full()).
        self.backlog = sum(reader.backlog() for reader in self.readers.values())
        for peer, reader in self.readers.items():
            laps = reader.lapped
            batch = reader.poll(POLL_LIMIT)
            if batch:
                counters[_S_READ] += len(batch)
                for _, kind, aux, payload in batch:
                    handlers[kind](peer, aux, payload)
                if len(batch) == POLL_LIMIT:
                    more = True
            if reader.lapped != laps:
                log_event(log, logging.WARNING, "ring_lapped", peer=peer, lost=reader.lost)
                counters[_S_LAPS] = sum(r.lapped for r in self.readers.values())
                counters[_S_LOST] = sum(r.lost for r in self.readers.values())
                listener.on_resync(self._latest_of(peer))
                more = True
        return more

    def read_stored(self) -> None:
        """Hand the listener the acks that waited for the store's writer (fsync
        "always", a writer far behind or failing), which it gave back."""
        if self.listener is not None and self.durable is not None:
            self._stored(self.listener)

    def _stored(self, listener: BrokerListener) -> None:
        """The store's side of a read of the peers: the acks of the turns it wrote (the peers'
        as FORWARD_SEEN records; seq 0 says it failed)."""
        durable = self.durable
        assert durable is not None
        for turn, ok in durable.finished():
            for msg_id, room, seq in turn.acks:
                if ok:
                    listener.on_published(msg_id, room, seq)
                else:
                    listener.on_publish_failed(msg_id, room)
            for peer, msg_id, room, seq in turn.peer_acks:
                answer = records.ForwardSeen(msg_id, room, seq if ok else 0)
                self._write(_FORWARD_SEEN, peer, records.encode_forward_seen(answer))

    def _latest_of(self, peer: int) -> Callable[[str], int | None]:
        """Where each room ``peer`` owns is now, by its seq table."""
        table, workers = self.tables[peer], self.workers

        def latest(room: str) -> int | None:
            if owner_of(room, workers) != peer:
                return None
            return table.lookup(room) or 0

        return latest

    def _on_reset(self, peer: int, aux: int, payload: bytes) -> None:
        """``peer`` (re)started: its users are gone (the rooms we own get their
        leaves), it gets what members were told of the rooms we hold with it
        and our local pairs, and requests to its previous incarnation may be
        lost: the engine asks again for the rooms it owns, we ask again what
        we asked of it."""
        listener = self.listener
        assert listener is not None
        holders = self.holders
        self._emit(holders.drop_shard(peer))
        if peer in holders.co_holders():
            self._pairs(_TOLD, peer, holders.told_for(peer))
        self._ask_again(
            [
                (q, p.target, p.room, p.user, p.limit)
                for q, p in self.queries.reset(peer, self._now_ns / 1e9)
            ]
        )
        listener.on_peer_reset(peer)
        listener.on_resync(self._latest_of(peer))

    def record_lag(self) -> None:
        """Set the gauges of how many bytes of each peer's ring we have not read yet."""
        for peer, reader in self.readers.items():
            self.stats[stats.LAG_BASE + peer] = reader.backlog()
