"""The server API's answers as typed dictionaries (docs/api.yaml has the schemas)."""

from __future__ import annotations

from typing import Any, TypedDict

__all__ = [
    "BroadcastReply",
    "HistoryResult",
    "InfoResult",
    "PresenceResult",
    "PresenceStatsResult",
    "PublishResult",
    "RoomsResult",
]


class PublishResult(TypedDict):
    seq: int
    epoch: str


class BroadcastReply(TypedDict, total=False):
    room: str
    result: PublishResult
    error: dict[str, str]


class PresenceUser(TypedDict):
    user: str
    connections: int


class PresenceResult(TypedDict, total=False):
    room: str
    count: int
    connections: int
    users: list[PresenceUser]
    truncated: bool


class PresenceStatsResult(TypedDict):
    room: str
    users: int
    connections: int


class HistoryResult(TypedDict):
    room: str
    epoch: str
    seq: int
    messages: list[dict[str, Any]]


class RoomEntry(TypedDict):
    room: str
    users: int
    connections: int


class RoomsResult(TypedDict):
    rooms: list[RoomEntry]
    cursor: str | None


class InfoResult(TypedDict):
    version: str
    broker: str
    broker_up: bool
    node: str
    uptime: float
    connections: int
    boxes: int
    shards: list[dict[str, Any]]
