"""The room engine: one shard's room logic as a Sans-I/O state machine.

Like websockets' ``ServerProtocol``, :class:`RoomEngine` does no I/O: it never
reads a clock, schedules, logs, or touches a socket or a segment. Its inputs
are

- a connection's upgrade (:meth:`admit`), its opening (:meth:`open`), its
  text frames (:meth:`receive`) and its end (:meth:`closed`);
- what its broker delivered (:meth:`deliver`: the broker hands it to
  :attr:`RoomEngine.inbox`, which queues it; see
  :mod:`shardchat.core.engine.inbox`);
- the time, given before each batch of inputs with :meth:`advance`, and its
  timer (:meth:`tick`);
- the server's own calls (:meth:`publish_as`, :meth:`join_user`,
  :meth:`leave_user`, :meth:`close_user`);
- the end of the loop turn (:func:`shardchat.core.engine.turn.end_turn`).

Its outputs leave through two swap-and-return getters, in order:
:meth:`take_outputs` (frames, closes and paced replays for connections,
events and call results for the caller's other sinks:
:mod:`shardchat.core.outputs`) and :meth:`take_commands` (calls for the
broker: :mod:`shardchat.core.engine.commands`). Connections are the caller's
own objects (any hashable handle): the engine keeps them as keys and hands
them back.

Fan-out: a room's new frames of one turn are queued per room and, at
:meth:`flush`, joined once into one buffer that goes to each local member:
the caller's per-member work is one transport write.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Generic

from shardchat.core import wire
from shardchat.core.admission import Admitted, Refusal, Upgrade, Verify, admit
from shardchat.core.broker import Broker, PresenceAnswer, Publication, idempotency_key
from shardchat.core.config import Config
from shardchat.core.counters import (
    Counters,
    Slot,
    close_code_slot,
    error_slot,
    latency_slot,
    overload_slot,
)
from shardchat.core.engine.commands import Command, CommandQueue
from shardchat.core.engine.inbox import Inbox
from shardchat.core.engine.joins import MAX_DEFERRED, JoinStage, PendingJoin
from shardchat.core.errors import ErrorCode, ProtocolError, Reject
from shardchat.core.fanout import Fanout
from shardchat.core.gapfill import GapFill
from shardchat.core.hookevents import HookEvent, ProxiedPublish, Verdict
from shardchat.core.interfaces import (
    DEBUG,
    ERROR,
    INFO,
    NO_LOG,
    WARNING,
    ConnInfo,
    EventLog,
    HookRunner,
    PeerCounts,
)
from shardchat.core.messages import (
    Ack,
    AppCloseCode,
    ClientMessage,
    HistoryQuery,
    Join,
    Leave,
    Ping,
    PresenceQuery,
    Publish,
    RoomId,
)
from shardchat.core.outputs import ApiResult, C, Close, Output, Paced
from shardchat.core.overload import Queue, overloaded
from shardchat.core.presence import LocalPresence
from shardchat.core.ratelimit import TokenBucket
from shardchat.core.reliable import ReliableRooms
from shardchat.core.roomlog import HeldMessage, RoomLog

if TYPE_CHECKING:
    from shardchat.auth import Identity

__all__ = ["EVICT_EVERY", "PROTOCOL_VERSION", "ConnState", "RoomEngine"]

PROTOCOL_VERSION = 1
EVICT_EVERY = 30.0  # seconds between scans for idle rooms to drop

_S_CONNECTIONS = int(Slot.CONNECTIONS)
_S_OPENED = int(Slot.CONNECTIONS_OPENED)
_S_PUBLISHED = int(Slot.MESSAGES_PUBLISHED)
_S_RATE_LIMITED = int(Slot.RATE_LIMITED)
_S_SLOW = int(Slot.SLOW_CONSUMER_CLOSES)
_S_HOOK_ERRORS = int(Slot.HOOK_ERRORS)
_S_REFUSED = int(Slot.HTTP_REFUSED)
_S_JOINS = int(Slot.JOINS)
_S_LEAVES = int(Slot.LEAVES)
_S_ROOMS = int(Slot.ROOMS)
_S_LATENCY_COUNT = int(Slot.LATENCY_COUNT)
_S_LATENCY_SUM = int(Slot.LATENCY_SUM_US)


class ConnState:
    """The engine's state of one admitted connection."""

    __slots__ = (
        "allowed_rooms",
        "bucket",
        "conn_id",
        "deferred",
        "errors",
        "info",
        "joins",
        "opened",
        "peer",
        "rooms",
        "user",
    )

    def __init__(self, conn_id: int, peer: str, admitted: Admitted, bucket: TokenBucket) -> None:
        self.conn_id = conn_id  # the adapter's id, for logs and hooks
        self.peer = peer  # the client's IP address
        self.user = admitted.user
        self.allowed_rooms = admitted.allowed_rooms  # from the token; None = any room
        # The rooms this connection has joined: a tuple, not a set, because a set
        # is 216 bytes for one room and most connections are in a few (joins are
        # rate-limited, so the linear add and remove stay cheap).
        self.rooms: tuple[RoomId, ...] = ()
        self.errors = 0  # consecutive malformed requests
        self.bucket = bucket
        self.info: ConnInfo | None = None  # what hooks and events see, once open
        self.opened = False  # the upgrade completed
        # A join can wait for its broker (joins.py): the connection's requests
        # that come meanwhile wait behind it, so that a message sent right after a
        # join (or after the welcome of a join at open) is taken as a member's.
        # This connection's joins in flight: a tuple, empty (shared) for nearly all.
        self.joins: tuple[PendingJoin[Any], ...] = ()
        self.deferred: list[ClientMessage] | None = None  # what came meanwhile, in order


class RoomEngine(Generic[C]):
    """One engine per shard: its connections, its rooms, and what it asks of its broker."""

    def __init__(
        self,
        config: Config,
        shard_id: int,
        epoch: str,
        broker: Broker,
        counters: Counters,
        hooks: HookRunner,
        *,
        id_prefix: str,
        verify: Verify | None = None,
        peers: PeerCounts | None = None,
        log: EventLog = NO_LOG,
    ) -> None:
        """``broker``: the broker the caller runs :meth:`take_commands` on (the
        engine only reads it and asks it questions); ``counters``: this shard's
        block of counter slots; ``id_prefix``: the message ids' random part,
        unique per run (drawn by the caller: the core draws no random numbers);
        ``verify``: the token verifier when ``auth`` is on; ``peers``: the whole
        server's connections per address when ``server.max_per_ip`` is on."""
        self.config = config
        self.shard_id = shard_id
        self.epoch = epoch  # this run of the rooms' sequences (PROTOCOL.md, epoch)
        self.broker = CommandQueue(broker)  # commands queued, questions passed on
        self.inbox = Inbox(self)  # the broker's listener: what it tells us, queued
        self.counters = counters  # this shard's block of counter slots
        self.hooks = hooks
        self.log = log
        self.history = config.delivery.history
        self.now = 0.0  # monotonic seconds, as last given to advance()
        self.wall = 0.0  # Unix seconds, as last given to advance()
        self.draining = False
        self.conns: dict[C, ConnState] = {}  # admitted connections
        self.open_count = 0
        self.verify = verify
        self.peers = peers  # open connections per client address, on every shard
        self._out: list[Output[C]] = []  # taken by take_outputs()
        self._ready: list[C] = []  # connections whose last join ended with requests waiting
        # (token exp, conn id, connection), soonest first: closed with 4401 then.
        self._expiries: list[tuple[float, int, C]] = []
        self.logs: dict[str, RoomLog] = {}
        self.presence = LocalPresence()  # our own connections per (room, user)
        self.reliable: ReliableRooms[C] = ReliableRooms(config.delivery, counters)
        self.fanout: Fanout[C] = Fanout(self.logs, self.reliable, counters)
        self.members = self.fanout.members  # room -> local members
        self.gaps = GapFill(
            self.broker, self.logs, self.fanout.queue, counters, epoch, self.history, log
        )
        self._pending: dict[str, tuple[C, str | None]] = {}  # msg id -> sender, request id
        self._calls: dict[str, object] = {}  # msg id -> the publish_as caller's token
        # Webhook events (core/hookevents.py), taken with take_events(): only the
        # kinds the caller asks for are made.
        self.hook_kinds: frozenset[str] = frozenset()
        self._events: list[HookEvent] = []
        self._pending_messages: dict[str, tuple[int, str, str]] = {}  # conn id, user, content
        # proxy.publish_url: publishes wait for the backend's verdict (take_proxied()).
        self.publish_proxy = False
        self._proxied: list[ProxiedPublish[C]] = []
        self.proxy_waiting = 0  # publishes sent to the proxy (or about to be), not answered
        self._next_evict = 0.0
        self._msg_prefix = f"{shard_id}-{id_prefix}-"
        self._msg_counter = 0
        self._requests: dict[type, Callable[[C, ConnState, Any], None]] = {
            Publish: self._publish,
            Join: self._join,
            Leave: self._leave,
            Ack: self._ack,
            Ping: self._ping,
            PresenceQuery: self._presence,
            HistoryQuery: self._history,
        }

    # Outputs

    def take_outputs(self) -> list[Output[C]]:
        """What the inputs so far produced for connections and sinks, in order;
        forgotten after (websockets' ``data_to_send``)."""
        out, self._out = self._out, []
        return out

    def take_commands(self) -> list[Command]:
        """The calls for the broker the inputs so far produced, in order; forgotten
        after. The caller runs them (``commands.run_commands``) and then applies
        what the broker answered (:meth:`deliver`)."""
        return self.broker.take()

    def take_events(self) -> list[HookEvent]:
        """The webhook events the inputs so far made, in order; forgotten after."""
        events, self._events = self._events, []
        return events

    def take_proxied(self) -> list[ProxiedPublish[C]]:
        """The publishes waiting for the publish proxy's verdict
        (:meth:`publish_answered`), in order; forgotten after."""
        proxied, self._proxied = self._proxied, []
        return proxied

    @property
    def turn_due(self) -> bool:
        """The end of the turn has work: frames queued for the rooms, requests that
        waited for a join, or broker answers or commands not yet handled."""
        return (
            self.fanout.due or bool(self._ready) or bool(self.inbox) or bool(self.broker.commands)
        )

    @property
    def proxied_due(self) -> bool:
        """Publishes wait to be sent to the publish proxy (:meth:`take_proxied`, at
        the end of the turn: one request for the turn's publishes)."""
        return bool(self._proxied)

    def advance(self, now: float, wall: float) -> None:
        """The time for the inputs that follow: monotonic and Unix seconds."""
        self.now = now
        self.wall = wall

    def deliver(self) -> None:
        """Input: apply what the broker told :attr:`inbox` since the last input,
        in order. Every other input starts with it too."""
        if self.inbox:
            self.inbox.apply()

    # Connections

    def admit(
        self, conn: C, upgrade: Upgrade, connections: int, proxied: Identity | None = None
    ) -> Refusal | None:
        """PROTOCOL.md's checks before the upgrade: None admits ``conn``.

        ``connections``: open over the whole server, handshakes under way here
        included. ``proxied``: the connect proxy's answer (who the backend says
        the client is).
        """
        self.deliver()
        result = admit(
            self.config,
            self.hooks,
            self.shard_id,
            upgrade,
            draining=self.draining,
            connections=connections,
            from_peer=0 if self.peers is None else self.peers.total(upgrade.peer),
            verify=self.verify,
            proxied=proxied,
        )
        self._count_hook_errors()
        if type(result) is Refusal:
            self.counters[_S_REFUSED] += 1
            return result
        assert type(result) is Admitted
        bucket = TokenBucket(self.config.limits.burst, self.now)
        state = self.conns[conn] = ConnState(upgrade.conn_id, upgrade.peer, result, bucket)
        # The rooms the query named wait for the connection to open.
        state.joins = tuple(PendingJoin(conn, Join(room=RoomId(room))) for room in result.rooms)
        if result.expires is not None:
            heapq.heappush(self._expiries, (result.expires, upgrade.conn_id, conn))
        return None

    def open(self, conn: C) -> None:
        """The upgrade of an admitted connection completed: welcome it and join the
        rooms its query named."""
        self.deliver()
        state = self.conns[conn]
        state.opened = True
        if self.peers is not None:
            self.peers.add(state.peer)
        self.open_count += 1
        self.counters[_S_CONNECTIONS] = self.open_count
        self.counters[_S_OPENED] += 1
        interval = self.config.heartbeat.interval
        self._reply(
            conn,
            {
                "type": "welcome",
                "user": state.user,
                "shard": self.shard_id,
                "heartbeat": int(interval) if interval.is_integer() else interval,
                "protocol": PROTOCOL_VERSION,
            },
        )
        self.log.event(INFO, "conn_open", conn=state.conn_id, user=state.user, peer=state.peer)
        if "connect" in self.hook_kinds:
            self._event("connect", state, None, {"peer": state.peer})
        if self.hooks.app is not None:
            state.info = ConnInfo(self.shard_id, state.conn_id, state.user, state.peer)
            if self.hooks.has_open:
                self.hooks.on_open(state.info)
                self._count_hook_errors()
        for pending in state.joins:
            self._start_join(pending, state)

    def receive(self, conn: C, data: bytes | bytearray | memoryview) -> None:
        """Input: a complete text message from ``conn`` (UTF-8 not yet validated)."""
        self.deliver()
        state = self.conns[conn]
        try:
            request = wire.decode(data, self.config.limits.max_content)
        except ProtocolError as exc:
            if exc.code is ErrorCode.BAD_JSON and not _is_utf8(data):
                self._close(conn, state, Close(1007, "invalid UTF-8", fail=True))
                return
            self._refuse(conn, state, exc)
            return
        self._request(conn, state, request)

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
            self._requests[type(request)](conn, state, request)
        except ProtocolError as exc:
            self._refuse(conn, state, exc)
        else:
            state.errors = 0

    def closed(self, conn: C, code: int, reason: str) -> None:
        """Input: ``conn`` is gone, having closed with ``code``: forget it."""
        self.deliver()
        state = self.conns.pop(conn, None)
        if state is None:
            return
        for pending in state.joins:
            pending.stage = JoinStage.DONE  # what its broker answers later is dropped
        state.joins = ()
        state.deferred = None
        if not state.opened:
            return
        for room in state.rooms:
            self._leave_room(conn, state, room)
            if "leave" in self.hook_kinds:
                self._event("leave", state, room, {"reason": "disconnect"})
        state.rooms = ()
        if "disconnect" in self.hook_kinds:
            self._event("disconnect", state, None, {"code": code, "reason": reason})
        if self.peers is not None:
            self.peers.remove(state.peer)
        self.open_count -= 1
        counters = self.counters
        counters[_S_CONNECTIONS] = self.open_count
        counters[close_code_slot(code)] += 1
        if code == AppCloseCode.SLOW_CONSUMER:
            counters[_S_SLOW] += 1
        self.log.event(
            INFO, "conn_close", conn=state.conn_id, user=state.user, code=code, reason=reason
        )
        if self.hooks.has_close and state.info is not None:
            self.hooks.on_close(state.info, code, reason)
            self._count_hook_errors()

    def stop_admitting(self) -> list[Output[C]]:
        """Input: stop admitting (503 from now on); returns the turn's queued room
        frames, to write before the caller closes its connections with 1001."""
        self.deliver()
        self.draining = True
        return self.flush()

    def _close(self, conn: C, state: ConnState, close: Close) -> None:
        self._out.append(((conn,), close))
        state.deferred = None  # closing: what waited is not taken

    # Requests

    def _refuse(self, conn: C, state: ConnState, exc: ProtocolError) -> None:
        """Every error frame goes out here, so that each is counted once by code."""
        self._send(conn, wire.error_payload(exc.code, exc.reason, exc.request_id, exc.retry_after))
        self.counters[error_slot(exc.code)] += 1
        if not exc.code.malformed:
            return
        state.errors += 1
        if state.errors >= self.config.limits.max_errors:
            self._close(conn, state, Close(1008, "too many errors", fail=True))

    @staticmethod
    def _check_allowed(state: ConnState, room: RoomId, request_id: str | None) -> None:
        if state.allowed_rooms is not None and room not in state.allowed_rooms:
            raise ProtocolError(
                ErrorCode.UNAUTHORIZED, f"your token does not allow room {room}", request_id
            )

    @staticmethod
    def _require_member(state: ConnState, room: RoomId, request_id: str | None) -> None:
        if room not in state.rooms:
            raise ProtocolError(ErrorCode.NOT_MEMBER, f"not a member of room {room}", request_id)

    def _publish(self, conn: C, state: ConnState, request: Publish) -> None:
        room = request.room
        self._require_member(state, room, request.id)
        # Admission control before anything is spent on it (a rate token, a hook).
        self._check_overload(room, request.id, proxied=True)
        limits = self.config.limits
        if not state.bucket.take(self.now, limits.rate, limits.burst):
            self.counters[_S_RATE_LIMITED] += 1
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
        overload = self.config.overload
        full = self.broker.full(room)
        if full is None and self.fanout.turn_bytes > overload.turn_bytes:
            full = Queue.TURN
        return None if full is None else overloaded(full, overload.retry_after, None)

    def _check_overload(self, room: str, request_id: str | None, proxied: bool = False) -> None:
        """Refuse ``overloaded`` when a bounded queue a publish would wait in is full
        (``proxied``: a client's publish, which waits for the publish proxy too)."""
        overload = self.config.overload
        full = self.broker.full(room)
        if full is None and self.fanout.turn_bytes > overload.turn_bytes:
            full = Queue.TURN
        if full is None and proxied and self.publish_proxy:
            if self.proxy_waiting >= overload.proxy:
                full = Queue.PROXY
        if full is not None:
            self.counters[overload_slot(full)] += 1
            raise overloaded(full, overload.retry_after, request_id)

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
        self.counters[_S_PUBLISHED] += 1
        self._msg_counter += 1
        msg_id = self._msg_prefix + str(self._msg_counter)
        now = self.now
        publication = Publication(
            msg_id,
            room,
            sender,
            content,
            int(self.wall * 1000),
            int(now * 1e9),
            idempotency_key(sender, room, key),
        )
        self.broker.publish(publication, now)
        return msg_id

    # Joins (joins.py: the stages)

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
            return  # gone, or ended, while its broker worked
        try:
            if pending.stage is JoinStage.OPENING:
                self._fetch_for_join(pending)
            elif pending.stage is JoinStage.FETCHING:
                self._ask_for_join(pending)
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
            self._ask_for_join(pending)

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
            self._refuse(conn, state, _unavailable(room, request.id))
        elif room_size and room not in state.rooms and not answer.has and answer.total >= room_size:
            # Joins on several shards at the same instant can still overshoot by a few.
            error = ProtocolError(
                ErrorCode.ROOM_FULL, f"room {room} has {room_size} users", request.id
            )
            self._refuse(conn, state, error)
        else:
            self._finish_join(conn, state, request, answer)
        self._join_done(pending, state)

    def _join_done(self, pending: PendingJoin[C], state: ConnState) -> None:
        """A join ended (answered or refused). Once none is in flight, what the
        connection sent meanwhile is taken at the end of the turn
        (:meth:`take_deferred`): not here, and not by recursion (a replayed join
        can end at once)."""
        pending.stage = JoinStage.DONE
        state.joins = tuple(p for p in state.joins if p is not pending)
        if not state.joins and state.deferred:
            self._ready.append(pending.conn)

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

    def _finish_join(
        self, conn: C, state: ConnState, request: Join, answer: PresenceAnswer
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
        self.counters[_S_JOINS] += 1
        self.counters[_S_ROOMS] = len(self.members)
        user = state.user
        if self.presence.local_join(room, user):
            self.broker.announce(room, user, True)
        count, users = self._with_local(room, answer, user)
        joined: dict[str, object] = {
            "type": "joined",
            "room": room,
            "seq": log_.seq,
            "epoch": log_.epoch,
            "count": count,
            "users": users,
        }
        if request.since is None:
            self._reply(conn, joined)
            return
        replay = log_.replay(request.since, request.epoch)
        joined["recovered"] = replay.recovered
        self._reply(conn, joined)
        if replay.messages:
            self._out.append(((conn,), Paced([held.payload for held in replay.messages])))

    def _leave(self, conn: C, state: ConnState, request: Leave) -> None:
        room = request.room
        self._require_member(state, room, request.id)
        state.rooms = tuple(r for r in state.rooms if r != room)
        self._leave_room(conn, state, room)
        if "leave" in self.hook_kinds:
            self._event("leave", state, room, {"reason": "leave"})
        self._reply(conn, {"type": "left", "room": room})

    def _leave_room(self, conn: C, state: ConnState, room: str) -> None:
        self.reliable.forget(conn, room)
        members = self.members.get(room)
        if members is not None and conn in members:
            del members[conn]
            if not members:
                del self.members[room]
                self.broker.close_room(room)
            self.counters[_S_LEAVES] += 1
            self.counters[_S_ROOMS] = len(self.members)
        user = state.user
        if self.presence.local_leave(room, user):
            self.broker.announce(room, user, False)

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
            self._refuse(conn, state, _unavailable(room, request.id))
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
        self._reply(conn, reply)

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

    def _history(self, conn: C, state: ConnState, request: HistoryQuery) -> None:
        # As for a join with `since`: a room this engine dropped is fetched back
        # first, so that `history` answers from everything the server holds.
        self._drop_partial(request.room)
        then = self.inbox.later(self._finish_history, conn, request)
        if self.gaps.ensure_history(request.room, 0, self.now, then):
            self._finish_history(conn, request)

    def _finish_history(self, conn: C, request: HistoryQuery) -> None:
        if conn not in self.conns:
            return  # gone while the room's history was being fetched
        room = request.room
        self._catch_up()
        self._out += self.fanout.flush(self.now, snapshot=True)
        log_ = self.logs.get(room)
        held = [] if log_ is None else log_.page(request.since, request.before, request.limit)
        if held:
            self._out.append(((conn,), Paced([message.payload for message in held])))
        last = held[-1].seq if held else request.since or 0
        self._reply(conn, {"type": "history_end", "room": room, "seq": last})

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

    def _reply(self, conn: C, obj: dict[str, object]) -> None:
        self._out.append(((conn,), wire.text_frame(wire.encode(obj))))

    def _send(self, conn: C, payload: bytes) -> None:
        self._out.append(((conn,), wire.text_frame(payload)))

    def _count_hook_errors(self) -> None:
        hooks = self.hooks
        if hooks.errors:
            self.counters[_S_HOOK_ERRORS] += hooks.errors
            hooks.errors = 0

    def _event(
        self, kind: str, state: ConnState, room: str | None, fields: dict[str, object] | None
    ) -> None:
        self._events.append(HookEvent(kind, state.user, room, state.conn_id, self.wall, fields))

    def _catch_up(self) -> None:
        """Have the broker deliver everything available now, and apply it."""
        self.broker.catch_up()
        self.deliver()

    # The server's own calls (the server API)

    def publish_as(
        self, token: object, room: str, sender: str, content: str, key: str | None = None
    ) -> None:
        """Input: publish ``content`` into ``room`` as ``sender``, for a caller that is
        not a connection (no membership, rate limit or hook applies: the caller
        checked who may call; admission control does). The answer comes out of
        :meth:`take_outputs` as ``((), ApiResult(token, ...))``: ok with the seq,
        or an error code (a bad room name or content, ``overloaded`` with
        ``retry_after``, or ``unavailable``: not known to be published, a
        retry with the same ``key`` is safe). ``key`` deduplicates retries per
        (sender, room) as a client's ``key`` does."""
        self.deliver()
        limits = self.config.limits
        reason = ""
        retry_after: float | None = None
        full = self.broker.full(room) if wire.is_valid_name(room) else None
        if not wire.is_valid_name(room):
            code, reason = ErrorCode.BAD_REQUEST, f"invalid room name {room!r}"
        elif full is not None:
            self.counters[overload_slot(full)] += 1
            code, reason = ErrorCode.OVERLOADED, f"server overloaded ({full}); not sent"
            retry_after = self.config.overload.retry_after
        elif len(content.encode()) > limits.max_content:
            code, reason = ErrorCode.TOO_LARGE, f"content is over {limits.max_content} bytes"
        if reason:
            result = ApiResult(token, False, room, 0, code.value, reason, retry_after)
            self._out.append(((), result))
            return
        msg_id = self._sequence(room, sender, content, key)
        self._calls[msg_id] = token

    def join_user(self, user: str, room: str) -> int:
        """Input: every local connection of ``user`` not yet in ``room`` joins it as if
        it had sent ``join`` (it gets ``joined``, or an error frame). Returns how
        many open connections the user has here. A scan of this shard's
        connections: for the server API's rare calls, not a hot path."""
        self.deliver()
        request = Join(room=RoomId(room))
        targets = self._users(user)
        for conn, state in targets:
            if room not in state.rooms:
                self._request(conn, state, request)
        return len(targets)

    def leave_user(self, user: str, room: str) -> int:
        """Input: every local connection of ``user`` that is a member of ``room``
        leaves it as if it had sent ``leave`` (it gets ``left``). Returns how many
        left."""
        self.deliver()
        request = Leave(room=RoomId(room))
        targets = [(conn, state) for conn, state in self._users(user) if room in state.rooms]
        for conn, state in targets:
            self._request(conn, state, request)
        return len(targets)

    def _users(self, user: str) -> list[tuple[C, ConnState]]:
        return [
            (c, state) for c, state in self.conns.items() if state.user == user and state.opened
        ]

    def close_user(self, user: str, code: int, reason: str) -> int:
        """Input: close every local connection of ``user`` with ``code`` and
        ``reason`` (4403: do not reconnect; 4400: may reconnect). Returns how many."""
        self.deliver()
        targets = self._users(user)
        for conn, state in targets:
            self._close(conn, state, Close(code, reason))
        return len(targets)

    def read_history(
        self,
        room: str,
        since: int | None,
        before: int | None,
        limit: int,
        then: Callable[[list[HeldMessage], str, int], None],
    ) -> None:
        """Input: a page of ``room``'s history as ``history`` on the WebSocket
        answers it: ``then(messages, epoch, latest seq)``, once this engine holds
        the room's log (fetched back first when it dropped it)."""
        self.deliver()
        self._drop_partial(room)
        answer = self.inbox.later(self._answer_history, room, since, before, limit, then)
        # Read what was acked before the call: a log that is behind the broker's
        # latest seq (the owner's record not read yet) is filled up to it first.
        self._catch_up()
        acked = 0 if room not in self.logs else self.broker.latest_seq(room) or 0
        if self.gaps.ensure_history(room, acked, self.now, answer):
            self._answer_history(room, since, before, limit, then)

    def _answer_history(
        self,
        room: str,
        since: int | None,
        before: int | None,
        limit: int,
        then: Callable[[list[HeldMessage], str, int], None],
    ) -> None:
        self._catch_up()
        log_ = self.logs.get(room)
        if log_ is None:
            then([], self._epoch(room), self.broker.latest_seq(room) or 0)
        else:
            then(log_.page(since, before, limit), log_.epoch, log_.seq)

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

    # Rooms

    def _log(self, room: str) -> RoomLog:
        log_ = self.logs.get(room)
        if log_ is None:
            seq = self.broker.latest_seq(room) or 0
            log_ = self.logs[room] = RoomLog(self._epoch(room), self.history, seq)
        log_.touched = self.now
        return log_

    def _drop_partial(self, room: str) -> None:
        """Drop a log made from live messages alone (the room had no members here
        when they came: after a restart, or once dropped as idle), which lacks the
        older history its broker holds, so that a join or ``history`` fetches it
        whole. Never one with members, a gap or resends, nor the one its broker
        fills from."""
        log_ = self.logs.get(room)
        if (
            log_ is None
            or len(log_) >= min(self.history, log_.seq)
            or room in self.members
            or room in self.gaps.held_back
            or room in self.reliable.rooms
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
        counters[_S_LATENCY_COUNT] += 1
        counters[_S_LATENCY_SUM] += max(0, ns // 1000)

    def _evict_idle(self) -> None:
        """Drop the logs of rooms this engine has no members of, has not used for
        ``delivery.room_idle`` and whose history its broker can fetch back: every
        engine's memory stays with the rooms in use."""
        now = self.now
        idle = self.config.delivery.room_idle
        busy = self.members.keys() | self.gaps.held_back.keys() | self.reliable.rooms.keys()
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

    # Fan-out

    def flush(self) -> list[Output[C]]:
        """The end of the caller's loop turn (``turn.end_turn``): each room's queued
        frames, joined once, for its local members. The caller writes them at
        once (the member dicts are live)."""
        return self.fanout.flush(self.now)

    # Timers

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
        if self.gaps.held_back:
            self.gaps.sweep(now)
            gap = self.gaps.next_deadline()
            if gap is not None and (deadline is None or gap < deadline):
                deadline = gap
        return deadline

    # What the broker told the inbox, applied (BrokerListener)

    def on_message(self, room: str, seq: int, msg_id: str, json: bytes, publish_ns: int) -> None:
        log_ = self.logs.get(room)
        if log_ is None:
            log_ = self.logs[room] = RoomLog(self._epoch(room), self.history, seq - 1)
        if seq == log_.seq + 1 and room not in self.gaps.held_back:
            log_.append(seq, json)
            log_.touched = self.now
            if room in self.members:
                self.fanout.queue(room, json)
                self._latency(int(self.now * 1e9) - publish_ns)
        elif seq > log_.seq:
            self.gaps.hold_back(log_, room, seq, json, self.now)

    def on_published(self, msg_id: str, room: str, seq: int) -> None:
        if self._pending_messages:
            message = self._pending_messages.pop(msg_id, None)
            if message is not None:
                conn_id, user, content = message
                fields = {"seq": seq, "msg_id": msg_id, "content": content}
                self._events.append(HookEvent("message", user, room, conn_id, self.wall, fields))
        pending = self._pending.pop(msg_id, None)
        if pending is None:
            token = self._calls.pop(msg_id, _NO_CALL)
            if token is not _NO_CALL:
                self._out.append(((), ApiResult(token, True, room, seq)))
            return
        conn, request_id = pending
        if conn not in self.conns:
            return
        ack: dict[str, object] = {"type": "ack", "room": room, "seq": seq}
        if request_id is not None:
            ack["id"] = request_id
        self._reply(conn, ack)

    def on_publish_failed(self, msg_id: str, room: str) -> None:
        self._pending_messages.pop(msg_id, None)
        pending = self._pending.pop(msg_id, None)
        self.log.event(ERROR, "publish_failed", msg=msg_id, room=room)
        reason = (
            f"room {room}: the message is not known to be published (its broker did"
            " not confirm it); retrying with the same key is safe"
        )
        if pending is None:
            token = self._calls.pop(msg_id, _NO_CALL)
            if token is not _NO_CALL:
                code = ErrorCode.UNAVAILABLE.value
                self._out.append(((), ApiResult(token, False, room, code=code, reason=reason)))
            return
        conn, request_id = pending
        state = self.conns.get(conn)
        if state is not None:
            self._refuse(conn, state, ProtocolError(ErrorCode.UNAVAILABLE, reason, request_id))

    def on_presence_event(self, room: str, user: str, joined: bool, count: int) -> None:
        """A join or leave event, for our members of the room but that user's own
        connections; none in rooms over ``presence.events_limit``."""
        members = self.members.get(room)
        if not members or count > self.config.presence.events_limit:
            return
        conns = self.conns
        targets = [c for c in members if conns[c].user != user]
        if not targets:
            return
        kind = "join" if joined else "leave"
        frame = wire.text_frame(
            wire.encode(
                {"type": kind, "room": room, "sender": user, "timestamp": int(self.wall * 1000)}
            )
        )
        self._out.append((targets, frame))

    def on_peer_reset(self, peer: int) -> None:
        """A peer (re)started (its broker dropped its users): tell it who is here."""
        self.broker.snapshot(peer, self.presence.local_pairs())

    def on_replay(self, room: str, seq: int, json: bytes) -> None:
        self.gaps.on_replay(room, seq, json)

    def on_replay_lost(self, room: str, last: int) -> None:
        self.gaps.on_lost(room, last)

    def on_replay_end(self, room: str, last: int) -> None:
        self.gaps.on_end(room, self.now)

    def on_resync(self, latest: Callable[[str], int | None]) -> None:
        self.gaps.resync(latest, self.now)

    def on_room_state(self, room: str, epoch: str, seq: int) -> None:
        log_ = self.logs.get(room)
        if log_ is None:
            return  # made when needed, with the broker's epoch and seq
        waiting: list[Callable[[], None]] = []
        if log_.epoch != epoch:
            # The store lost the room (Redis restarted without its data): its seqs
            # start again under a new epoch. Members here hold seqs of the old one,
            # so they are closed to rejoin (ChatClient resumes with since/epoch and
            # gets recovered: false), and the log starts again.
            self.log.event(WARNING, "room_epoch_changed", room=room, epoch=epoch)
            waiting = self.gaps.restart(room)
            log_ = self.logs[room] = RoomLog(epoch, self.history, 0, self.now)
            members = self.members.get(room)
            if members:
                self._out.append((list(members), Close(1012, "room history was reset")))
        if seq > log_.seq:
            self.gaps.request(room, log_.seq + 1, seq, self.now, "resync")
        # Joins that waited for the old epoch's fill ask again: they wait for the
        # new one, or go on with the new log.
        for then in waiting:
            then()

    def held(self, room: str, first: int) -> list[HeldMessage]:
        log_ = self.logs.get(room)
        return [] if log_ is None else log_.after(first - 1)

    def restore(self, room: str, seq: int, json: bytes | None) -> None:
        log_ = self.logs.get(room)
        if json is None:
            if log_ is None:
                self.logs[room] = RoomLog(self._epoch(room), self.history, seq, self.now)
            else:
                log_.skip_to(seq)
            return
        if log_ is None:
            log_ = self.logs[room] = RoomLog(self._epoch(room), self.history, seq - 1, self.now)
        if seq > log_.seq + 1:
            log_.skip_to(seq - 1)  # a part of the ring already overwritten
        if seq == log_.seq + 1:
            log_.append(seq, json)


_NO_CALL = object()  # no publish_as caller waits for this message id


def _unavailable(room: str, request_id: str | None) -> ProtocolError:
    return ProtocolError(
        ErrorCode.UNAVAILABLE,
        f"room {room}: its presence did not answer (a shard is restarting); try again",
        request_id,
    )


def _is_utf8(data: bytes | bytearray | memoryview) -> bool:
    try:
        bytes(data).decode()
    except UnicodeDecodeError:
        return False
    return True
