"""The Redis broker's pub/sub: its connections, their readers, what the channels bring.

One connection per Redis (or per Cluster master) carries every channel of
the rooms this node follows, and the server API's.

A subscription is confirmed by Redis before the room's state is read, so that
nothing published after the read is missed. When the connection breaks,
redis-py subscribes every channel again on reconnect, and the broker reads
what was missed from the rooms' streams (:mod:`.health`).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from typing import TYPE_CHECKING, Any

from shardchat import stats
from shardchat.brokers.redis import wire as rw
from shardchat.brokers.redis.client import FAILURES
from shardchat.brokers.redis.health import BACKOFF_MAX, BACKOFF_MIN

if TYPE_CHECKING:
    from shardchat.brokers.redis.broker import RedisBroker
    from shardchat.brokers.redis.rooms import Room

__all__ = ["received", "Subscriber"]

_S_RECEIVED = int(stats.Slot.REDIS_MESSAGES_RECEIVED)


class Subscriber:
    """One pub/sub connection (a single Redis, or one Cluster master) and its reader."""

    def __init__(self, broker: RedisBroker, client: Any, name: str) -> None:
        self.broker = broker
        self.client = client
        self.name = name
        self.pubsub: Any = client.pubsub()
        self.channels: set[str] = set()
        self.confirmed: dict[str, asyncio.Future[None]] = {}
        self.task: asyncio.Task[None] | None = None
        self.wake = asyncio.Event()  # set when the connection is back: stop backing off

    async def subscribe(self, channel: str) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.confirmed[channel] = future
        self.channels.add(channel)
        await self.pubsub.ssubscribe(channel)
        if self.task is None:
            # Called on every (re)connect, after redis-py's own callback has sent
            # SSUBSCRIBE again for every channel: what pub/sub dropped meanwhile is
            # then read from the streams.
            self.pubsub.connection.register_connect_callback(self._connected)
            self.task = asyncio.get_running_loop().create_task(self._read())
        await future  # Redis delivers the channel from here on

    async def unsubscribe(self, channel: str) -> None:
        self.channels.discard(channel)
        self.confirmed.pop(channel, None)
        await self.pubsub.sunsubscribe(channel)

    async def _connected(self, connection: Any) -> None:
        self.wake.set()
        self.broker.reconnected()

    async def _read(self) -> None:
        broker = self.broker
        wait = BACKOFF_MIN
        while not broker.closed:
            try:
                message = await self.pubsub.get_message(timeout=None)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the connection broke: redis-py resubscribes on connect
                broker.pubsub_lost(self, exc)
                # Back off, unless the broker's reconnect brings the connection back
                # first: what arrived since must be read at once.
                self.wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), random.uniform(wait / 2, wait))
                wait = min(BACKOFF_MAX, wait * 2)
                connection = self.pubsub.connection
                # The broker's reconnect may have brought it back meanwhile (with
                # what arrived since in its buffer): then it is only read on.
                if connection is not None and not connection.is_connected:
                    with contextlib.suppress(*FAILURES):
                        # Resubscribes every channel, then our callback resyncs.
                        await connection.connect()
                if connection is not None and connection.is_connected:
                    wait = BACKOFF_MIN
                continue
            if message is None:
                continue
            kind = message["type"]
            channel = message["channel"]
            if isinstance(channel, bytes):
                channel = channel.decode()
            if kind == "smessage":
                broker.received(channel, message["data"])
            elif kind == "ssubscribe":
                future = self.confirmed.pop(channel, None)
                if future is not None and not future.done():
                    future.set_result(None)

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(BaseException):
                await self.task
        with contextlib.suppress(BaseException):
            await self.pubsub.aclose()


def received(self: RedisBroker, channel: str, data: bytes) -> None:
    if channel == self.control_channel:
        on_control = self.on_control
        if on_control is not None:
            self.deliver(lambda: on_control(data))
        return
    room = _room_of(channel, self.prefix)
    state = self.rooms.get(room)
    if state is None:
        return  # unsubscribed meanwhile
    if state.early is not None:
        state.early.append(data)
        return
    self.deliver(lambda: self._received(room, state, data))


def _received(self: RedisBroker, room: str, state: Room, data: bytes) -> None:
    listener = self.listener
    if listener is None:
        return
    item = rw.decode(data)
    if isinstance(item, rw.Batch):
        self.stats[_S_RECEIVED] += len(item.messages)
        if item.epoch != state.epoch:
            state.epoch = item.epoch
            state.seq = 0
            listener.on_room_state(room, item.epoch, 0)
        mono_ns = time.monotonic_ns()
        wall_ns = time.time_ns()
        seq = item.first
        for msg_id, published_ns, json in item.messages:
            # The publisher's wall clock, on our monotonic one, for the histogram.
            listener.on_message(room, seq, msg_id, json, mono_ns - (wall_ns - published_ns))
            seq += 1
        state.seq = max(state.seq, seq - 1)
    elif item is not None:
        node, user, joined, info = item
        if node != self.node:
            self._remote_presence(room, state, node, user, joined, info)


def _room_of(channel: str, prefix: str) -> str:
    # prefix + "{" + room + "}:c"
    return channel[len(prefix) + 1 : -3]
