"""The Redis broker's presence: our users, announced to Redis, and the rooms' view.

Every node holds the presence of the rooms it has members of (its own users
and, from the rooms' channels, the other nodes'), and computes the join and
leave events itself; a presence query is answered from that view at once.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from shardchat.brokers.presence_holders import answer_of
from shardchat.brokers.redis import hooks as rh
from shardchat.brokers.redis import wire as rw
from shardchat.brokers.redis.client import FAILURES
from shardchat.core.broker import PresenceAnswer

if TYPE_CHECKING:
    from shardchat.brokers.redis.broker import RedisBroker
    from shardchat.brokers.redis.rooms import Room

__all__ = ["announce", "presence", "snapshot"]

_NO_BUDGET = 1 << 62  # answers are not records here: only presence.list_limit cuts them


def announce(
    self: RedisBroker, room: str, user: str, joined: bool, info: str | None = None
) -> None:
    local = self._local.setdefault(room, {})
    if joined:
        if info is not None or user not in local:
            local[user] = info  # the latest join's info is the user's
    else:
        local.pop(user, None)
        if not local:
            del self._local[room]
    if self.up:
        # A join with info is sent even when the entry is there: the info is new.
        self._presence.append((room, user, joined, info is not None, info))
        self._kick()
    self._change(self.shard_id, room, user, joined, info)


def _change(
    self: RedisBroker, peer: int, room: str, user: str, joined: bool, info: str | None = None
) -> None:
    if joined and info is not None:
        self.infos.setdefault(room, {})[user] = info
    if self.view.change(room, user, peer, joined):
        if not joined:
            infos = self.infos.get(room)
            if infos is not None and infos.pop(user, None) is not None and not infos:
                del self.infos[room]
        listener = self.listener
        assert listener is not None
        listener.on_presence_event(room, user, joined, self.view.count(room))


def presence(
    self: RedisBroker,
    room: str,
    user: str,
    limit: int,
    then: Callable[[PresenceAnswer | None], None],
) -> PresenceAnswer | None:
    """From our view: the join waited for open_room, which delivered the room's
    presence; a room with no members here is not followed (empty)."""
    return answer_of(self.view.present.get(room, {}), user, limit, _NO_BUDGET, self.infos.get(room))


def snapshot(self: RedisBroker, peer: int, pairs: list[tuple[str, str]]) -> None:
    """Nothing to do: a peer that restarts reads our presence from Redis."""


async def vacated(self: RedisBroker, room: str) -> bool:
    """Is ``room`` still empty after the grace, and ours to report (webhooks)?"""
    keys = rw.Keys.of(self.prefix, room, time.time())
    try:
        self._count_trip()
        flag = rh.occupied_key(self.prefix, room)
        return bool(await self._script(self.client, "vacate", [keys.presence, flag], []))
    except FAILURES as exc:
        self.failed("vacate", exc)
        return False


def _remote_presence(
    self: RedisBroker,
    room: str,
    state: Room,
    node: str,
    user: str,
    joined: bool,
    info: str | None = None,
) -> None:
    if node == self.node:
        return
    users = state.remote.setdefault(node, set())
    if joined:
        users.add(user)
    else:
        users.discard(user)
    self._change(self._peer(node), room, user, joined, info)
