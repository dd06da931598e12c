"""The shm broker's publishes: sequenced by the room's owner, or forwarded to it.

A room's order is set here: the room's owner shard sequences
(:mod:`~shardchat.brokers.sequencer`), and a publish on another shard is
forwarded to it through our ring and kept until it comes back sequenced
(:mod:`~shardchat.brokers.forwarding`).
"""

from __future__ import annotations

import logging

from shardchat.brokers.shm.state import (
    _FORWARD,
    _FORWARD_SEEN,
    _ROOM_MSG,
    _S_SEQUENCED,
    ShmState,
)
from shardchat.core import wire
from shardchat.core.broker import Publication
from shardchat.core.overload import Queue
from shardchat.logs import log_event
from shardchat.ring import records

__all__ = ["Sequencing"]

log = logging.getLogger(__name__)


class Sequencing(ShmState):
    """Publishes: the owner's sequencing, the others' forwards and their answers."""

    __slots__ = ()

    def publish(self, publication: Publication, now: float) -> None:
        room = publication.room
        self._now_ns = int(now * 1e9)
        owner = self._owners.get(room)
        if owner is None:
            owner = self._owner(room)
        if owner == self.shard_id:
            durable = self.durable
            # Most publishes have no idempotency key (seen_key's first check, inline).
            seen = (
                self.sequencer.seen_key(publication.key, self._now_ns) if publication.key else None
            )
            if seen is not None:
                room, seq = seen  # a retry of a publish we sequenced: its seq, once
            elif durable is not None and durable.full:
                # The store cannot write: refused before it is sequenced (at the
                # commit, outside the engine's call), so nothing is seen unstored.
                self._failed_due.append((publication.msg_id, room))
                return
            else:
                seq = self._sequence(publication)
            if durable is not None:
                durable.ack(publication.msg_id, room, seq)  # once stored
            else:
                # No store: acked at the commit, an acked message is in the ring.
                self._acks_due.append((publication.msg_id, room, seq))
            return
        payload = records.encode_forward(publication)
        self._write(_FORWARD, owner, payload)
        self.forwarder.add(publication.msg_id, room, owner, payload, now)

    def full(self, room: str) -> Queue | None:
        """Forwards in flight to the room's owner at their bound; or, for a room we
        own, the peers' records we have not read yet (the forwards waiting for us
        to sequence them are among them) over theirs, or what our room store has
        not written yet (the acks wait for it) at its bound."""
        owner = self._owners.get(room)
        if owner is None:
            owner = self._owner(room)
        if owner != self.shard_id:
            if self.forwarder.in_flight(owner) >= self._max_forwards:
                return Queue.FORWARDS
        elif self.backlog > self._max_backlog:
            return Queue.BACKLOG
        elif self.durable is not None and self.durable.waiting >= self._max_store:
            return Queue.STORE
        return None

    def _sequence(self, p: Publication) -> int:
        room = p.room
        seq = self.sequencer.assign(room, p.msg_id, p.key, self._now_ns)
        json = wire.message_json(room, p.sender, p.content, seq, p.timestamp, p.msg_id)
        # Ring first, table second, and the table only once the ring's tail is
        # committed (commit): a restart takes the larger of the two, so the table must
        # never name a seq whose record a restarted writer pads over. Due before the
        # write: a burst's commit inside it makes this record visible, and the table
        # must name it in that same commit. A reader lapped in between jumps past the
        # record and asks for the range up to the table's seq; one short of it, the
        # last message of a burst was never asked for, and the room waited for it.
        self._seqs_due[room] = seq
        durable = self.durable
        if durable is not None:
            durable.sequenced(room, seq, p.timestamp / 1000, p.key, json, self.writer.tail)
        self._write(
            _ROOM_MSG,
            # 1: the owner answers the forward once stored (FORWARD_SEEN), not this
            int(durable is not None),
            records.encode_room_message(room, seq, p.publish_ns, p.msg_id, json, p.key),
        )
        self.stats[_S_SEQUENCED] += 1
        if log.isEnabledFor(logging.DEBUG):  # once per message: no fields made for nothing
            log_event(log, logging.DEBUG, "sequenced", room=room, msg=p.msg_id, seq=seq)
        assert self.listener is not None
        self.listener.on_message(room, seq, p.msg_id, json, p.publish_ns)
        return seq

    def _on_forward(self, peer: int, aux: int, payload: bytes) -> None:
        if aux != self.shard_id:
            return
        publication = records.decode_forward(payload)
        sequencer = self.sequencer
        seen = sequencer.seen(publication.msg_id) or sequencer.seen_key(
            publication.key, self._now_ns
        )
        durable = self.durable
        if seen is None and durable is not None and durable.full:
            answer = records.ForwardSeen(publication.msg_id, publication.room, 0)
            self._write(_FORWARD_SEEN, peer, records.encode_forward_seen(answer))
            return
        if seen is None:
            seq = self._sequence(publication)
            if durable is not None:
                durable.ack_peer(peer, publication.msg_id, publication.room, seq)
            return  # else its ROOM_MSG answers the peer
        room, seq = seen
        if durable is not None:
            durable.ack_peer(peer, publication.msg_id, room, seq)  # once stored
            return
        answer = records.ForwardSeen(publication.msg_id, room, seq)
        self._write(_FORWARD_SEEN, peer, records.encode_forward_seen(answer))

    def _on_forward_seen(self, peer: int, aux: int, payload: bytes) -> None:
        if aux != self.shard_id:
            return
        seen = records.decode_forward_seen(payload)
        if self.forwarder.answered(seen.msg_id):
            assert self.listener is not None
            if seen.seq:
                self.listener.on_published(seen.msg_id, seen.room, seen.seq)
            else:  # the owner's store could not write it: not published
                self.listener.on_publish_failed(seen.msg_id, seen.room)

    def _on_room_message(self, peer: int, aux: int, payload: bytes) -> None:
        msg = records.decode_room_message(payload)
        listener = self.listener
        assert listener is not None
        if not aux and self.forwarder.pending and self.forwarder.answered(msg.msg_id):
            # In the owner's ring is kept; an owner with a store (aux 1, its
            # acks wait for it) says when it is stored (FORWARD_SEEN).
            listener.on_published(msg.msg_id, msg.room, msg.seq)
        listener.on_message(msg.room, msg.seq, msg.msg_id, msg.json, msg.publish_ns)
