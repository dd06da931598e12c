"""Client requests and the small enums every layer shares.

Frozen, slotted, keyword-only dataclasses: one per client request type of
PROTOCOL.md. The decoder in :mod:`shardchat.core.wire` builds them; the shard
dispatches on their class.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import NewType

__all__ = [
    "Ack",
    "AppCloseCode",
    "ClientMessage",
    "HistoryQuery",
    "Join",
    "Leave",
    "Ping",
    "PresenceQuery",
    "Publish",
    "RoomId",
]

RoomId = NewType("RoomId", str)


class AppCloseCode(enum.IntEnum):
    """shardchat's own WebSocket close codes (PROTOCOL.md, 4000-4999 range)."""

    DISCONNECTED_RECONNECT = 4400  # the server API disconnected the user: may reconnect
    TOKEN_EXPIRED = 4401  # the token's exp passed: reconnect with a fresh one
    DISCONNECTED = 4403  # the server API disconnected the user: do not reconnect
    HEARTBEAT_TIMEOUT = 4408
    ACK_TIMEOUT = 4409
    SLOW_CONSUMER = 4429


@dataclass(frozen=True, slots=True, kw_only=True)
class Join:
    room: RoomId
    since: int | None = None  # replay messages with seq > since first
    epoch: str | None = None  # the epoch `since` belongs to
    id: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Leave:
    room: RoomId
    id: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Publish:
    room: RoomId
    content: str
    id: str | None = None  # client's request id, echoed in the ack; never a dedupe key
    key: str | None = None  # client's idempotency key (PROTOCOL.md, Extensions)


@dataclass(frozen=True, slots=True, kw_only=True)
class Ack:
    room: RoomId
    seq: int
    id: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Ping:
    echo: dict[str, object]  # every field the client sent but `type`
    id: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class PresenceQuery:
    room: RoomId
    id: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class HistoryQuery:
    room: RoomId
    since: int | None = None  # the oldest `limit` after it; without: the latest `limit`
    limit: int | None = None
    before: int | None = None  # only messages with seq < before ("load older")
    id: str | None = None


ClientMessage = Join | Leave | Publish | Ack | Ping | PresenceQuery | HistoryQuery
