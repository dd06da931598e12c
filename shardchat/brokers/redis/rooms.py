"""The Redis broker's rooms: opened at the first local join, their state and history.

A room is followed only while the engine has members of it: its first join
subscribes to its channel, then reads its epoch, seq, presence and held
history in one pipeline and delivers them, and only then are the joins that
waited resumed (with what pub/sub brought meanwhile delivered first, in
order). Gaps are filled from the room's stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.exceptions import NoScriptError

from shardchat import stats
from shardchat.brokers.redis import wire as rw
from shardchat.brokers.redis.client import FAILURES
from shardchat.brokers.redis.subscriber import Subscriber
from shardchat.core.broker import Holding

if TYPE_CHECKING:
    from shardchat.brokers.redis.broker import RedisBroker

__all__ = [
    "catch_up",
    "close_room",
    "epoch_of",
    "fill",
    "latest_seq",
    "new_epoch",
    "open_room",
    "Room",
    "holding",
    "serves_history",
]

_S_ROOMS = int(stats.Slot.REDIS_SUBSCRIBED_ROOMS)
_S_READS = int(stats.Slot.REDIS_STREAM_READS)


def new_epoch() -> str:
    """A room's epoch when Redis has none for it (new, or lost with Redis's data)."""
    return secrets.token_hex(4)


@dataclass(slots=True)
class Room:
    """A room this node is subscribed to (or subscribing to)."""

    keys: rw.Keys
    epoch: str | None = None
    seq: int = 0  # the latest seq this node knows of
    ready: bool = False  # its state delivered (subscribed, or trying to be)
    subscribed: bool = False  # Redis confirmed the subscription
    opened: bool = False  # its first state was delivered
    waiting: list[Callable[[], None]] = field(default_factory=list)  # joins to resume
    early: list[bytes] | None = None  # payloads that came before the state, in order
    remote: dict[str, set[str]] = field(default_factory=dict)  # node -> users, as delivered


def open_room(self: RedisBroker, room: str, then: Callable[[], None]) -> bool:
    state = self.rooms.get(room)
    if state is not None and state.ready:
        return True
    if state is None:
        state = self.rooms[room] = Room(rw.Keys.of(self.prefix, room, time.time()))
        state.early = []
        self.stats[_S_ROOMS] = len(self.rooms)
        self._spawn(self._open(room, state))
    state.waiting.append(then)
    return False


async def _open(self: RedisBroker, room: str, state: Room) -> None:
    try:
        await self._subscribe(state)
    except FAILURES as exc:
        # Redis-py resubscribes once it reconnects; the room's state is read then.
        self.failed("subscribe", exc)
        self.deliver(lambda: self._opened(room, state, None, []))
        return
    await self._load(room, state, resync=False)


async def _load(self: RedisBroker, room: str, state: Room, *, resync: bool) -> None:
    """Read the room's epoch, seq, presence and held history; deliver them."""
    keys = state.keys
    try:
        self._count_trip()
        pipe = self.client.pipeline(transaction=False)
        pipe.execute_command(
            "EVALSHA", self._scripts["state"], 3, keys.seq, keys.epoch, keys.presence,
            new_epoch(),
        )  # fmt: skip
        # A fresh live set, to tell a dead node's leftover presence from a new node's.
        pipe.execute_command(
            "EVALSHA", self._scripts["nodes"], 1, self._nodes_key, self.node,
            int(self.ttl * 1000),
        )  # fmt: skip
        if self.history and not resync:
            pipe.xrevrange(keys.stream, "+", "-", count=self.history)
        results = await asyncio.wait_for(pipe.execute(), self.config.redis.timeout)
    except NoScriptError:
        with contextlib.suppress(*FAILURES):
            await self._load_scripts()
        results = None
    except FAILURES as exc:
        self.failed("room_state", exc)
        results = None
    if results is None:
        if resync:
            self.deliver(lambda: self._ready(room, state))
        else:
            self.deliver(lambda: self._opened(room, state, None, []))
        return
    self.stats[_S_READS] += 1
    self._saw_live(results[1][1])
    held = [] if len(results) < 3 else results[2]
    if resync:
        self.deliver(lambda: self._resynced(room, state, results[0]))
    else:
        self.deliver(lambda: self._opened(room, state, results[0], held))


def _opened(self: RedisBroker, room: str, state: Room, result: Any, held: list[Any]) -> None:
    listener = self.listener
    if listener is None or self.rooms.get(room) is not state:
        return
    if result is not None:
        epoch, seq, present = result
        state.epoch = epoch.decode() if isinstance(epoch, bytes) else epoch
        state.seq = int(seq)
        listener.on_room_state(room, state.epoch, 0)  # a log of another epoch restarts
        for entry_id, fields in reversed(held):
            msg_seq = int(entry_id.split(b"-")[0])
            listener.restore(room, msg_seq, fields[b"j"])
        if state.seq:
            listener.restore(room, state.seq, None)
        self._snapshot(room, state, present)
    self._ready(room, state)


def _ready(self: RedisBroker, room: str, state: Room) -> None:
    """The room's state is delivered: what came meanwhile, then the joins."""
    if self.rooms.get(room) is not state:
        return
    state.ready = state.opened = True
    early, state.early = state.early or [], None
    for data in early:
        self._received(room, state, data)
    waiting, state.waiting = state.waiting, []
    for then in waiting:
        then()


def _resynced(self: RedisBroker, room: str, state: Room, result: Any) -> None:
    listener = self.listener
    if listener is None or self.rooms.get(room) is not state:
        return
    epoch, seq, present = result
    state.epoch = epoch.decode() if isinstance(epoch, bytes) else epoch
    state.seq = max(state.seq, int(seq)) if epoch == state.epoch else int(seq)
    listener.on_room_state(room, state.epoch, int(seq))
    self._snapshot(room, state, present)
    self._ready(room, state)


def _snapshot(self: RedisBroker, room: str, state: Room, present: list[bytes]) -> None:
    """The room's presence hash, flat: field ("node\\nuser"), value ("1" or info)."""
    for i in range(0, len(present) - 1, 2):
        node, _, user = present[i].decode().partition("\n")
        value = present[i + 1].decode()
        info = None if value == "1" else value
        if node == self.node:
            continue
        if node not in self._live:
            self._presence_remove(room, state, node, user)  # a dead node's leftover
            continue
        self._remote_presence(room, state, node, user, True, info)


def close_room(self: RedisBroker, room: str) -> None:
    state = self.rooms.pop(room, None)
    if state is None:
        return
    self.stats[_S_ROOMS] = len(self.rooms)
    listener = self.listener
    assert listener is not None
    # Remote users of the room are no longer followed here: forget them.
    for node, users in state.remote.items():
        for user in users:
            self._change(self._peer(node), room, user, False)
    state.remote.clear()
    self._spawn(self._unsubscribe(state.keys.channel))
    for then in state.waiting:
        then()


async def _unsubscribe(self: RedisBroker, channel: str) -> None:
    with contextlib.suppress(*FAILURES):
        await self._subscriber(channel).unsubscribe(channel)


def _subscriber(self: RedisBroker, channel: str) -> Subscriber:
    """The pub/sub connection of the master that serves ``channel``'s slot."""
    if not self.cluster:
        name = ""
        client = self.client
    else:
        node = self.client.nodes_manager.get_node_from_slot(key_slot(channel.encode()))
        name = node.name
        client = None
    sub = self._subscribers.get(name)
    if sub is None:
        if client is None:
            client = aioredis.Redis(
                host=node.host,
                port=node.port,
                socket_timeout=None,
                socket_connect_timeout=self.config.redis.connect_timeout,
                retry=Retry(NoBackoff(), 0),
            )
        sub = self._subscribers[name] = Subscriber(self, client, name)
    return sub


def fill(self: RedisBroker, room: str, first: int, last: int) -> None:
    self._spawn(self._fill(room, first, last))


async def _fill(self: RedisBroker, room: str, first: int, last: int) -> None:
    keys = rw.Keys.of(self.prefix, room, time.time())
    try:
        self._count_trip()
        entries = await asyncio.wait_for(
            self.client.xrange(keys.stream, f"{first}-1", f"{last}-1"),
            self.config.redis.timeout,
        )
    except FAILURES as exc:
        # The engine asks again after its gap timeout.
        self.failed("fill", exc)
        return
    self.stats[_S_READS] += 1
    self.deliver(lambda: self._filled(room, first, last, entries))


def _filled(self: RedisBroker, room: str, first: int, last: int, entries: list[Any]) -> None:
    listener = self.listener
    if listener is None:
        return
    seqs = [(int(entry_id.split(b"-")[0]), fields[b"j"]) for entry_id, fields in entries]
    oldest = seqs[0][0] if seqs else last + 1
    if oldest > first:
        listener.on_replay_lost(room, oldest - 1)  # trimmed (MAXLEN) or expired
    for seq, json in seqs:
        listener.on_replay(room, seq, json)
    listener.on_replay_end(room, last)


def latest_seq(self: RedisBroker, room: str) -> int | None:
    state = self.rooms.get(room)
    return None if state is None or not state.seq else state.seq


def serves_history(self: RedisBroker, room: str) -> bool:
    return False  # Redis does


def holding(self: RedisBroker, room: str) -> Holding:
    return Holding.EVERY  # each node keeps its own copy, as Redis sends every node the room


def epoch_of(self: RedisBroker, room: str) -> str | None:
    state = self.rooms.get(room)
    return self._epochs.get(room) if state is None else state.epoch


def catch_up(self: RedisBroker) -> None:
    """Nothing waits here: what pub/sub delivered was handed over as it came."""
