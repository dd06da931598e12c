"""Several boxes as one chat service: a shard's broker over Redis.

DESIGN.md, Beyond one box; docs/ARCHITECTURE.md, Rooms across boxes. Each
shard's :class:`RedisBroker` is a node of the service: it sequences its
publishes in Redis (one script call per room per batch increments the room's
seq, appends to its stream and publishes on its shard channel, atomically),
subscribes to the channels of the rooms its engine has members of and only
those, keeps its members' presence in Redis with a heartbeat, and hands
everything to its engine through the same :class:`BrokerListener` calls as
the shared-memory broker of one box.

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
import logging
import os
import random
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.exceptions import NoScriptError, RedisError

from shardchat import stats
from shardchat.brokers import redis_hooks as rh
from shardchat.brokers import redis_wire as rw
from shardchat.brokers.presence_holders import answer_of
from shardchat.core.broker import BrokerListener, PresenceAnswer, Publication
from shardchat.core.config import Config, redact_url
from shardchat.core.overload import Queue
from shardchat.core.presence import PresenceView
from shardchat.logs import log_event
from shardchat.stats import Counters

__all__ = ["BACKOFF_MAX", "BACKOFF_MIN", "RedisBroker", "node_name"]

log = logging.getLogger(__name__)

BACKOFF_MIN = 0.05  # seconds before the first reconnect attempt
BACKOFF_MAX = 2.0  # the longest wait between two attempts (with full jitter under it)
POOL_SIZE = 8  # connections of a shard's pool (one Redis), its pub/sub connection included
PEER_BASE = 1 << 16  # engine peer ids of other nodes start here (our shards are < 256)
_NO_BUDGET = 1 << 62  # answers are not records here: only presence.list_limit cuts them

_S_UP = int(stats.Slot.REDIS_UP)
_S_TRIPS = int(stats.Slot.REDIS_ROUND_TRIPS)
_S_BATCHES = int(stats.Slot.REDIS_BATCHES)
_S_BATCHED = int(stats.Slot.REDIS_BATCHED_MESSAGES)
_S_ERRORS = int(stats.Slot.REDIS_ERRORS)
_S_ROOMS = int(stats.Slot.REDIS_SUBSCRIBED_ROOMS)
_S_RECEIVED = int(stats.Slot.REDIS_MESSAGES_RECEIVED)
_S_READS = int(stats.Slot.REDIS_STREAM_READS)
_S_RECONNECTS = int(stats.Slot.REDIS_RECONNECTS)
_S_SEQUENCED = int(stats.Slot.MESSAGES_SEQUENCED)

_FAILURES = (RedisError, OSError, asyncio.TimeoutError)


def node_name(shard_id: int) -> str:
    """A name no other node of the service has, now or later: host, pid, shard, nonce."""
    return f"{socket.gethostname()}:{os.getpid()}:{shard_id}:{secrets.token_hex(3)}"


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


class _Subscriber:
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
                    with contextlib.suppress(*_FAILURES):
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
        self._presence: list[tuple[str, str, bool, bool]] = []  # room, user, joined, force
        self._flushing = False
        self._peers: dict[str, int] = {}  # other nodes -> engine peer ids
        self._live: set[str] = set()
        # Told when a room got its first member anywhere or lost its last, as the
        # presence script found it (webhooks' room_occupied / room_vacated).
        self.occupancy: Callable[[str, str, bool], None] | None = None
        # Told of a dead node's user this node reports (webhooks, exactly once among
        # the survivors): node, user, and the room it left (None: its disconnect).
        self.dead_user: Callable[[str, str, str | None], None] | None = None
        self._local: dict[str, dict[str, None]] = {}  # room -> our users there
        # The presence of our open rooms (ours and other nodes' users): every node
        # holds it for the rooms it has members of, and computes the events itself.
        self.view = PresenceView()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._subscribers: dict[str, _Subscriber] = {}
        self._reconnecting = False
        # After an outage every node's last beat is old: others are judged only
        # once they have had presence.ttl to beat again.
        self._judge_after = 0.0
        self._scripts: dict[str, str] = {}  # name -> sha1
        self._loaded = False
        redis_config = config.redis
        common: dict[str, Any] = {
            "socket_timeout": redis_config.timeout,
            "socket_connect_timeout": redis_config.connect_timeout,
            # Our own loop retries with backoff and jitter; a command fails at once.
            "retry": Retry(NoBackoff(), 0),
        }
        self.cluster = bool(redis_config.cluster)
        self.client: Any
        if self.cluster:
            seeds = [ClusterNode(*_host_port(seed)) for seed in redis_config.cluster]
            self.client = RedisCluster(startup_nodes=seeds, **common)
        else:
            # A bounded pool: a storm of room opens waits for a connection instead
            # of opening hundreds (measured: 1,000 rooms opened at once took 33
            # connections per shard with an unbounded pool).
            pool = aioredis.BlockingConnectionPool.from_url(
                redis_config.url, max_connections=POOL_SIZE, timeout=redis_config.timeout, **common
            )
            self.client = aioredis.Redis(connection_pool=pool)
        self.where = (
            "cluster " + ",".join(redis_config.cluster)
            if self.cluster
            else redact_url(redis_config.url)
        )
        self._sources = {
            "publish": rw.PUBLISH_SCRIPT,
            "state": rw.STATE_SCRIPT,
            "presence": rw.PRESENCE_SCRIPT,
            "nodes": rw.NODES_SCRIPT,
            "vacate": rh.VACATE_SCRIPT,
            "remove": rh.REMOVE_SCRIPT,
        }
        self._nodes_key = self.prefix + "nodes"
        # The server API's control messages, heard by every node (shard/apiserver.py).
        self.control_channel = self.prefix + "api"
        self.on_control: Callable[[bytes], None] | None = None
        self._control_subscribed = False
        self._epochs: dict[str, str] = {}  # rooms not open here: the epoch a publish saw

    # Start and stop

    async def start(self, listener: BrokerListener) -> None:
        """Connect (or go on without Redis: the reconnect loop keeps trying), then
        beat the heartbeat."""
        self.listener = listener
        try:
            await self._connect()
        except _FAILURES as exc:
            self.failed("connect", exc)
        self._spawn(self._heartbeat())

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

    # The server API

    def control_peers(self) -> int:
        """The other nodes that hear a :meth:`control` message (the live ones)."""
        return len(self._live - {self.node})

    def control(self, payload: bytes) -> None:
        """Tell every other node of the service (a failure is only counted: the
        caller's gathering times out as ``unavailable``)."""
        self._spawn(self._control(payload))

    async def _control(self, payload: bytes) -> None:
        try:
            self._count_trip()
            await asyncio.wait_for(
                self.client.spublish(self.control_channel, payload), self.config.redis.timeout
            )
        except _FAILURES as exc:
            self.failed("control", exc)

    async def _load_scripts(self) -> None:
        # On a Cluster, redis-py sends SCRIPT LOAD to every master.
        for name, source in self._sources.items():
            self._count_trip()
            self._scripts[name] = await self.client.script_load(source)

    async def close(self) -> None:
        """Leave presence (so other boxes need not wait for the TTL) and disconnect."""
        if self.up:
            for room, users in self._local.items():
                for user in users:
                    self._presence.append((room, user, False, False))
            self._local.clear()
            with contextlib.suppress(*_FAILURES):
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

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # Health

    def _set_up(self, up: bool) -> None:
        if up != self.up:
            log_event(
                log, logging.INFO if up else logging.ERROR,
                "redis_up" if up else "redis_down", where=self.where,
            )  # fmt: skip
        self.up = up
        self.stats[_S_UP] = int(up)

    def failed(self, what: str, exc: BaseException) -> None:
        """A Redis call failed: count it, and reconnect in the background."""
        self.stats[_S_ERRORS] += 1
        if self.up:
            log_event(log, logging.WARNING, "redis_failed", call=what, error=repr(exc))
        self._set_up(False)
        if not self._reconnecting and not self.closed:
            self._reconnecting = True
            self._spawn(self._reconnect())

    def pubsub_lost(self, sub: _Subscriber, exc: BaseException) -> None:
        """A pub/sub connection broke: its rooms hear nothing until it is back, so
        their joins wait for the resync (a join now would be answered from a log
        that may be missing what was published meanwhile)."""
        for state in self.rooms.values():
            if state.opened and state.keys.channel in sub.channels:
                state.ready = False
                if state.early is None:
                    state.early = []
        self.failed("pubsub", exc)

    def reconnected(self) -> None:
        """A pub/sub connection is back: what it missed is read from the streams."""
        if self.up:
            self._spawn(self._resync())

    async def _reconnect(self) -> None:
        wait = BACKOFF_MIN
        try:
            while not self.closed:
                await asyncio.sleep(random.uniform(wait / 2, wait))  # jitter: boxes spread out
                wait = min(BACKOFF_MAX, wait * 2)
                # After an outage every node's last beat is old: judge the others
                # only once they have had presence.ttl to beat again.
                self._judge_after = time.monotonic() + self.ttl
                try:
                    await self._connect()
                    for sub in self._subscribers.values():
                        connection = sub.pubsub.connection
                        if connection is not None:
                            await connection.connect()
                except _FAILURES as exc:
                    self.stats[_S_ERRORS] += 1
                    log_event(log, logging.DEBUG, "redis_retry", error=repr(exc))
                    continue
                self.stats[_S_RECONNECTS] += 1
                self._judge_after = time.monotonic() + self.ttl
                break
        finally:
            self._reconnecting = False
        if self.up:
            await self._resync()

    async def _resync(self) -> None:
        """After an outage: announce our presence again, and read every open room's
        state, so that the engine refills what pub/sub did not deliver (and sees a
        new epoch if Redis lost the room)."""
        for room, users in self._local.items():
            for user in users:
                self._presence.append((room, user, True, True))
        for room, state in list(self.rooms.items()):
            if state.opened:
                # Joins wait for the room's state as Redis has it now (its epoch may
                # have changed); what pub/sub brings meanwhile waits behind it.
                state.ready = False
                if state.early is None:
                    state.early = []
                self._spawn(self._reopen(room, state))
        self._kick()

    async def _reopen(self, room: str, state: Room) -> None:
        if not state.subscribed:
            try:
                await self._subscribe(state)
            except _FAILURES as exc:
                self.failed("subscribe", exc)
                self.deliver(lambda: self._ready(room, state))
                return
        await self._load(room, state, resync=True)

    async def _subscribe(self, state: Room) -> None:
        channel = state.keys.channel
        await asyncio.wait_for(
            self._subscriber(channel).subscribe(channel), self.config.redis.timeout
        )
        state.subscribed = True

    # The heartbeat: this node's liveness, and the other nodes'

    async def _heartbeat(self) -> None:
        every = min(1.0, self.ttl / 3)
        while not self.closed:
            await asyncio.sleep(every)
            if not self.up:
                continue
            try:
                new = await self._beat()
            except _FAILURES as exc:
                self.failed("heartbeat", exc)
                continue
            if new and self._local:
                # Taken for dead (a pause longer than the TTL): others dropped our users.
                log_event(log, logging.WARNING, "presence_reannounced", rooms=len(self._local))
                await self._resync()

    async def _beat(self) -> bool:
        """Stamp this node in the live set; drop the nodes gone from it. True when
        this node was not in it (its first beat, or others took it for dead)."""
        self._count_trip()
        new, live = await self._script(
            self.client, "nodes", [self._nodes_key], [self.node, int(self.ttl * 1000)]
        )
        self._saw_live(live)
        return bool(new)

    def _saw_live(self, live: list[Any]) -> None:
        live_nodes = {n.decode() if isinstance(n, bytes) else n for n in live}
        self._live = live_nodes
        # A node announces its users only after its first beat, so a node we heard
        # from that is not in the set now stopped beating for presence.ttl.
        if time.monotonic() < self._judge_after:
            return
        gone = [n for n in self._peers if n not in live_nodes]
        if gone:
            self.deliver(lambda: self._drop_nodes(gone))

    def _drop_nodes(self, gone: list[str]) -> None:
        """Nodes that stopped beating: their users leave, here and in Redis."""
        listener = self.listener
        assert listener is not None
        for node in gone:
            log_event(log, logging.WARNING, "node_gone", node=node)
            for room, state in self.rooms.items():
                users = state.remote.pop(node, None)
                if users:
                    for user in users:
                        self._presence_remove(room, state, node, user)
            peer = self._peer(node)
            for room, user in self.view.drop_shard(peer):
                listener.on_presence_event(room, user, False, self.view.count(room))
            listener.on_peer_reset(peer)
            del self._peers[node]  # back from a pause, it comes as a new peer

    def _presence_remove(self, room: str, state: Room, node: str, user: str) -> None:
        """Remove a dead node's entry from the room's presence in Redis (whoever
        sees it first; HDEL is idempotent)."""
        if self.dead_user is None and self.occupancy is None:
            self._spawn(self._hdel(state.keys.presence, f"{node}\n{user}"))
        else:
            self._spawn(self._remove(room, state.keys.presence, node, user))

    async def _hdel(self, key: str, fieldname: str) -> None:
        with contextlib.suppress(*_FAILURES):
            self._count_trip()
            await self.client.hdel(key, fieldname)

    async def _remove(self, room: str, key: str, node: str, user: str) -> None:
        """The same, reporting what this node removed (webhooks): the user's leave,
        the room left empty, and the user's disconnect if no survivor claimed it."""
        with contextlib.suppress(*_FAILURES):
            self._count_trip()
            removed = await self._script(self.client, "remove", [key], [f"{node}\n{user}"])
            if not removed:
                return  # another survivor removed it, and reports it
            if self.dead_user is not None:
                self.dead_user(node, user, room)
            if removed == 2 and self.occupancy is not None:
                self.occupancy(room, user, False)
            if self.dead_user is not None:
                self._count_trip()
                claim = rh.gone_key(self.prefix, node, user)
                if await self.client.set(claim, "1", nx=True, ex=rh.GONE_TTL):
                    self.dead_user(node, user, None)

    async def vacated(self, room: str) -> bool:
        """Is ``room`` still empty after the grace, and ours to report (webhooks)?"""
        keys = rw.Keys.of(self.prefix, room, time.time())
        try:
            self._count_trip()
            flag = rh.occupied_key(self.prefix, room)
            return bool(await self._script(self.client, "vacate", [keys.presence, flag], []))
        except _FAILURES as exc:
            self.failed("vacate", exc)
            return False

    def _peer(self, node: str) -> int:
        peer = self._peers.get(node)
        if peer is None:
            peer = self._peers[node] = PEER_BASE + len(self._peers)
        return peer

    # Broker: publishing

    def publish(self, publication: Publication, now: float) -> None:
        if not self.up:
            # Not stored, so not acked: the client hears `unavailable` and may retry.
            listener = self.listener
            assert listener is not None
            listener.on_publish_failed(publication.msg_id, publication.room)
            return
        self._batch.append(publication)
        self._kick()

    def full(self, room: str) -> Queue | None:
        """Publishes waiting for the next pipeline and in the one in flight at
        ``overload.pipeline``: Redis (or the path to it) is behind."""
        if len(self._batch) + self._sending >= self.config.overload.pipeline:
            return Queue.PIPELINE
        return None

    def announce(self, room: str, user: str, joined: bool) -> None:
        local = self._local.setdefault(room, {})
        if joined:
            local[user] = None
        else:
            local.pop(user, None)
            if not local:
                del self._local[room]
        if self.up:
            self._presence.append((room, user, joined, False))
            self._kick()
        self._change(self.shard_id, room, user, joined)

    def _change(self, peer: int, room: str, user: str, joined: bool) -> None:
        if self.view.change(room, user, peer, joined):
            listener = self.listener
            assert listener is not None
            listener.on_presence_event(room, user, joined, self.view.count(room))

    def presence(
        self,
        room: str,
        user: str,
        limit: int,
        then: Callable[[PresenceAnswer | None], None],
    ) -> PresenceAnswer | None:
        """From our view: the join waited for open_room, which delivered the room's
        presence; a room with no members here is not followed (empty)."""
        return answer_of(self.view.present.get(room, {}), user, limit, _NO_BUDGET)

    def snapshot(self, peer: int, pairs: list[tuple[str, str]]) -> None:
        """Nothing to do: a peer that restarts reads our presence from Redis."""

    def _kick(self) -> None:
        """Send what gathered once this loop turn ends (call_soon runs after the
        turn's other callbacks), unless a pipeline is in flight: then it goes
        with the next one."""
        if not self._flushing and (self._batch or self._presence):
            self._flushing = True
            asyncio.get_running_loop().call_soon(self._start_flush)

    def _start_flush(self) -> None:
        self._spawn(self._flush())

    async def _flush(self) -> None:
        try:
            while (self._batch or (self._presence and self.up)) and not self.closed:
                await self._flush_once()
        finally:
            self._flushing = False

    async def _flush_once(self) -> None:
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
        for room, user, joined, force in ops:
            keys = rw.Keys.of(self.prefix, room, wall)
            presence_keys = [keys.presence, keys.channel]
            if occupancy is not None:
                presence_keys.append(rh.occupied_key(self.prefix, room))
            calls.append(("presence", presence_keys, [self.node, user, int(joined), int(force)]))
        ttl_ms = int(self.config.redis.history_ttl * 1000)
        rooms = list(by_room)
        for room in rooms:
            keys = rw.Keys.of(self.prefix, room, wall)
            args: list[Any] = [self.history, ttl_ms, _new_epoch()]
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
        except _FAILURES as exc:
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
            for (room, user, _, _), result in zip(ops, results, strict=False):
                # The script's [changed, occupancy]: we made the room occupied or empty.
                if isinstance(result, list) and len(result) == 2 and result[1]:
                    occupancy(room, user, result[1] == 1)
        publish_results = results[len(ops) :]
        self.deliver(lambda: self._published(rooms, by_room, publish_results))

    def _fail(self, batch: list[Publication]) -> None:
        listener = self.listener
        if listener is None:
            return
        for p in batch:
            listener.on_publish_failed(p.msg_id, p.room)

    def _published(
        self, rooms: list[str], by_room: dict[str, list[Publication]], results: list[Any]
    ) -> None:
        listener = self.listener
        if listener is None:
            return
        sequenced = 0
        for room, result in zip(rooms, results, strict=True):
            pubs = by_room[room]
            if isinstance(result, BaseException):
                self.stats[_S_ERRORS] += 1
                log_event(
                    log, logging.ERROR, "publish_script_failed", room=room, error=repr(result)
                )
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

    async def _pipeline(self, calls: list[tuple[str, list[str], list[Any]]]) -> list[Any]:
        """The calls as one pipeline (per master on a Cluster); a script Redis does
        not hold (it restarted without its data) is loaded and its calls sent again."""
        results = await self._send(calls)
        missing = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
        if missing:
            await self._load_scripts()
            again = await self._send([calls[i] for i in missing])
            for i, result in zip(missing, again, strict=True):
                results[i] = result
        return results

    async def _send(self, calls: list[tuple[str, list[str], list[Any]]]) -> list[Any]:
        self._count_trip()
        pipe = self.client.pipeline(transaction=False)
        for name, keys, args in calls:
            pipe.execute_command("EVALSHA", self._scripts[name], len(keys), *keys, *args)
        results: list[Any] = await pipe.execute(raise_on_error=False)
        return results

    async def _script(self, client: Any, name: str, keys: list[str], args: list[Any]) -> Any:
        try:
            return await client.evalsha(self._scripts[name], len(keys), *keys, *args)
        except NoScriptError:
            await self._load_scripts()
            return await client.evalsha(self._scripts[name], len(keys), *keys, *args)

    def _count_trip(self) -> None:
        self.stats[_S_TRIPS] += 1

    # Broker: rooms

    def open_room(self, room: str, then: Callable[[], None]) -> bool:
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

    async def _open(self, room: str, state: Room) -> None:
        try:
            await self._subscribe(state)
        except _FAILURES as exc:
            # Redis-py resubscribes once it reconnects; the room's state is read then.
            self.failed("subscribe", exc)
            self.deliver(lambda: self._opened(room, state, None, []))
            return
        await self._load(room, state, resync=False)

    async def _load(self, room: str, state: Room, *, resync: bool) -> None:
        """Read the room's epoch, seq, presence and held history; deliver them."""
        keys = state.keys
        try:
            self._count_trip()
            pipe = self.client.pipeline(transaction=False)
            pipe.execute_command(
                "EVALSHA", self._scripts["state"], 3, keys.seq, keys.epoch, keys.presence,
                _new_epoch(),
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
            with contextlib.suppress(*_FAILURES):
                await self._load_scripts()
            results = None
        except _FAILURES as exc:
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

    def _opened(self, room: str, state: Room, result: Any, held: list[Any]) -> None:
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

    def _ready(self, room: str, state: Room) -> None:
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

    def _resynced(self, room: str, state: Room, result: Any) -> None:
        listener = self.listener
        if listener is None or self.rooms.get(room) is not state:
            return
        epoch, seq, present = result
        state.epoch = epoch.decode() if isinstance(epoch, bytes) else epoch
        state.seq = max(state.seq, int(seq)) if epoch == state.epoch else int(seq)
        listener.on_room_state(room, state.epoch, int(seq))
        self._snapshot(room, state, present)
        self._ready(room, state)

    def _snapshot(self, room: str, state: Room, present: list[bytes]) -> None:
        for pair in present:
            node, _, user = pair.decode().partition("\n")
            if node == self.node:
                continue
            if node not in self._live:
                self._presence_remove(room, state, node, user)  # a dead node's leftover
                continue
            self._remote_presence(room, state, node, user, True)

    def close_room(self, room: str) -> None:
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

    async def _unsubscribe(self, channel: str) -> None:
        with contextlib.suppress(*_FAILURES):
            await self._subscriber(channel).unsubscribe(channel)

    def _subscriber(self, channel: str) -> _Subscriber:
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
            sub = self._subscribers[name] = _Subscriber(self, client, name)
        return sub

    def fill(self, room: str, first: int, last: int) -> None:
        self._spawn(self._fill(room, first, last))

    async def _fill(self, room: str, first: int, last: int) -> None:
        keys = rw.Keys.of(self.prefix, room, time.time())
        try:
            self._count_trip()
            entries = await asyncio.wait_for(
                self.client.xrange(keys.stream, f"{first}-1", f"{last}-1"),
                self.config.redis.timeout,
            )
        except _FAILURES as exc:
            # The engine asks again after its gap timeout.
            self.failed("fill", exc)
            return
        self.stats[_S_READS] += 1
        self.deliver(lambda: self._filled(room, first, last, entries))

    def _filled(self, room: str, first: int, last: int, entries: list[Any]) -> None:
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

    def latest_seq(self, room: str) -> int | None:
        state = self.rooms.get(room)
        return None if state is None or not state.seq else state.seq

    def serves_history(self, room: str) -> bool:
        return False  # Redis does

    def epoch_of(self, room: str) -> str | None:
        state = self.rooms.get(room)
        return self._epochs.get(room) if state is None else state.epoch

    def catch_up(self) -> None:
        """Nothing waits here: what pub/sub delivered was handed over as it came."""

    # Receiving

    def received(self, channel: str, data: bytes) -> None:
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

    def _received(self, room: str, state: Room, data: bytes) -> None:
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
            node, user, joined = item
            if node != self.node:
                self._remote_presence(room, state, node, user, joined)

    def _remote_presence(self, room: str, state: Room, node: str, user: str, joined: bool) -> None:
        if node == self.node:
            return
        users = state.remote.setdefault(node, set())
        if joined:
            users.add(user)
        else:
            users.discard(user)
        self._change(self._peer(node), room, user, joined)

    # What the shard's loop calls (the shared-memory broker's hooks)

    def commit(self) -> None:
        """Publishes go out from :meth:`_kick`; nothing waits for the turn's end."""

    def drain(self, now: float | None = None) -> bool:
        return False

    def tick(self, now: float) -> float | None:
        return None

    def heartbeat(self, now_ns: int) -> None:
        self.stamp(now_ns)

    def record_lag(self) -> None:
        pass


def _new_epoch() -> str:
    return secrets.token_hex(4)


def _host_port(seed: str) -> tuple[str, int]:
    host, _, port = seed.rpartition(":")
    return host, int(port)


def _room_of(channel: str, prefix: str) -> str:
    # prefix + "{" + room + "}:c"
    return channel[len(prefix) + 1 : -3]
