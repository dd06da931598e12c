"""The shm broker's start-up: rebuilt from what the rings, our seq table and the
room store still hold after a (re)start.
"""

from __future__ import annotations

import logging
import time

from shardchat.brokers.presence_holders import REBUILD_TIMEOUT
from shardchat.brokers.sequencer import owner_of
from shardchat.brokers.shm.sequencing import Sequencing
from shardchat.brokers.shm.state import (
    _FORWARD,
    _RESET,
    _ROOM_MSG,
    POLL_LIMIT,
)
from shardchat.core.broker import BrokerListener
from shardchat.ring import records
from shardchat.ring.ring import Record, RingReader

__all__ = ["Recovery"]

log = logging.getLogger(__name__)


class Recovery(Sequencing):
    """Start-up from shared memory (and the store)."""

    __slots__ = ()

    def retained(self, shard: int) -> tuple[RingReader, list[Record]]:
        """Everything ``shard``'s ring still holds, and a reader left at its end."""
        reader = RingReader(self._ring_views[shard], from_oldest=True)
        held: list[Record] = []
        while batch := reader.poll(POLL_LIMIT):
            held += batch
        return reader, held

    def recover(self, listener: BrokerListener, now: float) -> None:
        """Rebuild from shared memory after a (re)start, then start delivering.

        Our own seq table gives each owned room's seq; every ring's retained
        records give the history still held and the ids and idempotency keys we
        already sequenced. Forwards to us from the last ``publish_timeout`` not
        sequenced yet are sequenced now: the previous incarnation may have died
        first.
        """
        self.listener = listener
        self._now_ns = now_ns = int(now * 1e9)
        oldest_forward_ns = now_ns - int(self.forwarder.give_up * 1e9)
        _, own = self.retained(self.shard_id)
        self._restore(listener, own)
        for room, seq in self.tables[self.shard_id].entries().items():
            self.sequencer.restore(room, seq)
            listener.restore(room, seq, None)
        if self.durable is not None:
            # After the table's rooms: the store's are not handed to the engine,
            # which fetches a room's history when it needs it.
            self._restore_stored(own, now)
        readers: dict[int, RingReader] = {}
        forwards: list[tuple[int, bytes]] = []
        for peer in self.peers:
            reader, held = self.retained(peer)
            readers[peer] = reader
            self._restore(listener, held)
            me = self.shard_id
            forwards += [
                (peer, payload) for _, kind, aux, payload in held if kind == _FORWARD and aux == me
            ]
        for peer, payload in forwards:
            publication = records.decode_forward(payload)
            if publication.publish_ns >= oldest_forward_ns:
                self._on_forward(peer, self.shard_id, payload)
        # Our view of the rooms we hold comes back from the peers' snapshots (and
        # what members were told, from our co-holders), sent on our RESET.
        self.holders.begin_rebuild(self.peers)
        self._rebuild_until = now + REBUILD_TIMEOUT
        self.writer.append(_RESET, 0, b"")
        self._written += 1
        self.readers = readers
        self.bells[self.shard_id].absorb()

    def _restore_stored(self, own: list[Record], now: float) -> None:
        """Our rooms' seqs and recent idempotency keys from the store (into our seq
        table, which every shard reads); what our ring holds that the store lacks
        (this shard died before its writer wrote it) is stored again."""
        durable = self.durable
        assert durable is not None
        restored = durable.restore()
        sequencer = self.sequencer
        for room, seq in restored.seqs.items():
            sequencer.restore(room, seq)
            self._store_seq(room, seq)
        wall_ns = int(now * 1e9) - time.time_ns()  # monotonic = wall + this
        for key, room, seq, at in restored.keys:
            sequencer.remember("", room, seq, key, int(at * 1e9) + wall_ns)
        workers, me, seqs = self.workers, self.shard_id, restored.seqs
        for position, kind, _, payload in own:
            if kind != _ROOM_MSG:
                continue
            msg = records.decode_room_message(payload)
            if owner_of(msg.room, workers) == me and msg.seq > seqs.get(msg.room, 0):
                durable.sequenced(msg.room, msg.seq, time.time(), msg.key, msg.json, position)

    def _restore(self, listener: BrokerListener, held: list[Record]) -> None:
        workers, me = self.workers, self.shard_id
        for _, kind, _, payload in held:
            if kind != _ROOM_MSG:
                continue
            msg = records.decode_room_message(payload)
            listener.restore(msg.room, msg.seq, msg.json)
            if owner_of(msg.room, workers) == me:
                self.sequencer.remember(msg.msg_id, msg.room, msg.seq, msg.key, msg.publish_ns)
                self.sequencer.restore(msg.room, msg.seq)
