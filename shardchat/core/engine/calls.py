"""The server's own calls into the engine (the server API): publish as a user, join, leave, close.

Each is an engine input like a client's request, for callers that are not
connections: a publish's answer comes out of ``take_outputs()`` as an
:class:`~shardchat.core.outputs.ApiResult` for the caller's token; joins,
leaves and closes act on the user's connections on this shard, as if each
had asked (or been closed by the server). The reads (``room_members``,
``room_messages``) are in rooms.py.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from shardchat.core import wire
from shardchat.core.errors import ErrorCode
from shardchat.core.messages import (
    HistoryQuery,
    Join,
    Leave,
    RoomId,
)
from shardchat.core.outputs import ApiResult, C, Close
from shardchat.core.roomlog import HeldMessage

if TYPE_CHECKING:
    pass
from shardchat.core.engine.connections import Connections
from shardchat.core.engine.requests import merged
from shardchat.core.engine.state import (
    ConnState,
)


class ServerCalls(Connections[C]):
    """The server calls' part of the engine."""

    __slots__ = ()

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
        refusal = self.overloaded(room) if wire.is_valid_name(room) else None
        if not wire.is_valid_name(room):
            code, reason = ErrorCode.BAD_REQUEST, f"invalid room name {room!r}"
        elif refusal is not None:
            code, reason, retry_after = refusal.code, refusal.reason, refusal.retry_after
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
        fetched: dict[int, bytes] | None = None,
    ) -> None:
        """The page, from the log and, for the seqs it lacks (older than a tail,
        or than what this shard keeps in memory), what the room's holder sent
        back for it alone, as ``history`` on the WebSocket."""
        self._catch_up()
        log_ = self.logs.get(room)
        if log_ is None:
            then([], self._epoch(room), self.broker.latest_seq(room) or 0)
            if fetched is not None:
                self._unpin(room)
            return
        query = HistoryQuery(room=RoomId(room), since=since, limit=limit, before=before)
        if fetched is None and room not in self.gaps.parked:
            missing = self._missing(log_, query)
            if missing is not None:
                self._pin(room)
                answer = self.inbox.later(self._answer_history, room, since, before, limit, then)
                self.fetches.fetch(room, missing[0], missing[1], self.now, answer)
                return
        held = merged(log_, fetched, query) if fetched else log_.page(since, before, limit)
        then(self._unexpired(held), log_.epoch, log_.seq)
        if fetched is not None:
            self._unpin(room)
