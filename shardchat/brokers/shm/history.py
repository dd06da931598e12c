"""The shm broker's fills: a missed range asked of the room's owner, and answered.

The owner resends one chunk of at most 1/8 of a ring per request, so that a
resend cannot lap the shard that asked (it asks for the next).
"""

from __future__ import annotations

import logging

from shardchat.brokers.sequencer import owner_of, plan_resend
from shardchat.brokers.shm.state import (
    _HISTORY_REQ,
    _REPLAY,
    ShmState,
)
from shardchat.core.broker import Holding
from shardchat.ring import records
from shardchat.ring.records import REPLAY_END, REPLAY_SKIP

__all__ = ["History"]

log = logging.getLogger(__name__)


class History(ShmState):
    """Fills of missed ranges, asked and answered."""

    __slots__ = ()

    def fill(self, room: str, first: int, last: int) -> None:
        owner = owner_of(room, self.workers)
        if owner == self.shard_id:
            # We are the owner: nobody holds more than we do (our store, if we
            # have one). Answered outside the engine's call: from the store at
            # this turn's commit (a chunk a turn, so that a long range does not
            # hold the loop), or at the next read.
            if self.durable is not None:
                self._fills_due.append((room, first, last))
            else:
                self._answers_due.append((room, last))
            return
        request = records.HistoryRequest(room, first, last)
        self._write(_HISTORY_REQ, owner, records.encode_history_request(request))

    def _answer_own_fills(self) -> None:
        """Our own rooms' fills, a chunk each (``FILL_LIMIT``), from the store and
        what it is still writing: the end of a chunk asks for the next."""
        durable, listener = self.durable, self.listener
        assert durable is not None and listener is not None
        fills, self._fills_due = self._fills_due, []
        for room, first, last in fills:
            plan = plan_resend(durable.held(room, first, last), first, last, 1 << 30)
            if plan.lost_to:
                listener.on_replay_lost(room, plan.lost_to)
            for message in plan.messages:
                listener.on_replay(room, message.seq, message.payload)
            if plan.end is not None:
                listener.on_replay_end(room, plan.end)

    def latest_seq(self, room: str) -> int | None:
        return self.tables[owner_of(room, self.workers)].lookup(room)

    def serves_history(self, room: str) -> bool:
        # With a store, the store serves the owner's rooms' fills: its copy may go.
        return self.durable is None and owner_of(room, self.workers) == self.shard_id

    def holding(self, room: str) -> Holding:
        # With a store the owner keeps the recent part once for the box; the
        # others a tail, since the owner answers their fills from memory or store.
        if self.durable is None:
            return Holding.EVERY
        return Holding.HERE if owner_of(room, self.workers) == self.shard_id else Holding.ELSEWHERE

    def _on_history_request(self, peer: int, aux: int, payload: bytes) -> None:
        """Resend one chunk of the asked range: at most 1/8 of a ring, so that a
        resend cannot lap the shard that asked (it asks for the next)."""
        if aux != self.shard_id:
            return
        req = records.decode_history_request(payload)
        assert self.listener is not None
        if self.durable is not None:
            held = self.durable.held(req.room, req.first, req.last)
        else:
            held = self.listener.held(req.room, req.first)
        plan = plan_resend(held, req.first, req.last, self._max_payload)
        room, write = req.room, self._write
        if plan.lost_to:
            write(
                _REPLAY, peer, records.encode_room_message(room, plan.lost_to, 0, REPLAY_SKIP, b"")
            )
        for message in plan.messages:
            write(
                _REPLAY,
                peer,
                records.encode_room_message(room, message.seq, 0, "", message.payload),
            )
        if plan.end is not None:
            write(_REPLAY, peer, records.encode_room_message(room, plan.end, 0, REPLAY_END, b""))

    def _on_replay(self, peer: int, aux: int, payload: bytes) -> None:
        if aux != self.shard_id:
            return
        msg = records.decode_room_message(payload)
        listener = self.listener
        assert listener is not None
        if msg.json:
            listener.on_replay(msg.room, msg.seq, msg.json)
        elif msg.msg_id == REPLAY_SKIP:
            listener.on_replay_lost(msg.room, msg.seq)
        else:
            listener.on_replay_end(msg.room, msg.seq)
