"""What the room engine tells the application's backend: webhook events. Pure.

The engine appends a :class:`HookEvent` for each kind its caller asked for
(``webhooks.events``); the shard stamps each with an id, its shard and box,
and hands it to the webhook sender (docs/WEBHOOKS.md).
"""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["HookEvent"]


class HookEvent(NamedTuple):
    kind: str  # connect, disconnect, join, leave, message, room_occupied, room_vacated
    user: str
    room: str | None
    conn: int | None  # the connection's id within its shard
    time: float  # Unix seconds
    fields: dict[str, object] | None = None  # the kind's own fields (code, reason, seq...)
