"""The shard's request handling: connections in, requests decoded, replies out.

:class:`Hub` is the :class:`~shardchat.connection.ConnectionHandler` of one
shard. It admits or refuses upgrades, decodes client frames
(:mod:`shardchat.wire`), enforces the per-connection limits, and hands room
work to the shard's :class:`~shardchat.router.Router`.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import heapq
import logging
import re
import secrets
import time
from pathlib import Path
from urllib.parse import parse_qsl

from websockets.http11 import Request

from . import stats, wire
from .addrtable import addr_key
from .auth import verifier_from_config
from .config import Config
from .connection import Connection
from .errors import AuthError, ProtocolError
from .hooks import ConnectInfo, ConnInfo, Hooks, Reject
from .messages import (
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
from .obs import log_event
from .ratelimit import TokenBucket
from .router import Router

__all__ = ["SWEEP_SLICES", "ConnState", "Hub"]

log = logging.getLogger(__name__)

PROTOCOL_VERSION = 1
# A pass over every connection takes this many sweep calls: with 12,500
# connections a call ticks 250 of them, a pause of well under a millisecond.
SWEEP_SLICES = 50
_CHAT_PAGE = Path(__file__).with_name("static") / "index.html"


_S_CONNECTIONS = int(stats.Slot.CONNECTIONS)
_S_OPENED = int(stats.Slot.CONNECTIONS_OPENED)
_S_PUBLISHED = int(stats.Slot.MESSAGES_PUBLISHED)
_S_RATE_LIMITED = int(stats.Slot.RATE_LIMITED)
_S_SLOW = int(stats.Slot.SLOW_CONSUMER_CLOSES)
_S_HOOK_ERRORS = int(stats.Slot.HOOK_ERRORS)
_S_REFUSED = int(stats.Slot.HTTP_REFUSED)
# The errors of a broken client: max_errors of them in a row close it with 1008.
_MALFORMED = frozenset({"bad_json", "bad_request", "unknown_type", "too_large", "not_member"})


def _page_csp(page: bytes) -> str:
    """The chat page's Content-Security-Policy: its own inline script and style by
    hash, WebSockets to this origin, nothing else (no framing, no other origins)."""
    hashes = {
        kind: " ".join(
            "'sha256-" + base64.b64encode(hashlib.sha256(body).digest()).decode() + "'"
            for body in re.findall(rb"<" + kind.encode() + rb">(.*?)</" + kind.encode(), page, re.S)
        )
        for kind in ("script", "style")
    }
    return (
        f"default-src 'none'; script-src {hashes['script']}; style-src {hashes['style']}; "
        "connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    )


class ConnState:
    """The hub's per-connection state, kept in ``Connection.data`` once admitted."""

    __slots__ = ("allowed_rooms", "bucket", "errors", "info", "opened", "rooms")

    def __init__(self, bucket: TokenBucket, allowed_rooms: frozenset[str] | None) -> None:
        self.rooms: set[RoomId] = set()  # rooms this connection has joined
        self.errors = 0  # consecutive refused requests
        self.bucket = bucket
        self.allowed_rooms = allowed_rooms  # from the token's `rooms` claim; None = any
        self.info: ConnInfo | None = None  # what hooks see; set when hooks are loaded
        self.opened = False  # the upgrade completed


class Hub:
    """One shard's connections and their requests."""

    def __init__(
        self,
        config: Config,
        shard_id: int,
        router: Router,
        loop: asyncio.AbstractEventLoop,
        counters: stats.StatsView,
        hooks: Hooks,
    ) -> None:
        self.config = config
        self.shard_id = shard_id
        self.router = router
        self.loop = loop
        self.counters = counters
        assert counters.mine is not None
        self.stats = counters.mine
        self.hooks = hooks
        self.open_count = 0  # upgraded connections
        self.clock = loop.time()
        limits = config.limits
        self.heartbeat_interval = config.heartbeat.interval
        self.max_frame = limits.max_frame
        self.send_queue = limits.send_queue
        self.draining = False
        self.all_closed = asyncio.Event()
        self.connections: set[Connection] = set()
        # Open connections per client address on every shard (None: max_per_ip off).
        self.addrs = counters.addrs
        self._next_conn_id = 0
        self._chat_page = _CHAT_PAGE.read_bytes()
        self.page_csp = _page_csp(self._chat_page)
        # RFC 6454 4: an origin's scheme and host compare case-insensitively.
        self._origins = frozenset(origin.lower() for origin in config.server.origins)
        self.verifier = verifier_from_config(config.auth)
        # (loop time its token expires, conn id, connection): closed with 4401 then.
        self._expiries: list[tuple[float, int, Connection]] = []
        # A whole-server limit, split evenly: the kernel spreads connections evenly.
        self._max_local = -(-config.server.max_connections // config.workers)
        self.accepted_total = 0
        self._sweep_list: list[Connection] = []  # this pass's connections
        self._sweep_at = 0  # the next of them to tick

    # Connection lifecycle (ConnectionHandler)

    def new_connection(self) -> Connection:
        self._next_conn_id += 1
        conn = Connection(self, self._next_conn_id)
        self.connections.add(conn)
        self.accepted_total += 1
        return conn

    def http_get(self, path: str) -> tuple[int, str, bytes]:
        if path == "/healthz":
            if self.draining:
                return 503, "text/plain; charset=utf-8", b"draining\n"
            return 200, "text/plain; charset=utf-8", b"ok\n"
        if path in ("/", "/index.html"):
            return 200, "text/html; charset=utf-8", self._chat_page
        return 404, "text/plain; charset=utf-8", b"not found\n"

    def refuse_upgrade(
        self, conn: Connection, request: Request, query: str
    ) -> tuple[int, str] | None:
        refusal = self._admit(conn, request, query)
        if refusal is not None:
            self.stats[_S_REFUSED] += 1
        return refusal

    def _admit(self, conn: Connection, request: Request, query: str) -> tuple[int, str] | None:
        """PROTOCOL.md's checks before the upgrade; admits by setting ``conn.data``."""
        server = self.config.server
        if self.draining:
            return 503, "server is shutting down\n"
        if server.origins:
            # Browsers always send Origin on a WebSocket upgrade; the allow-list guards
            # against other sites' pages (CSWSH). Clients that are not browsers send none.
            origin = request.headers.get("Origin")
            if origin is not None and origin.lower() not in self._origins:
                return 403, "origin not allowed\n"
        params = parse_qsl(query, keep_blank_values=True)
        for key, value in params:
            if key in ("user", "room") and not wire.is_valid_name(value):
                return 400, f"{key} must be 1-64 characters of [A-Za-z0-9_.:-]\n"
        # Upgraded connections on every shard. Handshakes under way do not count: the
        # admission of one is synchronous (no other can slip in on this shard), and
        # half-open ones (slow-loris) must not lock real clients out; they are
        # bounded by the handshake deadline instead.
        if self.counters.total(_S_CONNECTIONS) >= server.max_connections:
            return 503, "server is full\n"
        addrs = self.addrs
        if addrs is not None and addrs.total(addr_key(conn.peer)) >= server.max_per_ip:
            return 503, "too many connections from this address\n"
        allowed: frozenset[str] | None = None
        verifier = self.verifier
        if verifier is not None:
            token = next((v for k, v in params if k == "token"), None)
            scheme, _, credentials = request.headers.get("Authorization", "").partition(" ")
            # RFC 7235 2.1: the auth scheme is case-insensitive.
            if token is None and scheme.lower() == "bearer":
                token = credentials.strip()
            if not token:
                return 401, "a token is required (?token= or Authorization: Bearer)\n"
            try:
                identity = verifier.verify(token)
            except AuthError as exc:
                return 401, f"{exc}\n"
            conn.user = identity.user
            allowed = identity.rooms
            if identity.expires is not None:
                # Closed with 4401 when it expires: in loop time, checked by the sweep.
                at = self.clock + identity.expires - time.time()
                heapq.heappush(self._expiries, (at, conn.conn_id, conn))
        else:
            user = next((v for k, v in params if k == "user"), None)
            conn.user = user or f"guest-{secrets.token_hex(2)}"
        if self.hooks.has_connect:
            info = ConnectInfo(
                self.shard_id,
                conn.peer,
                conn.user,
                request.path,
                {k: v for k, v in request.headers.raw_items()},
                tuple(v for k, v in params if k == "room"),
            )
            reason = self.hooks.on_connect(info)
            self._count_hook_errors()
            if reason is not None:
                return 403, f"{reason}\n"
        conn.data = ConnState(TokenBucket(self.config.limits.burst, self.clock), allowed)
        return None

    def _count_hook_errors(self) -> None:
        if self.hooks.errors:
            self.stats[_S_HOOK_ERRORS] += self.hooks.errors
            self.hooks.errors = 0

    def opened(self, conn: Connection, query: str) -> None:
        state = conn.data
        assert isinstance(state, ConnState)
        user = conn.user
        state.opened = True
        if self.addrs is not None:
            self.addrs.add(addr_key(conn.peer))
        self.open_count += 1
        self.stats[_S_CONNECTIONS] = self.open_count
        self.stats[_S_OPENED] += 1
        interval = self.heartbeat_interval
        self._reply(
            conn,
            {
                "type": "welcome",
                "user": user,
                "shard": self.shard_id,
                "heartbeat": int(interval) if interval.is_integer() else interval,
                "protocol": PROTOCOL_VERSION,
            },
        )
        log_event(log, logging.INFO, "conn_open", conn=conn.conn_id, user=user, peer=conn.peer)
        if self.hooks.app is not None:
            state.info = ConnInfo(self.shard_id, conn.conn_id, user, conn.peer)
            if self.hooks.has_open:
                self.hooks.on_open(state.info)
                self._count_hook_errors()
        for key, value in parse_qsl(query):
            if key == "room":
                try:
                    self._join(conn, Join(room=RoomId(value)))
                except ProtocolError as exc:
                    self._refuse(conn, state, exc)

    def closed(self, conn: Connection) -> None:
        self.connections.discard(conn)
        if self.draining and not self.connections:
            self.all_closed.set()
        state = conn.data
        if not isinstance(state, ConnState) or not state.opened:
            return  # never upgraded
        for room in state.rooms:
            self.router.leave(conn, room)
        state.rooms.clear()
        self.router.forwarder.forget(conn)
        if self.addrs is not None:
            self.addrs.remove(addr_key(conn.peer))
        self.open_count -= 1
        code, reason = conn.close_code, conn.close_reason
        stats_ = self.stats
        stats_[_S_CONNECTIONS] = self.open_count
        stats_[stats.close_code_slot(code)] += 1
        if code == 4429:
            stats_[_S_SLOW] += 1
        log_event(
            log,
            logging.INFO,
            "conn_close",
            conn=conn.conn_id,
            user=conn.user,
            code=code,
            reason=reason,
        )
        if self.hooks.has_close and state.info is not None:
            self.hooks.on_close(state.info, code, reason)
            self._count_hook_errors()

    def text_received(self, conn: Connection, data: bytes | bytearray | memoryview) -> None:
        state = conn.data
        assert isinstance(state, ConnState)
        try:
            request = wire.decode(data, self.config.limits.max_content)
            self._dispatch(conn, state, request)
        except ProtocolError as exc:
            if exc.code == "bad_json" and not _is_utf8(data):
                conn.fail(1007, "invalid UTF-8")
                return
            self._refuse(conn, state, exc)
        else:
            state.errors = 0

    # Requests

    def _dispatch(self, conn: Connection, state: ConnState, request: ClientMessage) -> None:
        # The token's rooms claim covers every request that names a room.
        if state.allowed_rooms is not None and not isinstance(request, Ping):
            self._check_allowed(state, request.room, request.id)
        if type(request) is Publish:
            self._publish(conn, state, request)
        elif type(request) is Join:
            self._join(conn, request)
        elif type(request) is Leave:
            self._leave(conn, state, request)
        elif type(request) is Ping:
            self._reply_raw(conn, wire.pong_payload(request.echo, request.id))
        elif type(request) is PresenceQuery:
            self._presence(conn, request)
        elif type(request) is HistoryQuery:
            self._history(conn, request)
        elif type(request) is Ack:
            self._require_member(state, request.room, request.id)
            self.router.ack(conn, request.room, request.seq)

    def _refuse(self, conn: Connection, state: ConnState, exc: ProtocolError) -> None:
        self._reply_raw(conn, wire.error_payload(exc.code, exc.reason, exc.request_id))
        if exc.code in stats.ERROR_CODES:
            self.stats[stats.error_slot(exc.code)] += 1
        if exc.code not in _MALFORMED:
            return  # a refusal by policy (rate, room size, token, hook) is not a broken client
        state.errors += 1
        if state.errors >= self.config.limits.max_errors:
            conn.fail(1008, "too many errors")

    @staticmethod
    def _check_allowed(state: ConnState, room: RoomId, request_id: str | None) -> None:
        if state.allowed_rooms is not None and room not in state.allowed_rooms:
            raise ProtocolError(
                "unauthorized", f"your token does not allow room {room}", request_id
            )

    @staticmethod
    def _require_member(state: ConnState, room: RoomId, request_id: str | None) -> None:
        if room not in state.rooms:
            raise ProtocolError("not_member", f"not a member of room {room}", request_id)

    def _publish(self, conn: Connection, state: ConnState, request: Publish) -> None:
        room = request.room
        self._require_member(state, room, request.id)
        limits = self.config.limits
        if not state.bucket.take(self.loop.time(), limits.rate, limits.burst):
            self.stats[_S_RATE_LIMITED] += 1
            raise ProtocolError("rate_limited", "too many messages; slow down", request.id)
        content = request.content
        if self.hooks.has_message and state.info is not None:
            try:
                content = self.hooks.on_message(state.info, room, content)
            except Reject as exc:
                raise ProtocolError("rejected", exc.reason, request.id) from None
            finally:
                self._count_hook_errors()
            if len(content.encode()) > limits.max_content:
                raise ProtocolError(
                    "too_large", f"content is over {limits.max_content} bytes", request.id
                )
        self.stats[_S_PUBLISHED] += 1
        msg_id = self.router.publish(conn, room, content, request.id)
        log_event(log, logging.DEBUG, "publish", conn=conn.conn_id, room=room, msg=msg_id)

    def _join(self, conn: Connection, request: Join) -> None:
        state = conn.data
        assert isinstance(state, ConnState)
        room = request.room
        self._check_allowed(state, room, request.id)
        room_size = self.config.limits.room_size
        if room_size and room not in state.rooms:
            # The presence view is as fresh as the rings: read them first. Joins on
            # several shards at the same instant can still overshoot by a few.
            self.router.bus.drain()
            presence = self.router.presence
            if not presence.has(room, conn.user) and presence.count(room) >= room_size:
                raise ProtocolError("room_full", f"room {room} has {room_size} users", request.id)
        # A room this shard dropped (idle, no members here) is fetched back from its
        # owner first, so that `since`, and a later `history`, are answered from
        # everything the server holds (a join without `since` asks from 0).
        since = 0 if request.since is None else request.since
        if not self.router.gaps.ensure_history(
            room, since, lambda: self._finish_join(conn, request)
        ):
            return
        self._finish_join(conn, request)

    def _finish_join(self, conn: Connection, request: Join) -> None:
        state = conn.data
        assert isinstance(state, ConnState)
        if conn.out is None and not conn.is_open:
            return  # gone while the room's history was being fetched
        room = request.room
        if room in state.rooms:
            self.router.leave(conn, room)
        log_ = self.router.join(conn, room)
        state.rooms.add(room)
        users = self.router.users(room)
        joined: dict[str, object] = {
            "type": "joined",
            "room": room,
            "seq": log_.seq,
            "epoch": log_.epoch,
            "count": len(users),
            "users": users[: self.config.presence.list_limit],
        }
        if request.since is None:
            self._reply(conn, joined)
            return
        replay = log_.replay(request.since, request.epoch)
        joined["recovered"] = replay.recovered
        self._reply(conn, joined)
        for held in replay.messages:
            conn.send(wire.text_frame(held.payload))

    def _leave(self, conn: Connection, state: ConnState, request: Leave) -> None:
        room = request.room
        self._require_member(state, room, request.id)
        state.rooms.discard(room)
        self.router.leave(conn, room)
        self._reply(conn, {"type": "left", "room": room})

    def _presence(self, conn: Connection, request: PresenceQuery) -> None:
        room = request.room
        users = self.router.users(room)
        limit = self.config.presence.list_limit
        reply: dict[str, object] = {
            "type": "presence",
            "room": room,
            "count": len(users),
            "users": users[:limit],
        }
        if len(users) > limit:
            reply["truncated"] = True
        self._reply(conn, reply)

    def _history(self, conn: Connection, request: HistoryQuery) -> None:
        room = request.room
        # A room this shard has no copy of (dropped as idle) is fetched from its owner.
        if not self.router.gaps.ensure_history(room, 0, lambda: self._history(conn, request)):
            return
        if conn.out is None and not conn.is_open:
            return  # gone while the room's history was being fetched
        held = self.router.replay(room, request.since, request.before, request.limit)
        for message in held:
            conn.send(wire.text_frame(message.payload))
        last = held[-1].seq if held else request.since or 0
        self._reply(conn, {"type": "history_end", "room": room, "seq": last})

    def _reply(self, conn: Connection, obj: dict[str, object]) -> None:
        conn.send(wire.text_frame(wire.encode(obj)))

    def _reply_raw(self, conn: Connection, payload: bytes) -> None:
        conn.send(wire.text_frame(payload))

    # Shard duties

    def sweep(self, now: float) -> None:
        """One slice of the shard's sweep (``SWEEP_SLICES`` slices a tick): heartbeats
        and timeouts of a slice of the connections, so that no single pause grows with
        all of them; the router's timers once per full pass."""
        self.clock = now
        if self._sweep_at >= len(self._sweep_list):
            self._sweep_list = list(self.connections)
            self._sweep_at = 0
            self.router.sweep(now)
        expiries = self._expiries
        if len(expiries) > 2 * self.open_count + 1024:
            # Closed connections wait in the heap until their exp: drop them now and then.
            expiries[:] = [entry for entry in expiries if entry[2].transport is not None]
            heapq.heapify(expiries)
        while expiries and expiries[0][0] <= now:
            _, _, conn = heapq.heappop(expiries)
            if conn.is_open:
                # An extension of PROTOCOL.md: reconnect with a fresh token.
                conn.close(AppCloseCode.TOKEN_EXPIRED, "token expired")
        hb = self.config.heartbeat
        interval, timeout, idle = hb.interval, hb.timeout, hb.idle_timeout
        start = self._sweep_at
        end = start + -(-len(self._sweep_list) // SWEEP_SLICES)
        for conn in self._sweep_list[start:end]:
            conn.tick(now, interval, timeout, idle)
        self._sweep_at = end

    def drain(self) -> None:
        """Stop taking connections and close every open one with 1001 ``shutdown``."""
        self.draining = True
        self.router.flush()
        if not self.connections:
            self.all_closed.set()
        for conn in list(self.connections):
            if conn.is_open:
                conn.close(1001, "shutdown")
            elif conn.close_deadline == 0.0:
                conn.abort()


def _is_utf8(data: bytes | bytearray | memoryview) -> bool:
    try:
        bytes(data).decode()
    except UnicodeDecodeError:
        return False
    return True
