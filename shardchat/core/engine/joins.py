"""A join's stages: one :class:`PendingJoin` per join in flight, its stage explicit.

A ``join`` can wait on its broker three times before it is answered, in this
order (each stage is skipped when the broker has what it needs at once):

1. ``OPENING``: a broker that carries only the rooms it is asked for (Redis)
   subscribes and loads the room's state at the room's first join here, or
   again after it lost its store for a while (``Broker.open_room``);
2. ``FETCHING``: the room's history is fetched back (a room this engine
   dropped, or a resume past what it holds) or its gap filled, so that
   ``since`` and a later ``history`` are answered from everything the server
   holds (``GapFill.ensure_history``);
3. ``ASKING``: the room's presence holder is asked who is in it, for
   ``limits.room_size`` and ``joined.users`` (``Broker.presence``).

Then it is ``DONE``: answered with ``joined`` or refused. A join named in
the upgrade's query (``?room=``) waits ``ADMITTED`` until the connection
opens. Each wait ends with an input queued in the engine's inbox (never a
call from inside the broker) that names the :class:`PendingJoin`, which
carries the join on from its stage. Meanwhile the connection's other
requests wait behind its joins (``ConnState.deferred``), so that a message
sent right after a join is taken as a member's; they are taken at the end of
the turn in which its last join ended (``RoomEngine.take_deferred``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from shardchat.core.broker import Holding, PresenceAnswer
from shardchat.core.errors import ErrorCode, ProtocolError
from shardchat.core.messages import (
    Join,
)
from shardchat.core.outputs import C, Paced

if TYPE_CHECKING:
    pass
from shardchat.core.engine.deliveries import Deliveries
from shardchat.core.engine.state import (
    S_JOINS,
    S_ROOMS,
    ConnState,
    JoinStage,
    PendingJoin,
    presence_unavailable,
)


class Joins(Deliveries[C]):
    """The joins' part of the engine: a join's stages, one after another."""

    __slots__ = ()

    def _join(self, conn: C, state: ConnState, request: Join) -> None:
        pending = PendingJoin(conn, request)
        state.joins += (pending,)
        self._start_join(pending, state)

    def _start_join(self, pending: PendingJoin[C], state: ConnState) -> None:
        """ADMITTED -> OPENING: a broker that carries only the rooms it is asked for
        (Redis) subscribes and loads the room's state first."""
        try:
            self._check_allowed(state, pending.request.room, pending.request.id)
            pending.stage = JoinStage.OPENING
            if self.broker.open_room(pending.request.room, self.inbox.later(self._resume, pending)):
                self._fetch_for_join(pending)
        except ProtocolError as exc:
            self._refuse(pending.conn, state, exc)
            self._join_done(pending, state)

    def _resume(self, pending: PendingJoin[C], answer: PresenceAnswer | None = None) -> None:
        """Input (queued in the inbox): what a join waited on at its stage came."""
        state = self.conns.get(pending.conn)
        if state is None or pending.stage is JoinStage.DONE:
            self._unpin_join(pending)
            return  # gone, or ended, while its broker worked
        try:
            if pending.stage is JoinStage.OPENING:
                self._fetch_for_join(pending)
            elif pending.stage is JoinStage.FETCHING:
                self._fetch_older(pending)
            elif pending.stage is JoinStage.ASKING:
                self._join_answered(pending, state, answer)
        except ProtocolError as exc:
            self._refuse(pending.conn, state, exc)
            self._join_done(pending, state)

    def _fetch_for_join(self, pending: PendingJoin[C]) -> None:
        """OPENING -> FETCHING: a room this engine dropped (idle, no members here) is
        fetched back first, so that `since`, and a later `history`, are answered
        from everything the server holds (a join without `since` asks from 0)."""
        pending.stage = JoinStage.FETCHING
        request = pending.request
        since = 0 if request.since is None else request.since
        self._drop_partial(request.room)
        then = self.inbox.later(self._resume, pending)
        if self.gaps.ensure_history(request.room, since, self.now, then):
            self._fetch_older(pending)

    def _fetch_older(self, pending: PendingJoin[C]) -> None:
        """Still FETCHING: a resume from before the oldest message the log holds
        (with a store, engines keep only the recent part in memory) has the
        seqs between fetched from the room's holder, within the retention, so
        that it is answered ``recovered`` with every message, never cut short."""
        request = pending.request
        room, since = request.room, request.since
        log_ = self.logs.get(room)
        if (
            since is not None
            and pending.older is None
            and log_ is not None
            and request.epoch in (None, log_.epoch)
            and self.broker.holding(room) is not Holding.EVERY
        ):
            first = max(since + 1, log_.seq - self.history + 1)
            last = min(log_.seq, log_.oldest_seq - 1)
            if first <= last:
                pending.older = {}
                # The log holds everything from its oldest on until the join is
                # answered: the messages that come meanwhile (many, at a fast
                # room's rate) neither roll the fetched range's end away nor are
                # fetched again.
                pending.pinned = True
                self._pin(room)
                then = self.inbox.later(self._older_fetched, pending)
                self.fetches.fetch(room, first, last, self.now, then)
                return
        self._ask_for_join(pending)

    def _older_fetched(self, pending: PendingJoin[C], fetched: dict[int, bytes]) -> None:
        """Input (queued in the inbox): the older messages a resume needs came
        (or the wait for them ran out: the replay is then not ``recovered``)."""
        state = self.conns.get(pending.conn)
        if state is None or pending.stage is not JoinStage.FETCHING:
            self._unpin_join(pending)
            return
        pending.older = fetched
        try:
            self._ask_for_join(pending)
        except ProtocolError as exc:
            self._refuse(pending.conn, state, exc)
            self._join_done(pending, state)

    def _ask_for_join(self, pending: PendingJoin[C]) -> None:
        """FETCHING -> ASKING: the room's history is here: ask who is in it (for
        ``limits.room_size`` and ``joined.users``), from the latest state."""
        pending.stage = JoinStage.ASKING
        state = self.conns[pending.conn]
        # Catch up and deliver what is queued: the joiner's live frames start
        # right after the log's current seq, and a holder answers from the latest.
        self._catch_up()
        answer = self.broker.presence(
            pending.request.room,
            state.user,
            self.config.presence.list_limit,
            self.inbox.later(self._resume, pending),
        )
        if answer is not None:
            self._join_answered(pending, state, answer)

    def _join_answered(
        self, pending: PendingJoin[C], state: ConnState, answer: PresenceAnswer | None
    ) -> None:
        """ASKING -> DONE: the room's users, as its presence holder knows them: the
        joiner becomes a member now, with nothing read in between, so that it
        hears every event after the answer and none before."""
        conn, request = pending.conn, pending.request
        room = request.room
        room_size = self.config.limits.room_size
        if answer is None:
            self._refuse(conn, state, presence_unavailable(room, request.id))
        elif room_size and room not in state.rooms and not answer.has and answer.total >= room_size:
            # Joins on several shards at the same instant can still overshoot by a few.
            error = ProtocolError(
                ErrorCode.ROOM_FULL, f"room {room} has {room_size} users", request.id
            )
            self._refuse(conn, state, error)
        else:
            self._finish_join(conn, state, request, answer, pending.older)
        self._join_done(pending, state)

    def _join_done(self, pending: PendingJoin[C], state: ConnState) -> None:
        """A join ended (answered or refused). Once none is in flight, what the
        connection sent meanwhile is taken at the end of the turn
        (:meth:`take_deferred`): not here, and not by recursion (a replayed join
        can end at once)."""
        pending.stage = JoinStage.DONE
        self._unpin_join(pending)
        state.joins = tuple(p for p in state.joins if p is not pending)
        if not state.joins and state.deferred:
            self._ready.append(pending.conn)

    def _unpin_join(self, pending: PendingJoin[C]) -> None:
        """The join no longer needs its room's log held whole."""
        if pending.pinned:
            pending.pinned = False
            self._unpin(pending.request.room)

    def _finish_join(
        self,
        conn: C,
        state: ConnState,
        request: Join,
        answer: PresenceAnswer,
        older: dict[int, bytes] | None = None,
    ) -> None:
        room = request.room
        if room in state.rooms:
            self._leave_room(conn, state, room)
        else:
            state.rooms += (room,)
            if "join" in self.hook_kinds:
                self._event("join", state, room, None)
        self._out += self.fanout.flush(self.now, snapshot=True)
        log_ = self._log(room)
        self.members.setdefault(room, {})[conn] = None
        self.counters[S_JOINS] += 1
        self.counters[S_ROOMS] = len(self.members)
        user = state.user
        info = state.presence_info
        # A later connection's info is announced too: the latest join's wins.
        if self.presence.local_join(room, user) or info is not None:
            self.broker.announce(room, user, True, info)
        count, users = self._with_local(room, answer, user)
        joined: dict[str, object] = {
            "type": "joined",
            "room": room,
            "seq": log_.seq,
            "epoch": log_.epoch,
            "count": count,
            "users": users,
        }
        infos = self._info_map(room, answer, users)
        if infos:
            joined["info"] = infos
        if request.since is None:
            self._reply(conn, joined)
            return
        replay = log_.replay(request.since, request.epoch, older)
        messages = self._unexpired(replay.messages)
        # An expired message after `since` was not recovered.
        joined["recovered"] = replay.recovered and len(messages) == len(replay.messages)
        self._reply(conn, joined)
        if messages:
            self._out.append(((conn,), Paced([held.payload for held in messages])))
