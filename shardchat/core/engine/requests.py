"""A connection's requests: taken now or behind its joins, and each type's handler."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from shardchat.core import wire
from shardchat.core.broker import PresenceAnswer, Publication, idempotency_key
from shardchat.core.counters import (
    overload_slot,
)
from shardchat.core.errors import ErrorCode, ProtocolError, Reject
from shardchat.core.hookevents import ProxiedPublish, Verdict
from shardchat.core.interfaces import (
    DEBUG,
)
from shardchat.core.messages import (
    Ack,
    ClientMessage,
    HistoryQuery,
    Join,
    Leave,
    Ping,
    PresenceQuery,
    Publish,
    RoomId,
)
from shardchat.core.outputs import C, Paced
from shardchat.core.overload import Queue, overloaded
from shardchat.core.roomlog import HeldMessage, RoomLog

if TYPE_CHECKING:
    pass
from shardchat.core.engine.commands import Command
from shardchat.core.engine.joins import Joins
from shardchat.core.engine.state import (
    MAX_DEFERRED,
    S_PUBLISHED,
    S_RATE_LIMITED,
    ConnState,
    presence_unavailable,
)

_new = tuple.__new__  # a NamedTuple made directly (its __new__ is 3x slower)


class Requests(Joins[C]):
    """The requests' part of the engine."""

    __slots__ = ()

    def _request(self, conn: C, state: ConnState, request: ClientMessage) -> None:
        """A request, taken now or, behind the connection's joins, later; a ping
        is answered at once (liveness does not wait for a join)."""
        if state.joins and type(request) is not Ping:
            self._defer(conn, state, request)
        else:
            self._take(conn, state, request)

    def _take(self, conn: C, state: ConnState, request: ClientMessage) -> None:
        try:
            # The token's rooms claim covers every request that names a room.
            if state.allowed_rooms is not None and not isinstance(request, Ping):
                self._check_allowed(state, request.room, request.id)
            _HANDLERS[type(request)](self, conn, state, request)
        except ProtocolError as exc:
            self._refuse(conn, state, exc)
        else:
            state.errors = 0

    def _defer(self, conn: C, state: ConnState, request: ClientMessage) -> None:
        deferred = state.deferred
        if deferred is None:
            deferred = state.deferred = []
        if len(deferred) >= MAX_DEFERRED:
            # Bounded: a client that floods while its join waits is refused, as the
            # rate limit would refuse it.
            reason = "too many requests while a join is in progress"
            self._refuse(conn, state, ProtocolError(ErrorCode.RATE_LIMITED, reason, request.id))
            return
        deferred.append(request)

    def take_deferred(self) -> None:
        """Input, at the end of the turn, before the broker commits: the requests that
        waited for their connection's joins, in order, until a join waits again
        (the rest then waits for it). Their publishes are committed with the turn,
        so that no frame or ack of theirs leaves before its record is kept."""
        self.deliver()
        ready, self._ready = self._ready, []
        for conn in ready:
            state = self.conns.get(conn)
            if state is None:
                continue  # closed since its join ended
            while not state.joins and state.deferred:
                self._take(conn, state, state.deferred.pop(0))
            if not state.joins:
                state.deferred = None

    def _publish(self, conn: C, state: ConnState, request: Publish) -> None:
        room = request.room
        if room not in state.rooms:  # _require_member, inline: once per publish
            self._require_member(state, room, request.id)
        # Admission control before anything is spent on it (a rate token, a hook).
        # Once per publish: the common case (no queue full, no proxy) asks the
        # broker itself when no command waits to be handed over (CommandQueue.full).
        queued = self.broker
        if (
            (queued.full(room) if queued.commands else queued.broker.full(room)) is not None
            or self.fanout.turn_bytes > self.config.overload.turn_bytes
            or self.publish_proxy
        ):
            self._check_overload(room, request.id, proxied=True)
        limits = self.config.limits
        if not state.bucket.take(self.now, limits.rate, limits.burst):
            self.counters[S_RATE_LIMITED] += 1
            raise ProtocolError(ErrorCode.RATE_LIMITED, "too many messages; slow down", request.id)
        content = request.content
        if self.hooks.has_message and state.info is not None:
            try:
                content = self.hooks.on_message(state.info, room, content)
            except Reject as exc:
                raise ProtocolError(ErrorCode.REJECTED, exc.reason, request.id) from None
            finally:
                self._count_hook_errors()
            if len(content.encode()) > limits.max_content:
                raise ProtocolError(
                    ErrorCode.TOO_LARGE, f"content is over {limits.max_content} bytes", request.id
                )
        if self.publish_proxy:
            # The backend sees it first (proxy.publish_url): the caller sends the
            # turn's publishes in one request and hands the verdicts back.
            self._proxied.append(
                ProxiedPublish(conn, request.id, request.key, room, state.user, content)
            )
            self.proxy_waiting += 1
            return
        self._publish_for(conn, state, room, content, request.id, request.key)

    def overloaded(self, room: str) -> ProtocolError | None:
        """Read: the ``overloaded`` refusal a publish to ``room`` would get now, or
        None (not counted: for a caller that counts its own refusals)."""
        full = self._full(room, proxied=False)
        return None if full is None else overloaded(full, self.config.overload.retry_after, None)

    def _check_overload(self, room: str, request_id: str | None, proxied: bool = False) -> None:
        """Refuse ``overloaded`` (counted) when a bounded queue a publish would wait
        in is full."""
        full = self._full(room, proxied)
        if full is not None:
            self.counters[overload_slot(full)] += 1
            raise overloaded(full, self.config.overload.retry_after, request_id)

    def _full(self, room: str, proxied: bool) -> Queue | None:
        """The full queue a publish to ``room`` would wait in (``proxied``: a client's
        publish, which waits for the publish proxy too), or None."""
        overload = self.config.overload
        full = self.broker.full(room)
        if full is None and self.fanout.turn_bytes > overload.turn_bytes:
            full = Queue.TURN
        if full is None and proxied and self.publish_proxy:
            if self.proxy_waiting >= overload.proxy:
                full = Queue.PROXY
        return full

    def publish_answered(
        self, items: list[ProxiedPublish[C]], verdicts: list[Verdict] | None, reason: str = ""
    ) -> None:
        """Input: the publish proxy's verdicts on ``items``, in order; None: it did
        not answer (each sender gets ``unavailable`` with ``reason``, nothing is
        sequenced)."""
        self.deliver()
        max_content = self.config.limits.max_content
        self.proxy_waiting -= len(items)
        for i, item in enumerate(items):
            conn = item.conn
            state = self.conns.get(conn)
            if state is None:
                continue  # gone meanwhile
            try:
                if verdicts is None:
                    raise ProtocolError(ErrorCode.UNAVAILABLE, reason, item.request_id)
                verdict = verdicts[i]
                if verdict.reject is not None:
                    raise ProtocolError(ErrorCode.REJECTED, verdict.reject, item.request_id)
                content = item.content if verdict.content is None else verdict.content
                if len(content.encode()) > max_content:
                    raise ProtocolError(
                        ErrorCode.TOO_LARGE,
                        f"content is over {max_content} bytes",
                        item.request_id,
                    )
                room = RoomId(item.room)
                self._publish_for(conn, state, room, content, item.request_id, item.key)
            except ProtocolError as exc:
                self._refuse(conn, state, exc)

    def _publish_for(
        self,
        conn: C,
        state: ConnState,
        room: RoomId,
        content: str,
        request_id: str | None,
        key: str | None,
    ) -> None:
        """A connection's publish, accepted: to the broker, its ack awaited."""
        msg_id = self._sequence(room, state.user, content, key)
        self._pending[msg_id] = (conn, request_id)
        if "message" in self.hook_kinds:
            self._pending_messages[msg_id] = (state.conn_id, state.user, content)
        if self.log.enabled(DEBUG):
            self.log.event(DEBUG, "publish", conn=state.conn_id, room=room, msg=msg_id)

    def _sequence(self, room: str, sender: str, content: str, key: str | None) -> str:
        """Hand a publication to the broker (as a command); returns its message id."""
        self.counters[S_PUBLISHED] += 1
        self._msg_counter += 1
        msg_id = self._msg_prefix + str(self._msg_counter)
        now = self.now
        # Made directly, as the Command below: once per message (a NamedTuple's
        # __new__ is a Python call); no key, no idempotency key.
        publication = _new(
            Publication,
            (
                msg_id,
                room,
                sender,
                content,
                int(self.wall * 1000),
                int(now * 1e9),
                "" if key is None else idempotency_key(sender, room, key),
            ),
        )
        # CommandQueue.publish, inline: once per message
        self.broker.commands.append(_new(Command, ("publish", (publication, now))))
        return msg_id

    def _leave(self, conn: C, state: ConnState, request: Leave) -> None:
        room = request.room
        self._require_member(state, room, request.id)
        state.rooms = tuple(r for r in state.rooms if r != room)
        self._leave_room(conn, state, room)
        if "leave" in self.hook_kinds:
            self._event("leave", state, room, {"reason": "leave"})
        self._reply(conn, {"type": "left", "room": room})

    def _ping(self, conn: C, state: ConnState, request: Ping) -> None:
        self._send(conn, wire.pong_payload(request.echo, request.id))

    def _presence(self, conn: C, state: ConnState, request: PresenceQuery) -> None:
        answer = self.broker.presence(
            request.room,
            state.user,
            self.config.presence.list_limit,
            self.inbox.later(self._presence_answered, conn, request),
        )
        if answer is not None:
            self._presence_answered(conn, request, answer)

    def _presence_answered(
        self, conn: C, request: PresenceQuery, answer: PresenceAnswer | None
    ) -> None:
        state = self.conns.get(conn)
        if state is None:
            return  # gone while its broker asked
        room = request.room
        if answer is None:
            self._refuse(conn, state, presence_unavailable(room, request.id))
            return
        count, users = self._with_local(room, answer, state.user)
        reply: dict[str, object] = {
            "type": "presence",
            "room": room,
            "count": count,
            "users": users,
        }
        if answer.truncated:
            reply["truncated"] = True
        infos = self._info_map(room, answer, users)
        if infos:
            reply["info"] = infos
        self._reply(conn, reply)

    def _history(self, conn: C, state: ConnState, request: HistoryQuery) -> None:
        # As for a join with `since`: a room this engine dropped is fetched back
        # first, so that `history` answers from everything the server holds.
        self._drop_partial(request.room)
        then = self.inbox.later(self._finish_history, conn, request)
        if self.gaps.ensure_history(request.room, 0, self.now, then):
            self._finish_history(conn, request)

    def _finish_history(
        self, conn: C, request: HistoryQuery, fetched: dict[int, bytes] | None = None
    ) -> None:
        """The answer, from the log and, for the seqs the log lacks (a range given
        up as a ``gap`` here, messages older than the log), what the room's holder
        sent back for this answer alone (``fetched``; historyfetch.py)."""
        self._history_reply(conn, request, fetched)
        if fetched is not None:
            self._unpin(request.room)  # held whole since the fetch, for the answer

    def _history_reply(
        self, conn: C, request: HistoryQuery, fetched: dict[int, bytes] | None
    ) -> None:
        if conn not in self.conns:
            return  # gone while the room's history was being fetched
        room = request.room
        self._catch_up()
        self._out += self.fanout.flush(self.now, snapshot=True)
        log_ = self.logs.get(room)
        if fetched is None and log_ is not None and room not in self.gaps.parked:
            # (A room still parked: its fill's wait ran out, the holder is not
            # answering; the answer is due now, PROTOCOL.md `gap`.)
            missing = self._missing(log_, request)
            if missing is not None:
                # The log holds what comes meanwhile: its part of the answer
                # (after the fetched seqs) must not roll away.
                self._pin(room)
                then = self.inbox.later(self._finish_history, conn, request)
                self.fetches.fetch(room, missing[0], missing[1], self.now, then)
                return
        held = [] if log_ is None else log_.page(request.since, request.before, request.limit)
        if fetched and log_ is not None:
            held = merged(log_, fetched, request)
        held = self._unexpired(held)
        if held:
            self._out.append(((conn,), Paced([message.payload for message in held])))
        last = held[-1].seq if held else request.since or 0
        self._reply(conn, {"type": "history_end", "room": room, "seq": last})

    def _missing(self, log_: RoomLog, request: HistoryQuery) -> tuple[int, int] | None:
        """The seqs the answer to ``request`` wants that ``log_`` lacks (all older
        than its oldest held message), at most the ``delivery.history`` a holder
        keeps; None when the log has them all."""
        if not self.history:
            return None
        since, before, limit = request.since, request.before, request.limit
        top = log_.seq if before is None else min(log_.seq, before - 1)
        count = self.history if limit is None else limit
        if since is not None and limit is not None:
            first, top = since + 1, min(top, since + limit)  # the oldest after `since`
        else:
            first = max(top - count + 1, 1 if since is None else since + 1)
        last = min(top, log_.oldest_seq - 1)
        return (first, last) if first <= last else None

    def _ack(self, conn: C, state: ConnState, request: Ack) -> None:
        """A client's cumulative ack; the first one puts it in reliable mode for the room.

        No flush here: an ack must not cut the turn's batch short (that would
        cost the whole room its coalescing). A client cannot ack what it has
        not received, so the room's seq is a safe upper bound.
        """
        room = request.room
        self._require_member(state, room, request.id)
        log_ = self.logs.get(room)
        latest = log_.seq if log_ is not None else 0
        self.reliable.ack(conn, room, request.seq, latest, self.now)
        if log_ is not None:
            # Reliable mode here: the log keeps what a resend may need (a
            # tail would close a reader a little behind with 4409 at once).
            capacity = self._capacity(room)
            if log_.capacity < capacity:
                log_.resize(capacity)


def merged(log_: RoomLog, fetched: dict[int, bytes], request: HistoryQuery) -> list[HeldMessage]:
    """``history`` paging (RoomLog.page) over the fetched messages and the log's."""
    since, before, limit = request.since, request.before, request.limit
    oldest = log_.oldest_seq
    held = [HeldMessage(seq, fetched[seq]) for seq in sorted(fetched) if seq < oldest]
    held += log_.page(since, before, None)
    held = [
        m for m in held if (since is None or m.seq > since) and (before is None or m.seq < before)
    ]
    if limit is not None:
        held = held[:limit] if since is not None else held[max(0, len(held) - limit) :]
    return held


# Each request type's handler (a join goes through its stages: joins.py).
_HANDLERS: dict[type, Callable[[Requests[Any], Any, ConnState, Any], None]] = {
    Publish: Requests._publish,
    Join: Requests._join,
    Leave: Requests._leave,
    Ack: Requests._ack,
    Ping: Requests._ping,
    PresenceQuery: Requests._presence,
    HistoryQuery: Requests._history,
}
