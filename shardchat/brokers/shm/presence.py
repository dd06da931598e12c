"""The shm broker's presence: announcements, the holders' events, queries and answers.

A room's presence is held by its owner and one replica
(:mod:`~shardchat.brokers.presence_holders`); the other shards ask them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from shardchat.brokers.presence_holders import Event
from shardchat.brokers.shm.state import (
    _ANSWER,
    _EVENT,
    _PRESENCE,
    _QUERY,
    _SNAPSHOT,
    ShmState,
)
from shardchat.core.broker import PresenceAnswer
from shardchat.logs import log_event
from shardchat.ring import records

__all__ = ["Presence"]

log = logging.getLogger(__name__)


class Presence(ShmState):
    """Presence through the rings."""

    __slots__ = ()

    def announce(self, room: str, user: str, joined: bool, info: str | None = None) -> None:
        presence = records.Presence(room, user, joined, info)
        self._write(_PRESENCE, 0, records.encode_presence(presence))
        self._emit(self.holders.announce(self.shard_id, room, user, joined, info))

    def presence(
        self,
        room: str,
        user: str,
        limit: int,
        then: Callable[[PresenceAnswer | None], None],
    ) -> PresenceAnswer | None:
        holders = self.holders
        if holders.holds(room):
            answer = holders.answer(room, user, limit, self._answer_budget(room))
            if answer is None:  # our view is being rebuilt: answered once it is
                self._local_waiting.append((room, user, limit, then))
            return answer
        qid, target = self.queries.ask(room, user, limit, self._now_ns / 1e9)
        self._asked[qid] = then
        self._write(
            _QUERY,
            target,
            records.encode_presence_query(records.PresenceQuery(qid, room, user, limit)),
        )
        return None

    def _answer_budget(self, room: str) -> int:
        """Bytes of names an answer may carry: the record must fit the ring."""
        return self._max_payload - 128 - len(room.encode())

    def snapshot(self, peer: int, pairs: list[tuple[str, str]]) -> None:
        self._pairs(_SNAPSHOT, peer, pairs)

    def _pairs(self, kind: int, peer: int, pairs: list[tuple[str, str]]) -> None:
        """(room, user) pairs for ``peer`` in chunks that fit a record, then an
        empty chunk: the end."""
        chunk: list[tuple[str, str]] = []
        size = 0
        for pair in pairs:
            chunk.append(pair)
            size += len(pair[0]) + len(pair[1]) + 8
            if size > self._max_payload // 2:
                self._write(kind, peer, records.encode_snapshot(chunk))
                chunk, size = [], 0
        if chunk:
            self._write(kind, peer, records.encode_snapshot(chunk))
        self._write(kind, peer, records.encode_snapshot([]))

    def _emit(self, events: list[Event]) -> None:
        """Our view's events (we own the rooms): in our ring for every peer, and to
        our engine now. Then what waited for a rebuilt view is answered."""
        if events:
            listener = self.listener
            assert listener is not None
            occupancy = self.occupancy
            for e in events:
                record = records.PresenceEvent(e.room, e.user, e.joined, e.total)
                self._write(_EVENT, 0, records.encode_presence_event(record))
                listener.on_presence_event(e.room, e.user, e.joined, e.total)
                # The owner alone emits events: the room's first user in, its last out.
                if occupancy is not None and (e.total == 0 or (e.joined and e.total == 1)):
                    occupancy(e.room, e.user, e.joined)
        if self.holders.ready and (self._waiting_view or self._local_waiting):
            waiting, self._waiting_view = self._waiting_view, []
            for peer, qid, room, user, limit in waiting:
                self._answer(peer, qid, room, user, limit)
            local, self._local_waiting = self._local_waiting, []
            for room, user, limit, then in local:
                then(self.holders.answer(room, user, limit, self._answer_budget(room)))

    def _answer(self, peer: int, qid: int, room: str, user: str, limit: int) -> None:
        answer = self.holders.answer(room, user, limit, self._answer_budget(room))
        if answer is None:
            self._waiting_view.append((peer, qid, room, user, limit))
            return
        self._write(_ANSWER, peer, records.encode_presence_answer(qid, answer))

    def _on_presence_event(self, peer: int, aux: int, payload: bytes) -> None:
        e = records.decode_presence_event(payload)
        self.holders.event(peer, e.room, e.user, e.joined)
        assert self.listener is not None
        self.listener.on_presence_event(e.room, e.user, e.joined, e.count)

    def _on_told(self, peer: int, aux: int, payload: bytes) -> None:
        if aux == self.shard_id:
            self._emit(self.holders.told_chunk(peer, records.decode_snapshot(payload)))

    def _on_query(self, peer: int, aux: int, payload: bytes) -> None:
        if aux == self.shard_id:
            q = records.decode_presence_query(payload)
            self._answer(peer, q.qid, q.room, q.user, q.limit)

    def _on_answer(self, peer: int, aux: int, payload: bytes) -> None:
        if aux != self.shard_id:
            return
        qid, answer = records.decode_presence_answer(payload)
        if self.queries.answered(qid):  # the first answer; a second holder's is dropped
            self._asked.pop(qid)(answer)

    def _ask_again(self, asks: list[tuple[int, int, str, str, int]]) -> None:
        for qid, target, room, user, limit in asks:
            query = records.PresenceQuery(qid, room, user, limit)
            self._write(_QUERY, target, records.encode_presence_query(query))

    def _on_presence(self, peer: int, aux: int, payload: bytes) -> None:
        p = records.decode_presence(payload)
        self._emit(self.holders.announce(peer, p.room, p.user, p.joined, p.info))

    def _on_snapshot(self, peer: int, aux: int, payload: bytes) -> None:
        if aux == self.shard_id:
            self._emit(self.holders.snapshot(peer, records.decode_snapshot(payload)))

    def _tick_presence(self, now: float) -> float | None:
        """Queries the owner did not answer go to the replica, and fail after
        ``delivery.publish_timeout``; a rebuild waits for silent peers only so long."""
        holders = self.holders
        if not holders.ready and now >= self._rebuild_until:
            log_event(
                log, logging.WARNING, "presence_rebuild_timeout",
                peers=sorted(holders.waiting | holders.waiting_told),
            )  # fmt: skip
            self._emit(holders.give_up())
        queries = self.queries
        if queries.pending:
            again, failed = queries.due(now)
            self._ask_again([(q, p.target, p.room, p.user, p.limit) for q, p in again])
            for qid in failed:
                log_event(log, logging.WARNING, "presence_query_failed", query=qid)
                self._asked.pop(qid)(None)
        deadline = queries.next_deadline()
        if not holders.ready and (deadline is None or self._rebuild_until < deadline):
            return self._rebuild_until
        return deadline
