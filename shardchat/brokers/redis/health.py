"""The Redis broker's health: up or down, the reconnect loop, the resync after it.

A failed call marks Redis down and starts one reconnect loop (exponential
backoff with full jitter, so that the boxes of a service spread out); once
Redis answers again, our presence is announced again and every open room's
state is read again, so that the engine refills what pub/sub did not deliver
and sees a new epoch if Redis lost the room.
"""

from __future__ import annotations

import asyncio
import logging
import random
from typing import TYPE_CHECKING, Any

from shardchat import stats
from shardchat.brokers.redis.client import FAILURES
from shardchat.logs import log_event

if TYPE_CHECKING:
    from shardchat.brokers.redis.broker import RedisBroker
    from shardchat.brokers.redis.rooms import Room
    from shardchat.brokers.redis.subscriber import Subscriber

__all__ = ["BACKOFF_MAX", "BACKOFF_MIN", "failed", "pubsub_lost", "reconnected"]

log = logging.getLogger("shardchat.brokers.redis")

BACKOFF_MIN = 0.05  # seconds before the first reconnect attempt
BACKOFF_MAX = 2.0  # the longest wait between two attempts (with full jitter under it)

_S_UP = int(stats.Slot.REDIS_UP)
_S_ERRORS = int(stats.Slot.REDIS_ERRORS)
_S_RECONNECTS = int(stats.Slot.REDIS_RECONNECTS)


def _spawn(self: RedisBroker, coro: Any) -> None:
    task = asyncio.get_running_loop().create_task(coro)
    self._tasks.add(task)
    task.add_done_callback(self._tasks.discard)


def _set_up(self: RedisBroker, up: bool) -> None:
    if up != self.up:
        log_event(
            log, logging.INFO if up else logging.ERROR,
            "redis_up" if up else "redis_down", where=self.where,
        )  # fmt: skip
    self.up = up
    self.stats[_S_UP] = int(up)


def failed(self: RedisBroker, what: str, exc: BaseException) -> None:
    """A Redis call failed: count it, and reconnect in the background."""
    self.stats[_S_ERRORS] += 1
    if self.up:
        log_event(log, logging.WARNING, "redis_failed", call=what, error=repr(exc))
    self._set_up(False)
    if not self._reconnecting and not self.closed:
        self._reconnecting = True
        self._spawn(self._reconnect())


def pubsub_lost(self: RedisBroker, sub: Subscriber, exc: BaseException) -> None:
    """A pub/sub connection broke: its rooms hear nothing until it is back, so
    their joins wait for the resync (a join now would be answered from a log
    that may be missing what was published meanwhile)."""
    for state in self.rooms.values():
        if state.opened and state.keys.channel in sub.channels:
            state.ready = False
            if state.early is None:
                state.early = []
    self.failed("pubsub", exc)


def reconnected(self: RedisBroker) -> None:
    """A pub/sub connection is back: what it missed is read from the streams."""
    if self.up:
        self._spawn(self._resync())


async def _reconnect(self: RedisBroker) -> None:
    wait = BACKOFF_MIN
    try:
        while not self.closed:
            await asyncio.sleep(random.uniform(wait / 2, wait))  # jitter: boxes spread out
            wait = min(BACKOFF_MAX, wait * 2)
            # After an outage every node's last beat is old: judge the others
            # only once they have had presence.ttl to beat again.
            self._judge_after = self.now + self.ttl
            try:
                await self._connect()
                for sub in self._subscribers.values():
                    connection = sub.pubsub.connection
                    if connection is not None:
                        await connection.connect()
            except FAILURES as exc:
                self.stats[_S_ERRORS] += 1
                log_event(log, logging.DEBUG, "redis_retry", error=repr(exc))
                continue
            self.stats[_S_RECONNECTS] += 1
            self._judge_after = self.now + self.ttl
            break
    finally:
        self._reconnecting = False
    if self.up:
        await self._resync()


async def _resync(self: RedisBroker) -> None:
    """After an outage: announce our presence again, and read every open room's
    state, so that the engine refills what pub/sub did not deliver (and sees a
    new epoch if Redis lost the room)."""
    for room, users in self._local.items():
        for user, info in users.items():
            self._presence.append((room, user, True, True, info))
    for room, state in list(self.rooms.items()):
        if state.opened:
            # Joins wait for the room's state as Redis has it now (its epoch may
            # have changed); what pub/sub brings meanwhile waits behind it.
            state.ready = False
            if state.early is None:
                state.early = []
            self._spawn(self._reopen(room, state))
    self._kick()


async def _reopen(self: RedisBroker, room: str, state: Room) -> None:
    if not state.subscribed:
        try:
            await self._subscribe(state)
        except FAILURES as exc:
            self.failed("subscribe", exc)
            self.deliver(lambda: self._ready(room, state))
            return
    await self._load(room, state, resync=True)


async def _subscribe(self: RedisBroker, state: Room) -> None:
    channel = state.keys.channel
    await asyncio.wait_for(self._subscriber(channel).subscribe(channel), self.config.redis.timeout)
    state.subscribed = True
