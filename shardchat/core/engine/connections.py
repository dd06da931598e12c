"""A connection's life in the engine: admitted, opened, its frames received, closed."""

from __future__ import annotations

import heapq
from typing import TYPE_CHECKING

from shardchat.core import wire
from shardchat.core.admission import Admitted, Refusal, Upgrade, admit
from shardchat.core.counters import (
    close_code_slot,
)
from shardchat.core.errors import ErrorCode, ProtocolError
from shardchat.core.interfaces import (
    INFO,
    ConnInfo,
)
from shardchat.core.messages import (
    AppCloseCode,
    Join,
    Ping,
    RoomId,
)
from shardchat.core.outputs import C, Close, Output
from shardchat.core.ratelimit import TokenBucket

if TYPE_CHECKING:
    from shardchat.auth import Identity
from shardchat.core.engine.requests import Requests
from shardchat.core.engine.state import (
    PROTOCOL_VERSION,
    S_CONNECTIONS,
    S_OPENED,
    S_REFUSED,
    S_SLOW,
    ConnState,
    JoinStage,
    PendingJoin,
    is_utf8,
)


class Connections(Requests[C]):
    """The connections' part of the engine."""

    __slots__ = ()

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
            self.counters[S_REFUSED] += 1
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
        self.counters[S_CONNECTIONS] = self.open_count
        self.counters[S_OPENED] += 1
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
        if self.inbox.queue:  # deliver(), inline: once per request
            self._apply_inbox()
        state = self.conns[conn]
        try:
            request = wire.decode(data, self.config.limits.max_content)
        except ProtocolError as exc:
            if exc.code is ErrorCode.BAD_JSON and not is_utf8(data):
                self._close(conn, state, Close(1007, "invalid UTF-8", fail=True))
                return
            self._refuse(conn, state, exc)
            return
        # _request, inline: once per request
        if state.joins and type(request) is not Ping:
            self._defer(conn, state, request)
        else:
            self._take(conn, state, request)

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
        counters[S_CONNECTIONS] = self.open_count
        counters[close_code_slot(code)] += 1
        if code == AppCloseCode.SLOW_CONSUMER:
            counters[S_SLOW] += 1
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
