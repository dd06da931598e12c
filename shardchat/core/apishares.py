"""The server API's gathered answers: every engine's share merged into one. Pure.

Each engine answers a gathered call with its own share (its users of a room
and their connections, or every room it has members in); the engine that
took the call merges them here: a user present on several shards or boxes
counts once, their connections add up.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from shardchat.core import apicalls as calls

__all__ = ["Finish", "merge_users", "presence", "presence_stats", "rooms"]

Result = dict[str, Any]
Finish = Callable[[list[Any]], Result]


def presence(room: str, limit: int) -> Finish:
    """``presence``: the users by name (at most ``limit`` listed), their connections."""

    def finish(parts: list[Any]) -> Result:
        users = merge_users(parts)
        listed = sorted(users.items())[:limit]
        infos: dict[str, Any] = {}
        for part in parts:
            if isinstance(part, list):
                infos.update(part[1])
        result: Result = {
            "room": room,
            "count": len(users),
            "connections": sum(users.values()),
            "users": [{"user": user, "connections": n} for user, n in listed],
        }
        shown = {user: infos[user] for user, _ in listed if user in infos}
        if shown:
            result["info"] = shown
        if len(users) > limit:
            result["truncated"] = True
        return result

    return finish


def presence_stats(room: str) -> Finish:
    """``presence_stats``: the numbers of users and connections."""

    def finish(parts: list[Any]) -> Result:
        users = merge_users(parts)
        return {"room": room, "users": len(users), "connections": sum(users.values())}

    return finish


def merge_users(parts: list[Any]) -> dict[str, int]:
    """Every engine's users of a room and their connections, added up (a part is
    ``{user: connections}``, or ``[that, {user: info}]`` when some have info)."""
    users: dict[str, int] = {}
    for part in parts:
        counts: dict[str, int] = part[0] if isinstance(part, list) else part
        for user, n in counts.items():
            users[user] = users.get(user, 0) + n
    return users


def rooms(call: calls.Rooms) -> Finish:
    """``rooms``: those matching the pattern after the cursor, by name, one page."""

    def finish(parts: list[Any]) -> Result:
        rooms: dict[str, dict[str, int]] = {}
        for part in parts:
            for room, users in part.items():
                if calls.matches(call.pattern, room) and (
                    call.cursor is None or room > call.cursor
                ):
                    merged = rooms.setdefault(room, {})
                    for user, n in users.items():
                        merged[user] = merged.get(user, 0) + n
        names = sorted(rooms)
        page = names[: call.limit]
        return {
            "rooms": [
                {"room": r, "users": len(rooms[r]), "connections": sum(rooms[r].values())}
                for r in page
            ],
            "cursor": page[-1] if len(names) > len(page) else None,
        }

    return finish
