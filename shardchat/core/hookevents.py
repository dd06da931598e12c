"""What the room engine tells the application's backend, and what it answers. Pure.

The engine appends a :class:`HookEvent` for each kind its caller asked for
(``webhooks.events``); the shard stamps each with an id, its shard and box,
and hands it to the webhook sender (docs/WEBHOOKS.md).
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Generic, NamedTuple, TypeVar

__all__ = ["HookEvent", "ProxiedPublish", "Verdict"]

C = TypeVar("C", bound=Hashable)


class HookEvent(NamedTuple):
    kind: str  # connect, disconnect, join, leave, message, room_occupied, room_vacated
    user: str
    room: str | None
    conn: int | None  # the connection's id within its shard
    time: float  # Unix seconds
    fields: dict[str, object] | None = None  # the kind's own fields (code, reason, seq...)


class ProxiedPublish(NamedTuple, Generic[C]):
    """A client's publish waiting for the publish proxy's verdict."""

    conn: C
    request_id: str | None
    key: str | None  # the client's idempotency key
    room: str
    user: str
    content: str


class Verdict(NamedTuple):
    """The backend's verdict on one publish: keep it (both None), replace its
    content, or refuse it with a reason."""

    content: str | None = None
    reject: str | None = None
