"""The server API's inputs to the room engine: what a call asks of one engine.

A server-side publish (answered through a callback instead of a connection), a
user's connections joining or leaving a room as if each had asked (the
usual ``joined``/``left`` frames and presence events), a user's connections
closed, a history page, and this engine's share of presence and rooms. Each
acts on this engine's connections only: the shard carries a call to the
other engines as a control record (:mod:`shardchat.shard.apiserver`). Thin
wrappers over the engine's own inputs (``RoomEngine.publish_as`` and the
others, :mod:`shardchat.core.engine`). Pure.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import orjson

from shardchat.core.errors import ProtocolError
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
    WebSocket's ``key`` does, per (sender, room, key). Returns the
    ``overloaded`` refusal instead when a bounded queue is full (admission
    control, as for a client's publish); nothing is sent then. ``then`` is the
    engine's call token: the shard calls it when it writes the engine's
    :class:`~shardchat.core.outputs.ApiResult`."""
    refusal = engine.overloaded(room)
    if refusal is not None:  # counted as the API's refusal (shardchat_api_refused)
        return refusal
    engine.publish_as(then, room, sender, content, key)
    return None


def join_user(engine: RoomEngine[Any], user: str, room: str) -> int:
    """Every open connection of ``user`` here joins ``room`` as if it had asked;
    returns how many open connections the user has here."""
    return engine.join_user(user, room)


def leave_user(engine: RoomEngine[Any], user: str, room: str) -> int:
    """Every connection of ``user`` here in ``room`` leaves it as if it had asked."""
    return engine.leave_user(user, room)


def close_user(engine: RoomEngine[Any], user: str, code: int, reason: str) -> int:
    """Close every open connection of ``user`` here with ``code`` and ``reason``."""
    return engine.close_user(user, code, reason)


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
    (fetched back first when it dropped it, or behind what was acked)."""
    engine.read_history(room, since, before, limit, then)


def local_presence(engine: RoomEngine[Any], room: str) -> dict[str, int] | list[Any]:
    """This engine's users of ``room`` and their connections in it; with the
    info of those that have one (``[users, {user: info}]``), when any has."""
    users = dict(engine.presence.local.get(room, {}))
    infos: dict[str, Any] = {}
    for conn in engine.members.get(room, ()):  # in join order: the latest join's wins
        state = engine.conns.get(conn)
        if state is not None and state.presence_info is not None:
            infos[state.user] = state.presence_info
    if not infos:
        return users
    return [users, {user: orjson.loads(info) for user, info in infos.items()}]


def local_rooms(engine: RoomEngine[Any]) -> dict[str, dict[str, int]]:
    """Every room with members here: its users and their connections."""
    return {room: dict(users) for room, users in engine.presence.local.items()}
