"""The server API's inputs to the room engine: what a call asks of one engine.

A server-side publish (acked through a callback instead of a connection), a
user's connections joining or leaving a room as if each had asked (the
usual ``joined``/``left`` frames and presence events), a user's connections
closed, a history page, and this engine's share of presence and rooms. Each
acts on this engine's connections only: the shard carries a call to the
other engines as a control record (:mod:`shardchat.shard.apiserver`). Pure.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from shardchat.core.broker import Publication, idempotency_key
from shardchat.core.errors import ProtocolError
from shardchat.core.messages import Join, Leave, RoomId
from shardchat.core.outputs import Close
from shardchat.core.overload import Queue, overloaded
from shardchat.core.roomlog import HeldMessage

if TYPE_CHECKING:
    from shardchat.core.engine import RoomEngine

__all__ = [
    "close_user",
    "history",
    "join_user",
    "leave_user",
    "local_presence",
    "local_rooms",
    "publish",
]


def publish(
    engine: RoomEngine[Any],
    room: str,
    sender: str,
    content: str,
    key: str | None,
    then: Callable[[int | None], None],
) -> ProtocolError | None:
    """Publish ``content`` into ``room`` as ``sender``; ``then(seq)`` once sequenced,
    ``then(None)`` when it is not known to be. ``key`` deduplicates as the
    WebSocket's ``key`` does, per (sender, room, key). Returns the ``overloaded``
    refusal instead when a bounded queue is full (admission control, as for a
    client's publish); nothing is sent then."""
    overload = engine.config.overload
    full = engine.broker.full(room)
    if full is None and engine.fanout.turn_bytes > overload.turn_bytes:
        full = Queue.TURN
    if full is not None:  # counted as the API's refusal (shardchat_api_refused)
        return overloaded(full, overload.retry_after, None)
    engine._msg_counter += 1
    msg_id = engine._msg_prefix + str(engine._msg_counter)
    engine.api_pending[msg_id] = then
    now = engine.now
    publication = Publication(
        msg_id,
        room,
        sender,
        content,
        int(engine.wall * 1000),
        int(now * 1e9),
        idempotency_key(sender, room, key),
    )
    engine.broker.publish(publication, now)
    return None


def _users_conns(engine: RoomEngine[Any], user: str) -> list[Any]:
    # A walk of the engine's connections: the API's calls are rare next to the
    # chat's, and the engine keeps no index by user for them.
    return [c for c, state in engine.conns.items() if state.user == user and state.opened]


def join_user(engine: RoomEngine[Any], user: str, room: str) -> int:
    """Every open connection of ``user`` here joins ``room`` as if it had asked;
    returns how many were asked."""
    conns = _users_conns(engine, user)
    for conn in conns:
        state = engine.conns[conn]
        if room in state.rooms:
            continue
        try:
            engine._join(conn, state, Join(room=RoomId(room)))
        except ProtocolError as exc:
            engine._refuse(conn, state, exc)
    return len(conns)


def leave_user(engine: RoomEngine[Any], user: str, room: str) -> int:
    """Every connection of ``user`` here in ``room`` leaves it as if it had asked."""
    left = 0
    for conn in _users_conns(engine, user):
        state = engine.conns[conn]
        if room in state.rooms:
            engine._leave(conn, state, Leave(room=RoomId(room)))
            left += 1
    return left


def close_user(engine: RoomEngine[Any], user: str, code: int, reason: str) -> int:
    """Close every open connection of ``user`` here with ``code`` and ``reason``."""
    conns = _users_conns(engine, user)
    if conns:
        engine.out.append((conns, Close(code, reason)))
    return len(conns)


def history(
    engine: RoomEngine[Any],
    room: str,
    since: int | None,
    before: int | None,
    limit: int,
    then: Callable[[list[HeldMessage], str, int], None],
) -> None:
    """A page of ``room``'s history as ``history`` on the WebSocket answers it:
    ``then(messages, epoch, latest seq)``, once the engine holds the room's log
    (fetched back first when it dropped it)."""

    def answer() -> None:
        engine.broker.catch_up()
        log_ = engine.logs.get(room)
        if log_ is None:
            then([], engine._epoch(room), engine.broker.latest_seq(room) or 0)
            return
        then(log_.page(since, before, limit), log_.epoch, log_.seq)

    # Read what was acked before the call: a log that is behind the broker's
    # latest seq (the owner's record not read yet) is filled up to it first.
    engine.broker.catch_up()
    acked = 0 if room not in engine.logs else engine.broker.latest_seq(room) or 0
    if engine.gaps.ensure_history(room, acked, engine.now, answer):
        answer()


def local_presence(engine: RoomEngine[Any], room: str) -> dict[str, int]:
    """This engine's users of ``room`` and their connections in it."""
    return dict(engine.presence.local.get(room, {}))


def local_rooms(engine: RoomEngine[Any]) -> dict[str, dict[str, int]]:
    """Every room with members here: its users and their connections."""
    return {room: dict(users) for room, users in engine.presence.local.items()}
