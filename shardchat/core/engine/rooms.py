"""A shard's rooms: their logs, members leaving, idle eviction, the timer, the flush."""

from __future__ import annotations

import heapq
from typing import TYPE_CHECKING

import orjson

from shardchat.core.broker import PresenceAnswer
from shardchat.core.counters import (
    latency_slot,
)
from shardchat.core.interfaces import (
    INFO,
)
from shardchat.core.messages import (
    AppCloseCode,
)
from shardchat.core.outputs import C, Close, Output
from shardchat.core.roomlog import HeldMessage, RoomLog

if TYPE_CHECKING:
    pass
from shardchat.core.engine.state import (
    EVICT_EVERY,
    S_LATENCY_COUNT,
    S_LATENCY_SUM,
    S_LEAVES,
    S_ROOMS,
    ConnState,
    EngineState,
)


class Rooms(EngineState[C]):
    """The rooms' part of the engine."""

    __slots__ = ()

    def _log(self, room: str) -> RoomLog:
        log_ = self.logs.get(room)
        if log_ is None:
            seq = self.broker.latest_seq(room) or 0
            log_ = self.logs[room] = RoomLog(self._epoch(room), self._capacity(room), seq)
        log_.touched = self.now
        return log_

    def _pin(self, room: str) -> None:
        """Hold ``room``'s log whole (up to ``delivery.history``) from now on, while
        an answer fetches the seqs before it: what comes meanwhile stays."""
        self.pins[room] = self.pins.get(room, 0) + 1
        log_ = self.logs.get(room)
        if log_ is not None:
            log_.resize(max(log_.capacity, self.history))

    def _unpin(self, room: str) -> None:
        """One answer less needs ``room``'s log whole: the last gives it its size back."""
        left = self.pins.pop(room, 1) - 1
        if left:
            self.pins[room] = left
            return
        log_ = self.logs.get(room)
        if log_ is not None:
            log_.resize(self._capacity(room))

    def _drop_partial(self, room: str) -> None:
        """Drop a log made from live messages alone (the room had no members here
        when they came: after a restart, or once dropped as idle), which lacks the
        older history its broker holds, so that a join or ``history`` fetches it
        whole. Never one with members, a gap or resends, nor the one its broker
        fills from."""
        log_ = self.logs.get(room)
        if (
            log_ is None
            or len(log_) >= min(log_.capacity, log_.seq)
            or room in self.members
            or room in self.gaps.parked
            or room in self.reliable.rooms
            or room in self.pins
            or self.broker.serves_history(room)
        ):
            return
        del self.logs[room]

    def _epoch(self, room: str) -> str:
        return self.broker.epoch_of(room) or self.epoch

    def _latency(self, ns: int) -> None:
        """Publish-to-delivery time of one message, into the histogram."""
        counters = self.counters
        counters[latency_slot(ns / 1e6)] += 1
        counters[S_LATENCY_COUNT] += 1
        counters[S_LATENCY_SUM] += max(0, ns // 1000)

    def _evict_idle(self) -> None:
        """Drop the logs of rooms this engine has no members of, has not used for
        ``delivery.room_idle`` and whose history its broker can fetch back: every
        engine's memory stays with the rooms in use."""
        now = self.now
        idle = self.config.delivery.room_idle
        busy = self.members.keys() | self.gaps.parked.keys() | self.reliable.rooms.keys()
        busy |= self.pins.keys()
        serves = self.broker.serves_history
        dropped = [
            room
            for room, log_ in self.logs.items()
            if now - log_.touched >= idle and room not in busy and not serves(room)
        ]
        for room in dropped:
            del self.logs[room]
        if dropped:
            self.log.event(INFO, "rooms_dropped", count=len(dropped), kept=len(self.logs))

    def _leave_room(self, conn: C, state: ConnState, room: str) -> None:
        self.reliable.forget(conn, room)
        members = self.members.get(room)
        if members is not None and conn in members:
            del members[conn]
            if not members:
                del self.members[room]
                self.broker.close_room(room)
            self.counters[S_LEAVES] += 1
            self.counters[S_ROOMS] = len(self.members)
        user = state.user
        if self.presence.local_leave(room, user):
            self.broker.announce(room, user, False)

    def _info_map(
        self, room: str, answer: PresenceAnswer, users: list[str]
    ) -> dict[str, object] | None:
        """PROTOCOL.md, Extensions, "Presence info": the listed users' info, from
        the answer, and for our own users it lacks (``_with_local`` added them),
        from their connections here (the latest join's: members are in join order)."""
        said = dict(answer.info) if answer.info else {}
        added = users[len(answer.users) :]
        if added:
            wanted = set(added) - said.keys()
            for conn in self.members.get(room, ()) if wanted else ():
                state = self.conns.get(conn)
                if state is not None and state.user in wanted and state.presence_info:
                    said[state.user] = state.presence_info
        if not said:
            return None
        return {user: orjson.loads(said[user]) for user in users if user in said}

    def _with_local(self, room: str, answer: PresenceAnswer, asker: str) -> tuple[int, list[str]]:
        """The answer's count and users, with this shard's own users of the room
        that it lacks. An answer can predate their announcements: a replica answers
        with what members were told, which follows the owner's events, and an
        owner's answer can cross an announcement on its way. So a client always
        sees itself, and the users of its shard, in ``joined`` and ``presence``."""
        count, users = answer.total, answer.users
        local = self.presence.local.get(room)
        if not local:
            return count, users
        limit = self.config.presence.list_limit
        if answer.truncated:
            # Not every name is listed, so only the asker can be told apart.
            missing = [] if answer.has or asker not in local else [asker]
        else:
            listed = set(users)
            missing = [name for name in local if name not in listed]
        if missing:
            count += len(missing)
            users = [*users, *missing[: max(0, limit - len(users))]]
        return count, users

    def flush(self) -> list[Output[C]]:
        """The end of the caller's loop turn (``turn.end_turn``): each room's queued
        frames, joined once, for its local members. The caller writes them at
        once (the member dicts are live)."""
        return self.fanout.flush(self.now)

    def tick(self) -> float | None:
        """Input: resends, gap deadlines and idle rooms, at the time of the last
        :meth:`advance`; returns the next time a tick is needed (None: no
        deadline of the engine's own)."""
        self.deliver()
        now = self.now
        deadline: float | None = None
        if self.reliable.rooms:
            out, deadline = self.reliable.resend_due(now, self.logs)
            self._out += out
        expiries = self._expiries
        if len(expiries) > 2 * self.open_count + 1024:
            # Closed connections wait in the heap until their exp: drop them now and then.
            conns = self.conns
            expiries[:] = [entry for entry in expiries if entry[2] in conns]
            heapq.heapify(expiries)
        while expiries and expiries[0][0] <= self.wall:
            _, _, conn = heapq.heappop(expiries)
            state = self.conns.get(conn)
            if state is not None and state.opened:
                # An extension of PROTOCOL.md: reconnect with a fresh token.
                self._out.append(((conn,), Close(AppCloseCode.TOKEN_EXPIRED, "token expired")))
        idle = self.config.delivery.room_idle
        if idle and now >= self._next_evict:
            if self._next_evict:
                self._evict_idle()
            # The first tick only sets the clock: what was restored at start-up is
            # as fresh as the engine.
            self._next_evict = now + min(EVICT_EVERY, idle)
        if self.gaps.parked:
            self.gaps.sweep(now)
            gap = self.gaps.next_deadline()
            if gap is not None and (deadline is None or gap < deadline):
                deadline = gap
        if self.fetches.pending:
            self.fetches.sweep(now)
            fetch = self.fetches.next_deadline()
            if fetch is not None and (deadline is None or fetch < deadline):
                deadline = fetch
        return deadline

    def room_members(self, room: str) -> list[str]:
        """Read: the users of this shard's members of ``room``, once each."""
        return list(self.presence.local.get(room, ()))

    def room_messages(
        self,
        room: str,
        since: int | None = None,
        before: int | None = None,
        limit: int | None = None,
    ) -> list[HeldMessage]:
        """Read: the messages this shard holds of ``room``, as ``history`` pages
        them (``since``/``before`` exclusive; ``limit`` at most)."""
        log_ = self.logs.get(room)
        return [] if log_ is None else log_.page(since, before, limit)
