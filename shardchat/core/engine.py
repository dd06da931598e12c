"""The room engine: one shard's room logic as a Sans-I/O state machine.

DESIGN.md, The room engine and its brokers. Like websockets'
``ServerProtocol``, :class:`RoomEngine` does no I/O: it never reads a clock,
schedules, or touches a socket or a segment. Its inputs are

- a connection's upgrade (:meth:`admit`), its opening (:meth:`open`), its
  text frames (:meth:`receive`) and its end (:meth:`closed`);
- what its :class:`~shardchat.core.broker.Broker` delivers (the
  :class:`~shardchat.core.broker.BrokerListener` methods);
- the time, given before each batch of inputs with :meth:`advance`;
- the end of the caller's loop turn (:meth:`flush`) and its timer
  (:meth:`tick`).

Its outputs are collected in :attr:`RoomEngine.out`, for the caller to take
after every input: ``(connections, frame)`` pairs, where ``frame`` is a ready
WebSocket frame for each of ``connections`` or a :class:`Close`. What it
publishes goes to its broker. Connections are the caller's own objects
(any hashable handle): the engine keeps them as keys and hands them back.

Fan-out: a room's new frames of one turn are queued per room and, at
:meth:`flush`, joined once into one buffer that goes to each local member:
the caller's per-member work is one transport write.
"""

from __future__ import annotations

import heapq
import logging
import secrets
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Generic

from shardchat import stats
from shardchat.addrtable import AddrTable, addr_key
from shardchat.core import wire
from shardchat.core.admission import Admitted, Refusal, Upgrade, Verify, admit
from shardchat.core.broker import Broker, PresenceAnswer, Publication, idempotency_key
from shardchat.core.config import Config
from shardchat.core.errors import ErrorCode, ProtocolError
from shardchat.core.fanout import Fanout
from shardchat.core.gapfill import GapFill
from shardchat.core.hookevents import HookEvent, ProxiedPublish, Verdict
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
from shardchat.core.outputs import C, Close, Output, Paced
from shardchat.core.overload import Queue, overloaded
from shardchat.core.presence import LocalPresence
from shardchat.core.ratelimit import TokenBucket
from shardchat.core.reliable import ReliableRooms
from shardchat.core.roomlog import HeldMessage, RoomLog
from shardchat.hooks import ConnInfo, Hooks, Reject
from shardchat.logs import log_event
from shardchat.stats import Counters

if TYPE_CHECKING:
    from shardchat.auth import Identity

__all__ = ["EVICT_EVERY", "PROTOCOL_VERSION", "ConnState", "RoomEngine"]

log = logging.getLogger(__name__)

PROTOCOL_VERSION = 1
EVICT_EVERY = 30.0  # seconds between scans for idle rooms to drop
MAX_DEFERRED = 256  # requests a connection may send while its join waits

_S_CONNECTIONS = int(stats.Slot.CONNECTIONS)
_S_OPENED = int(stats.Slot.CONNECTIONS_OPENED)
_S_PUBLISHED = int(stats.Slot.MESSAGES_PUBLISHED)
_S_RATE_LIMITED = int(stats.Slot.RATE_LIMITED)
_S_SLOW = int(stats.Slot.SLOW_CONSUMER_CLOSES)
_S_HOOK_ERRORS = int(stats.Slot.HOOK_ERRORS)
_S_REFUSED = int(stats.Slot.HTTP_REFUSED)
_S_JOINS = int(stats.Slot.JOINS)
_S_LEAVES = int(stats.Slot.LEAVES)
_S_ROOMS = int(stats.Slot.ROOMS)
_S_LATENCY_COUNT = int(stats.Slot.LATENCY_COUNT)
_S_LATENCY_SUM = int(stats.Slot.LATENCY_SUM_US)


class ConnState:
    """The engine's state of one admitted connection."""

    __slots__ = (
        "allowed_rooms",
        "bucket",
        "conn_id",
        "deferred",
        "errors",
        "info",
        "joining",
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
        self.info: ConnInfo | None = None  # what hooks see, once open; None without hooks
        self.opened = False  # the upgrade completed
        # A join can wait for its broker (a presence answer from the room's owner,
        # history fetched back, a Redis subscription): the connection's requests
        # that come meanwhile wait behind it, so that a message sent right after a
        # join (or after the welcome of a join at open) is taken as a member's.
        self.joining = 0  # this connection's joins in flight
        self.deferred: list[ClientMessage] | None = None  # what came meanwhile, in order


class RoomEngine(Generic[C]):
    """One engine per shard: its connections, its rooms, and what it tells its broker."""

    def __init__(
        self,
        config: Config,
        shard_id: int,
        epoch: str,
        broker: Broker,
        counters: Counters,
        hooks: Hooks | None = None,
        *,
        verify: Verify | None = None,
        addrs: AddrTable | None = None,
        id_prefix: str | None = None,
    ) -> None:
        """``verify``: the token verifier when ``auth`` is on; ``addrs``: the
        whole server's connections per address when ``server.max_per_ip`` is on;
        ``id_prefix``: the message ids' random part (tests fix it)."""
        self.config = config
        self.shard_id = shard_id
        self.epoch = epoch  # this run of the rooms' sequences (PROTOCOL.md, epoch)
        self.broker = broker
        self.stats = counters  # this shard's block of stats slots
        self.hooks = hooks if hooks is not None else Hooks(None)
        self.history = config.delivery.history
        self.now = 0.0  # monotonic seconds, as last given to advance()
        self.wall = 0.0  # Unix seconds, as last given to advance()
        self.out: list[Output[C]] = []  # taken by the caller after every input
        self.draining = False
        self.conns: dict[C, ConnState] = {}  # admitted connections
        self._replays: list[C] = []  # connections whose deferred requests are due
        self.open_count = 0
        self.verify = verify
        self.addrs = addrs  # open connections per client address, on every shard
        # (token exp, conn id, connection), soonest first: closed with 4401 then.
        self._expiries: list[tuple[float, int, C]] = []
        self.logs: dict[str, RoomLog] = {}
        self.presence = LocalPresence()  # our own connections per (room, user)
        self.reliable: ReliableRooms[C] = ReliableRooms(config.delivery, counters)
        self.fanout: Fanout[C] = Fanout(self.logs, self.reliable, counters)
        self.members = self.fanout.members  # room -> local members
        self.gaps = GapFill(broker, self.logs, self.fanout.queue, counters, epoch, self.history)
        self._pending: dict[str, tuple[C, str | None]] = {}  # msg id -> sender, request id
        # Webhook events (core/hookevents.py), taken by the caller like `out`: only
        # the kinds it asks for are made.
        self.hook_kinds: frozenset[str] = frozenset()
        self.events: list[HookEvent] = []
        self._pending_messages: dict[str, tuple[int, str, str]] = {}  # conn id, user, content
        # proxy.publish_url: publishes wait for the backend's verdict (taken by the caller).
        self.publish_proxy = False
        self.proxied: list[ProxiedPublish[C]] = []
        self.proxy_waiting = 0  # publishes sent to the proxy (or about to be), not answered
        # The server API's publishes (core/apiinputs.py): msg id -> told the seq or None.
        self.api_pending: dict[str, Callable[[int | None], None]] = {}
        self._join_at_open: dict[C, tuple[str, ...]] = {}  # rooms the query named
        self._next_evict = 0.0
        prefix = id_prefix if id_prefix is not None else secrets.token_hex(3)
        self._msg_prefix = f"{shard_id}-{prefix}-"
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

    def advance(self, now: float, wall: float) -> None:
        """The time for the inputs that follow: monotonic and Unix seconds."""
        self.now = now
        self.wall = wall

    # Connections

    def admit(
        self, conn: C, upgrade: Upgrade, connections: int, proxied: Identity | None = None
    ) -> Refusal | None:
        """PROTOCOL.md's checks before the upgrade: None admits ``conn``.

        ``connections``: open over the whole server, handshakes under way here
        included. ``proxied``: the connect proxy's answer (who the backend says
        the client is).
        """
        result = admit(
            self.config,
            self.hooks,
            self.shard_id,
            upgrade,
            draining=self.draining,
            connections=connections,
            from_peer=0 if self.addrs is None else self.addrs.total(addr_key(upgrade.peer)),
            verify=self.verify,
            proxied=proxied,
        )
        self._count_hook_errors()
        if type(result) is Refusal:
            self.stats[_S_REFUSED] += 1
            return result
        assert type(result) is Admitted
        bucket = TokenBucket(self.config.limits.burst, self.now)
        self.conns[conn] = ConnState(upgrade.conn_id, upgrade.peer, result, bucket)
        self._join_at_open[conn] = result.rooms
        if result.expires is not None:
            heapq.heappush(self._expiries, (result.expires, upgrade.conn_id, conn))
        return None

    def open(self, conn: C) -> None:
        """The upgrade of an admitted connection completed: welcome it and join the
        rooms its query named."""
        state = self.conns[conn]
        rooms = self._join_at_open.pop(conn, ())
        state.opened = True
        if self.addrs is not None:
            self.addrs.add(addr_key(state.peer))
        self.open_count += 1
        self.stats[_S_CONNECTIONS] = self.open_count
        self.stats[_S_OPENED] += 1
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
        log_event(
            log, logging.INFO, "conn_open", conn=state.conn_id, user=state.user, peer=state.peer
        )
        if "connect" in self.hook_kinds:
            self._event("connect", state, None, {"peer": state.peer})
        if self.hooks.app is not None:
            state.info = ConnInfo(self.shard_id, state.conn_id, state.user, state.peer)
            if self.hooks.has_open:
                self.hooks.on_open(state.info)
                self._count_hook_errors()
        for room in rooms:
            try:
                self._join(conn, state, Join(room=RoomId(room)))
            except ProtocolError as exc:
                self._refuse(conn, state, exc)

    def receive(self, conn: C, data: bytes | bytearray | memoryview) -> None:
        """A complete text message from ``conn`` (UTF-8 not yet validated)."""
        state = self.conns[conn]
        try:
            request = wire.decode(data, self.config.limits.max_content)
        except ProtocolError as exc:
            if exc.code is ErrorCode.BAD_JSON and not _is_utf8(data):
                self.out.append(((conn,), Close(1007, "invalid UTF-8", fail=True)))
                state.deferred = None  # closing: what waited is not taken
                return
            self._refuse(conn, state, exc)
            return
        if state.joining and type(request) is not Ping:
            self._defer(conn, state, request)
            return
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
        """``conn`` is gone, having closed with ``code``: forget it."""
        self._join_at_open.pop(conn, None)
        state = self.conns.pop(conn, None)
        if state is None or not state.opened:
            return
        for room in state.rooms:
            self._leave_room(conn, state, room)
            if "leave" in self.hook_kinds:
                self._event("leave", state, room, {"reason": "disconnect"})
        state.rooms = ()
        if "disconnect" in self.hook_kinds:
            self._event("disconnect", state, None, {"code": code, "reason": reason})
        if self.addrs is not None:
            self.addrs.remove(addr_key(state.peer))
        self.open_count -= 1
        counters = self.stats
        counters[_S_CONNECTIONS] = self.open_count
        counters[stats.close_code_slot(code)] += 1
        if code == AppCloseCode.SLOW_CONSUMER:
            counters[_S_SLOW] += 1
        log_event(
            log, logging.INFO, "conn_close", conn=state.conn_id, user=state.user, code=code,
            reason=reason,
        )  # fmt: skip
        if self.hooks.has_close and state.info is not None:
            self.hooks.on_close(state.info, code, reason)
            self._count_hook_errors()

    def drain(self) -> list[Output[C]]:
        """Stop admitting (503); returns the turn's queued frames, to write before
        the caller closes its connections with 1001."""
        self.draining = True
        return self.flush()

    # Requests

    def _refuse(self, conn: C, state: ConnState, exc: ProtocolError) -> None:
        """Every error frame goes out here, so that each is counted once by code."""
        self._send(conn, wire.error_payload(exc.code, exc.reason, exc.request_id, exc.retry_after))
        self.stats[stats.error_slot(exc.code)] += 1
        if not exc.code.malformed:
            return
        state.errors += 1
        if state.errors >= self.config.limits.max_errors:
            self.out.append(((conn,), Close(1008, "too many errors", fail=True)))
            state.deferred = None  # closing: what waited is not taken

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
        overload = self.config.overload
        full = self.broker.full(room)
        if full is None and self.fanout.turn_bytes > overload.turn_bytes:
            full = Queue.TURN
        if full is None and self.publish_proxy and self.proxy_waiting >= overload.proxy:
            full = Queue.PROXY
        if full is not None:
            self.stats[stats.overload_slot(full)] += 1
            raise overloaded(full, overload.retry_after, request.id)
        limits = self.config.limits
        if not state.bucket.take(self.now, limits.rate, limits.burst):
            self.stats[_S_RATE_LIMITED] += 1
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
            self.proxied.append(
                ProxiedPublish(conn, request.id, request.key, room, state.user, content)
            )
            self.proxy_waiting += 1
            return
        self._sequence(conn, state, room, content, request.id, request.key)

    def publish_answered(
        self, items: list[ProxiedPublish[C]], verdicts: list[Verdict] | None, reason: str = ""
    ) -> None:
        """The publish proxy's verdicts on ``items``, in order; None: it did not answer
        (each sender gets ``unavailable`` with ``reason``, nothing is sequenced)."""
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
                self._sequence(conn, state, RoomId(item.room), content, item.request_id, item.key)
            except ProtocolError as exc:
                self._refuse(conn, state, exc)

    def _sequence(
        self,
        conn: C,
        state: ConnState,
        room: RoomId,
        content: str,
        request_id: str | None,
        key: str | None,
    ) -> None:
        self.stats[_S_PUBLISHED] += 1
        self._msg_counter += 1
        msg_id = self._msg_prefix + str(self._msg_counter)
        self._pending[msg_id] = (conn, request_id)
        if "message" in self.hook_kinds:
            self._pending_messages[msg_id] = (state.conn_id, state.user, content)
        now = self.now
        publication = Publication(
            msg_id,
            room,
            state.user,
            content,
            int(self.wall * 1000),
            int(now * 1e9),
            idempotency_key(state.user, room, key),
        )
        log_event(log, logging.DEBUG, "publish", conn=state.conn_id, room=room, msg=msg_id)
        self.broker.publish(publication, now)

    def _join(self, conn: C, state: ConnState, request: Join) -> None:
        room = request.room
        self._check_allowed(state, room, request.id)
        state.joining += 1  # until _join_answered, or a refusal on the way
        try:
            # A broker that carries only the rooms it is asked for (Redis) subscribes
            # and loads the room's state at its first join here, and again after it
            # lost Redis for a while: the join waits for that.
            if self.broker.open_room(room, lambda: self._join_opened(conn, request)):
                self._join_open(conn, state, request)
        except ProtocolError as exc:
            self._refuse(conn, state, exc)
            self._join_done(conn, state)

    def _join_opened(self, conn: C, request: Join) -> None:
        state = self.conns.get(conn)
        if state is None:
            return  # gone while the broker opened the room
        try:
            self._join_open(conn, state, request)
        except ProtocolError as exc:
            self._refuse(conn, state, exc)
            self._join_done(conn, state)

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

    def _join_done(self, conn: C, state: ConnState) -> None:
        """One of the connection's joins ended (answered or refused). Once none is
        in flight, what the connection sent meanwhile is taken at the end of the
        turn (:meth:`take_deferred`): not here, which may be inside the broker's
        reading of a ring, and not by recursion (a replayed join can end at once)."""
        state.joining -= 1
        if not state.joining and state.deferred:
            self._replays.append(conn)

    def take_deferred(self) -> None:
        """At the end of the turn, before the broker commits: the requests that
        waited for their connection's joins, in order, until a join waits again
        (the rest then waits for it). Their publishes are committed with the turn,
        so that no frame or ack of theirs leaves before its record is kept."""
        replays, self._replays = self._replays, []
        for conn in replays:
            state = self.conns.get(conn)
            if state is None:
                continue  # closed since its join ended
            while not state.joining and state.deferred:
                self._take(conn, state, state.deferred.pop(0))
            if not state.joining:
                state.deferred = None

    def _join_open(self, conn: C, state: ConnState, request: Join) -> None:
        # A room this engine dropped (idle, no members here) is fetched back first,
        # so that `since`, and a later `history`, are answered from everything the
        # server holds (a join without `since` asks from 0).
        since = 0 if request.since is None else request.since
        self._drop_partial(request.room)
        if self.gaps.ensure_history(
            request.room, since, self.now, lambda: self._join_ready(conn, request)
        ):
            self._join_ready(conn, request)

    def _join_ready(self, conn: C, request: Join) -> None:
        """The room's history is here: ask who is in it (for ``limits.room_size``
        and ``joined.users``), from the latest state."""
        state = self.conns.get(conn)
        if state is None:
            return  # gone while the room's history was being fetched
        # Catch up and deliver what is queued: the joiner's live frames start
        # right after the log's current seq, and a holder answers from the latest.
        self.broker.catch_up()
        answer = self.broker.presence(
            request.room,
            state.user,
            self.config.presence.list_limit,
            lambda answer: self._join_answered(conn, request, answer),
        )
        if answer is not None:
            self._join_answered(conn, request, answer)

    def _join_answered(self, conn: C, request: Join, answer: PresenceAnswer | None) -> None:
        """The room's users, as its presence holder knows them: the joiner becomes a
        member now, with nothing read in between, so that it hears every event
        after the answer and none before."""
        state = self.conns.get(conn)
        if state is None:
            return  # gone while its broker asked
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
        self._join_done(conn, state)

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
        self.out += self.fanout.flush(self.now, snapshot=True)
        log_ = self._log(room)
        self.members.setdefault(room, {})[conn] = None
        self.stats[_S_JOINS] += 1
        self.stats[_S_ROOMS] = len(self.members)
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
            self.out.append(((conn,), Paced([held.payload for held in replay.messages])))

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
            self.stats[_S_LEAVES] += 1
            self.stats[_S_ROOMS] = len(self.members)
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
            lambda answer: self._presence_answered(conn, request, answer),
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
        if self.gaps.ensure_history(
            request.room, 0, self.now, lambda: self._finish_history(conn, request)
        ):
            self._finish_history(conn, request)

    def _finish_history(self, conn: C, request: HistoryQuery) -> None:
        if conn not in self.conns:
            return  # gone while the room's history was being fetched
        room = request.room
        self.broker.catch_up()
        self.out += self.fanout.flush(self.now, snapshot=True)
        log_ = self.logs.get(room)
        held = [] if log_ is None else log_.page(request.since, request.before, request.limit)
        if held:
            self.out.append(((conn,), Paced([message.payload for message in held])))
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

    def _event(
        self, kind: str, state: ConnState, room: str | None, fields: dict[str, object] | None
    ) -> None:
        self.events.append(HookEvent(kind, state.user, room, state.conn_id, self.wall, fields))

    def _reply(self, conn: C, obj: dict[str, object]) -> None:
        self.out.append(((conn,), wire.text_frame(wire.encode(obj))))

    def _send(self, conn: C, payload: bytes) -> None:
        self.out.append(((conn,), wire.text_frame(payload)))

    def _count_hook_errors(self) -> None:
        hooks = self.hooks
        if hooks.errors:
            self.stats[_S_HOOK_ERRORS] += hooks.errors
            hooks.errors = 0

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
        counters = self.stats
        counters[stats.latency_slot(ns / 1e6)] += 1
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
            log_event(log, logging.INFO, "rooms_dropped", count=len(dropped), kept=len(self.logs))

    # Fan-out

    @property
    def flush_due(self) -> bool:
        """Frames are queued for the end of the turn (or requests that waited for a
        join are to be taken there: :meth:`take_deferred`)."""
        return self.fanout.due or bool(self._replays)

    def flush(self) -> list[Output[C]]:
        """The end of the caller's loop turn: each room's queued frames, joined once,
        for its local members. The caller writes them at once (the member dicts
        are live)."""
        return self.fanout.flush(self.now)

    # Timers

    def tick(self) -> float | None:
        """Resends, gap deadlines and idle rooms, at the time of the last
        :meth:`advance`; returns the next time a tick is needed (None: no
        deadline of the engine's own)."""
        now = self.now
        deadline: float | None = None
        if self.reliable.rooms:
            out, deadline = self.reliable.resend_due(now, self.logs)
            self.out += out
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
                self.out.append(((conn,), Close(AppCloseCode.TOKEN_EXPIRED, "token expired")))
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

    # BrokerListener

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
                self.events.append(HookEvent("message", user, room, conn_id, self.wall, fields))
        if self.api_pending:
            api = self.api_pending.pop(msg_id, None)
            if api is not None:
                api(seq)
                return
        pending = self._pending.pop(msg_id, None)
        if pending is None or pending[0] not in self.conns:
            return
        conn, request_id = pending
        ack: dict[str, object] = {"type": "ack", "room": room, "seq": seq}
        if request_id is not None:
            ack["id"] = request_id
        self._reply(conn, ack)

    def on_publish_failed(self, msg_id: str, room: str) -> None:
        self._pending_messages.pop(msg_id, None)
        if self.api_pending:
            api = self.api_pending.pop(msg_id, None)
            if api is not None:
                api(None)
                return
        pending = self._pending.pop(msg_id, None)
        log_event(log, logging.ERROR, "publish_failed", msg=msg_id, room=room)
        if pending is None:
            return
        conn, request_id = pending
        state = self.conns.get(conn)
        if state is not None:
            reason = (
                f"room {room}: the message is not known to be published (its broker did"
                " not confirm it); retrying with the same key is safe"
            )
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
        self.out.append((targets, frame))

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
            log_event(log, logging.WARNING, "room_epoch_changed", room=room, epoch=epoch)
            waiting = self.gaps.restart(room)
            log_ = self.logs[room] = RoomLog(epoch, self.history, 0, self.now)
            members = self.members.get(room)
            if members:
                self.out.append((list(members), Close(1012, "room history was reset")))
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
