"""Several boxes as one chat service: a shard's broker over Redis.

docs/ARCHITECTURE.md, Many boxes. Each
shard's :class:`RedisBroker` is a node of the service: it sequences its
publishes in Redis (one script call per room per batch increments the room's
seq, appends to its stream and publishes on its shard channel, atomically),
subscribes to the channels of the rooms its engine has members of and only
those, keeps its members' presence in Redis with a heartbeat, and hands
everything to its engine through the same :class:`BrokerListener` calls as
the shared-memory broker of one box.

One class, :class:`RedisBroker`, made of one part per job, each in its own
module: :mod:`.client` (redis-py's client, scripts, pipelines),
:mod:`.subscriber` (pub/sub connections and what they bring), :mod:`.health`
(down, reconnect, resync), :mod:`.nodes` (heartbeat, other nodes' liveness),
:mod:`.publisher`, :mod:`.rooms`, :mod:`.presence`; :mod:`.wire` is what goes
over the wire (pure). This module holds their state, start and stop.

It does its I/O in asyncio tasks on the shard's loop; everything it tells the
engine goes through ``deliver`` (the shard's wrapper that gives the engine the
time first and writes what it produced after). Batching: what the engine
publishes in one loop turn goes out at the turn's end as one pipeline, and
while a pipeline is in flight the next turns' publishes gather for the next
one (one in flight at a time keeps each room's order from this shard).

Redis unavailable: publishes fail at once with ``on_publish_failed``
(``unavailable`` to the client), nothing is acked that the script did not
store, and a reconnect loop with exponential backoff and jitter brings the
subscriptions, the presence and every open room's state back by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

from shardchat.brokers.redis import client, health, nodes, publisher, rooms, subscriber
from shardchat.brokers.redis import presence as presence_part
from shardchat.brokers.redis.client import FAILURES, connect_client
from shardchat.brokers.redis.nodes import node_name
from shardchat.brokers.redis.rooms import Room
from shardchat.brokers.redis.subscriber import Subscriber
from shardchat.core.broker import BrokerListener, Publication
from shardchat.core.config import Config
from shardchat.core.presence import PresenceView
from shardchat.stats import Counters

__all__ = ["RedisBroker"]


class RedisBroker:
    """The broker of one shard of one box, over a Redis or a Redis Cluster."""

    def __init__(
        self,
        config: Config,
        shard_id: int,
        counters: Counters,
        deliver: Callable[[Callable[[], None]], None],
        *,
        node: str | None = None,
    ) -> None:
        self.config = config
        self.shard_id = shard_id
        self.stats = counters
        self.deliver = deliver  # runs an engine input: time first, output after
        # The shard's liveness stamp for the supervisor (its ring header's heartbeat).
        self.stamp: Callable[[int], None] = lambda now_ns: None
        self.node = node if node is not None else node_name(shard_id)
        self.prefix = config.redis.prefix
        self.history = config.delivery.history
        self.ttl = config.presence.ttl
        self.listener: BrokerListener | None = None
        self.rooms: dict[str, Room] = {}
        self.closed = False
        self.up = False
        self.commit_due = False  # never: the shard's end of turn is not needed
        self._batch: list[Publication] = []
        self._sending = 0  # publishes in the pipeline in flight
        # room, user, joined, force, the join's connect-proxy info (JSON)
        self._presence: list[tuple[str, str, bool, bool, str | None]] = []
        self._flushing = False
        self._peers: dict[str, int] = {}  # other nodes -> engine peer ids
        self._live: set[str] = set()
        # Told when a room got its first member anywhere or lost its last, as the
        # presence script found it (webhooks' room_occupied / room_vacated).
        self.occupancy: Callable[[str, str, bool], None] | None = None
        # Told of a dead node's user this node reports (webhooks, exactly once among
        # the survivors): node, user, and the room it left (None: its disconnect).
        self.dead_user: Callable[[str, str, str | None], None] | None = None
        self._local: dict[str, dict[str, str | None]] = {}  # room -> our users -> info
        # The presence of our open rooms (ours and other nodes' users): every node
        # holds it for the rooms it has members of, and computes the events itself.
        self.view = PresenceView()
        # Their present users' info (the latest join's, JSON): room -> user -> info.
        self.infos: dict[str, dict[str, str]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._subscribers: dict[str, Subscriber] = {}
        self._reconnecting = False
        # After an outage every node's last beat is old: others are judged only
        # once they have had presence.ttl to beat again.
        self._judge_after = 0.0
        # The shard's monotonic clock as of its last sweep call (heartbeat()): the
        # broker reads no clock of its own to schedule or judge liveness.
        self.now = 0.0
        self._next_beat = 0.0
        self._beating = False  # a beat is in flight
        self._scripts: dict[str, str] = {}  # name -> sha1
        self._loaded = False
        self.client: Any
        self.client, self.cluster, self.where = connect_client(config.redis)
        self._nodes_key = self.prefix + "nodes"
        # The server API's control messages, heard by every node (shard/apiserver.py).
        self.control_channel = self.prefix + "api"
        self.on_control: Callable[[bytes], None] | None = None
        self._control_subscribed = False
        self._epochs: dict[str, str] = {}  # rooms not open here: the epoch a publish saw

    # Broker: publishing (publisher.py)

    publish = publisher.publish
    full = publisher.full
    _kick = publisher._kick
    _start_flush = publisher._start_flush
    _flush = publisher._flush
    _flush_once = publisher._flush_once
    _fail = publisher._fail
    _published = publisher._published

    # Broker: presence (presence.py)

    announce = presence_part.announce
    _change = presence_part._change
    presence = presence_part.presence
    snapshot = presence_part.snapshot
    vacated = presence_part.vacated
    _remote_presence = presence_part._remote_presence

    # Broker: rooms (rooms.py)

    open_room = rooms.open_room
    _open = rooms._open
    _load = rooms._load
    _opened = rooms._opened
    _ready = rooms._ready
    _resynced = rooms._resynced
    _snapshot = rooms._snapshot
    close_room = rooms.close_room
    _unsubscribe = rooms._unsubscribe
    _subscriber = rooms._subscriber
    fill = rooms.fill
    _fill = rooms._fill
    _filled = rooms._filled
    latest_seq = rooms.latest_seq
    serves_history = rooms.serves_history
    holding = rooms.holding
    epoch_of = rooms.epoch_of
    catch_up = rooms.catch_up

    # What pub/sub brings (subscriber.py)

    received = subscriber.received
    _received = subscriber._received

    # Health: up, down, reconnect, resync (health.py)

    _spawn = health._spawn
    _set_up = health._set_up
    failed = health.failed
    pubsub_lost = health.pubsub_lost
    reconnected = health.reconnected
    _reconnect = health._reconnect
    _resync = health._resync
    _reopen = health._reopen
    _subscribe = health._subscribe

    # The heartbeat and the other nodes (nodes.py)

    heartbeat = nodes.heartbeat
    _heartbeat = nodes._heartbeat
    _beat = nodes._beat
    _saw_live = nodes._saw_live
    _drop_nodes = nodes._drop_nodes
    _presence_remove = nodes._presence_remove
    _hdel = nodes._hdel
    _remove = nodes._remove
    _peer = nodes._peer

    # Scripts and pipelines (client.py)

    _load_scripts = client._load_scripts
    _pipeline = client._pipeline
    _send = client._send
    _script = client._script
    _count_trip = client._count_trip

    async def start(self, listener: BrokerListener) -> None:
        """Connect (or go on without Redis: the reconnect loop keeps trying); the
        shard's sweep beats the heartbeat from then on (:meth:`heartbeat`)."""
        self.listener = listener
        try:
            await self._connect()
        except FAILURES as exc:
            self.failed("connect", exc)

    async def _connect(self) -> None:
        if self.cluster:
            await self.client.initialize()
        await self._load_scripts()
        if not self._control_subscribed:
            # Once: the subscriber resubscribes its channels on every reconnect.
            channel = self.control_channel
            await asyncio.wait_for(
                self._subscriber(channel).subscribe(channel), self.config.redis.timeout
            )
            self._control_subscribed = True
        self._set_up(True)
        await self._beat()

    def control(self, payload: bytes, heard: Callable[[int], None] | None = None) -> None:
        """Tell every other node of the service; ``heard`` is told how many other
        nodes received it (SPUBLISH counts the subscribers). A failure is only
        counted: a caller waiting for answers gives up at its deadline."""
        self._spawn(self._control(payload, heard))

    async def _control(self, payload: bytes, heard: Callable[[int], None] | None) -> None:
        try:
            self._count_trip()
            receivers = await asyncio.wait_for(
                self.client.spublish(self.control_channel, payload), self.config.redis.timeout
            )
        except FAILURES as exc:
            self.failed("control", exc)
            return
        if heard is not None:
            others = max(0, int(receivers) - 1)  # our own subscription heard it too
            self.deliver(lambda: heard(others))

    async def close(self) -> None:
        """Leave presence (so other boxes need not wait for the TTL) and disconnect."""
        if self.up:
            for room, users in self._local.items():
                for user in users:
                    self._presence.append((room, user, False, False, None))
            self._local.clear()
            with contextlib.suppress(*FAILURES):
                if self._presence or self._batch:  # the drain's leaves among them
                    await asyncio.wait_for(self._flush_once(), self.config.redis.timeout)
                self._count_trip()
                await asyncio.wait_for(
                    self.client.zrem(self._nodes_key, self.node), self.config.redis.timeout
                )
        self.closed = True
        for task in list(self._tasks):
            task.cancel()
        for sub in self._subscribers.values():
            await sub.close()
        with contextlib.suppress(BaseException):
            await self.client.aclose()
        self.listener = None

    def commit(self) -> None:
        """Publishes go out from :meth:`_kick`; nothing waits for the turn's end."""

    def read_peers(self, now: float | None = None) -> bool:
        return False

    def tick(self, now: float) -> float | None:
        return None

    def record_lag(self) -> None:
        pass
