"""The Redis broker's publishing: one pipeline per loop turn, one in flight at a time.

What the engine publishes in one loop turn goes out at the turn's end as one
pipeline (one ``publish`` script call per room: it increments the room's seq,
appends to its stream and publishes on its channel, atomically), with the
turn's presence changes; while a pipeline is in flight the next turns'
publishes gather for the next one, which keeps each room's order from this
shard. Admission control bounds what waits and what is in flight
(``overload.pipeline``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

from shardchat import stats
from shardchat.brokers.redis import hooks as rh
from shardchat.brokers.redis import wire as rw
from shardchat.brokers.redis.client import FAILURES
from shardchat.brokers.redis.rooms import new_epoch
from shardchat.core.broker import Publication
from shardchat.core.overload import Queue
from shardchat.logs import log_event

if TYPE_CHECKING:
    from shardchat.brokers.redis.broker import RedisBroker

__all__ = ["full", "publish"]

log = logging.getLogger("shardchat.brokers.redis")

_S_BATCHES = int(stats.Slot.REDIS_BATCHES)
_S_BATCHED = int(stats.Slot.REDIS_BATCHED_MESSAGES)
_S_ERRORS = int(stats.Slot.REDIS_ERRORS)
_S_SEQUENCED = int(stats.Slot.MESSAGES_SEQUENCED)


def publish(self: RedisBroker, publication: Publication, now: float) -> None:
    if not self.up:
        # Not stored, so not acked: the client hears `unavailable` and may retry.
        listener = self.listener
        assert listener is not None
        listener.on_publish_failed(publication.msg_id, publication.room)
        return
    self._batch.append(publication)
    self._kick()


def full(self: RedisBroker, room: str) -> Queue | None:
    """Publishes waiting for the next pipeline and in the one in flight at
    ``overload.pipeline``: Redis (or the path to it) is behind."""
    if len(self._batch) + self._sending >= self.config.overload.pipeline:
        return Queue.PIPELINE
    return None


def _kick(self: RedisBroker) -> None:
    """Send what gathered once this loop turn ends (call_soon runs after the
    turn's other callbacks), unless a pipeline is in flight: then it goes
    with the next one."""
    if not self._flushing and (self._batch or self._presence):
        self._flushing = True
        asyncio.get_running_loop().call_soon(self._start_flush)


def _start_flush(self: RedisBroker) -> None:
    self._spawn(self._flush())


async def _flush(self: RedisBroker) -> None:
    try:
        while (self._batch or (self._presence and self.up)) and not self.closed:
            await self._flush_once()
    finally:
        self._flushing = False


async def _flush_once(self: RedisBroker) -> None:
    batch, self._batch = self._batch, []
    ops, self._presence = self._presence, []
    if not self.up:
        # Presence changes wait for Redis (a leave must not be lost: the user
        # would stay present everywhere); publishes cannot wait: `unavailable`.
        self._presence = ops + self._presence
        if batch:
            self.deliver(lambda: self._fail(batch))
        return
    wall = time.time()
    wall_ns = time.time_ns()
    by_room: dict[str, list[Publication]] = {}
    for p in batch:
        by_room.setdefault(p.room, []).append(p)
    calls: list[tuple[str, list[str], list[Any]]] = []
    occupancy = self.occupancy
    for room, user, joined, force, info in ops:
        keys = rw.Keys.of(self.prefix, room, wall)
        presence_keys = [keys.presence, keys.channel]
        if occupancy is not None:
            presence_keys.append(rh.occupied_key(self.prefix, room))
        calls.append(
            ("presence", presence_keys, [self.node, user, int(joined), int(force), info or ""])
        )
    ttl_ms = int(self.config.redis.history_ttl * 1000)
    rooms = list(by_room)
    for room in rooms:
        keys = rw.Keys.of(self.prefix, room, wall)
        args: list[Any] = [self.history, ttl_ms, new_epoch()]
        args += rw.publish_args(by_room[room], wall_ns)
        calls.append(
            (
                "publish",
                [
                    keys.seq,
                    keys.stream,
                    keys.epoch,
                    keys.ids_now,
                    keys.ids_before,
                    keys.channel,
                ],
                args,
            )
        )
    self._sending = len(batch)
    try:
        results = await asyncio.wait_for(self._pipeline(calls), self.config.redis.timeout)
    except FAILURES as exc:
        self._sending = 0
        self.failed("publish", exc)
        self._presence = ops + self._presence
        if batch:
            self.deliver(lambda: self._fail(batch))
        return
    self._sending = 0
    if batch:
        self.stats[_S_BATCHES] += 1
        self.stats[_S_BATCHED] += len(batch)
    if occupancy is not None:
        for (room, user, _, _, _), result in zip(ops, results, strict=False):
            # The script's [changed, occupancy]: we made the room occupied or empty.
            if isinstance(result, list) and len(result) == 2 and result[1]:
                occupancy(room, user, result[1] == 1)
    publish_results = results[len(ops) :]
    self.deliver(lambda: self._published(rooms, by_room, publish_results))


def _fail(self: RedisBroker, batch: list[Publication]) -> None:
    listener = self.listener
    if listener is None:
        return
    for p in batch:
        listener.on_publish_failed(p.msg_id, p.room)


def _published(
    self: RedisBroker, rooms: list[str], by_room: dict[str, list[Publication]], results: list[Any]
) -> None:
    listener = self.listener
    if listener is None:
        return
    sequenced = 0
    for room, result in zip(rooms, results, strict=True):
        pubs = by_room[room]
        if isinstance(result, BaseException):
            self.stats[_S_ERRORS] += 1
            log_event(log, logging.ERROR, "publish_script_failed", room=room, error=repr(result))
            for p in pubs:
                listener.on_publish_failed(p.msg_id, p.room)
            continue
        state = self.rooms.get(room)
        if state is None:
            # A room with no members here (a server API publish): its epoch is
            # remembered for the answer, for the most recent rooms only.
            if len(self._epochs) >= 4096:
                self._epochs.clear()
            epoch = result[0]
            self._epochs[room] = epoch.decode() if isinstance(epoch, bytes) else str(epoch)
        for p, seq in zip(pubs, result[1:], strict=True):
            seq = int(seq)
            if seq > 0:
                sequenced += 1
                if state is not None:
                    state.seq = max(state.seq, seq)  # known before pub/sub brings it
            listener.on_published(p.msg_id, room, abs(seq))
    self.stats[_S_SEQUENCED] += sequenced
