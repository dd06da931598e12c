"""A shard's boot: attach the shared memory, build the broker and the engine, run.

The shard attaches to the box's stats segment and rings, has its broker
rebuild the rooms from them (``broker.kind = "shm"``) or connect to Redis
(``"redis"``, where our ring still carries the heartbeat the supervisor
watches), builds the room engine and hands everything to the lifecycle.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from shardchat import stats
from shardchat.addrtable import PeerTable, table_capacity
from shardchat.auth import verifier_from_config
from shardchat.brokers import segments
from shardchat.brokers.shm import ShmBroker
from shardchat.core.broker import Broker
from shardchat.core.engine import RoomEngine, settle
from shardchat.hooks import Hooks
from shardchat.logs import EventLogger
from shardchat.shard.apicontrol import ApiControl
from shardchat.shard.apiserver import ApiServer
from shardchat.shard.connection import Connection
from shardchat.shard.handler import Shard
from shardchat.shard.lifecycle import run
from shardchat.storage.durable import Durable, Turn
from shardchat.storage.store import RoomStore

if TYPE_CHECKING:
    from shardchat.shard.process import ShardSpec

__all__ = ["serve"]


async def serve(spec: ShardSpec) -> bool:
    """The shard's whole life on its loop: boot, serve, drain, let go; whether the
    room store closed with messages it could not write (they are in our ring)."""
    config = spec.config
    loop = asyncio.get_running_loop()
    stats_segment, counters = _attach_stats(spec)
    mine = counters.mine
    assert mine is not None
    if config.broker.kind == "redis":
        await _serve_redis(spec, loop, counters, mine)
        stats_segment.close()
        return False
    broker = _attach_rings(spec, mine)
    shard: Shard | None = None
    try:
        if spec.store:
            broker.durable = _open_store(spec)
        engine = _engine(spec, broker, counters, mine)
        now = time.monotonic()
        engine.advance(now, time.time())
        broker.recover(engine.inbox, now)
        settle(engine, broker)  # the restored history, applied
        broker.commit()
        shard = Shard(
            config, spec.shard_id, engine, broker, counters, loop, broker.bells[spec.shard_id]
        )
        shard.api = ApiServer(ApiControl(config, engine, broker, mine, spec.shard_id))
        if broker.durable is not None:
            broker.durable.store.wake = _wake_on_stored(loop, shard, broker)
        shard.start_bell()
        await run(spec, loop, shard)
    finally:
        if shard is not None:
            shard.stop_bell()
        broker.close()
        counters.release()
        stats_segment.close()
    return broker.unstored > 0


def _attach_stats(spec: ShardSpec) -> tuple[segments.Segment, stats.StatsView]:
    segment = segments.Segment.attach(segments.stats_name(spec.supervisor_pid))
    server = spec.config.server
    workers = spec.config.workers
    addr_capacity = table_capacity(server.max_per_ip, server.max_connections, workers)
    view = stats.StatsView(memoryview(segment.buf), workers, spec.shard_id, addr_capacity)
    if view.addrs is not None:
        view.addrs.clear(spec.shard_id)
    mine = view.mine
    assert mine is not None
    # Gauges describe this incarnation; counters carry on across restarts.
    mine[stats.Slot.PID] = os.getpid()
    mine[stats.Slot.STARTED_NS] = time.time_ns()
    mine[stats.Slot.CONNECTIONS] = 0
    mine[stats.Slot.ROOMS] = 0
    mine[stats.Slot.UNLISTENED] = 0
    mine[stats.Slot.LISTEN_FD] = 0  # not listening yet
    for peer in range(spec.config.workers):
        mine[stats.LAG_BASE + peer] = 0
    return segment, view


def _open_store(spec: ShardSpec) -> Durable:
    """This shard's room store, its writer started (it wakes the loop once the
    shard is built: :func:`_wake_on_stored`)."""
    config = spec.config
    store: RoomStore[Turn] = RoomStore(
        Path(spec.store),
        fsync=config.storage.fsync,
        max_bytes=config.storage.max_bytes // config.workers,
        history=config.delivery.history,
        history_ttl=config.delivery.history_ttl,
        wake=lambda: None,
        write_every=config.storage.write_every,
    )
    store.start()
    return Durable(store, acks_wait=config.storage.fsync == "always", ring_bytes=config.ring.bytes)


def _wake_on_stored(
    loop: asyncio.AbstractEventLoop, shard: Shard, broker: ShmBroker
) -> Callable[[], None]:
    """The writer thread's wake-up when acks that waited for it are back: the loop
    is called straight (one call at a time), not through our doorbell's thread
    and a read of every ring."""
    pending = False

    def stored() -> None:
        nonlocal pending
        pending = False
        if broker.listener is not None:  # else closed
            shard.broker_input(broker.read_stored)

    def wake() -> None:
        nonlocal pending
        if pending:
            return
        pending = True
        try:
            loop.call_soon_threadsafe(stored)
        except RuntimeError:
            pass  # the loop is closed: the shard is exiting

    return wake


def _attach_rings(spec: ShardSpec, mine: stats.Counters) -> ShmBroker:
    """This shard's view of the box's rings: its own to write, every ring to read."""
    config = spec.config
    return ShmBroker.attach(
        spec.supervisor_pid,
        spec.shard_id,
        config.workers,
        config.ring.bytes,
        config.ring.rooms,
        mine,
        config.delivery.publish_timeout,
        config.overload,
    )


def _engine(
    spec: ShardSpec, broker: Broker, counters: stats.StatsView, mine: stats.Counters
) -> RoomEngine[Connection]:
    verifier = verifier_from_config(spec.config.auth)
    return RoomEngine(
        spec.config,
        spec.shard_id,
        spec.epoch,
        broker,
        mine,
        Hooks(spec.app),
        id_prefix=secrets.token_hex(3),
        verify=None if verifier is None else verifier.verify,
        peers=None if counters.addrs is None else PeerTable(counters.addrs),
        log=EventLogger("shardchat.core.engine"),
    )


async def _serve_redis(
    spec: ShardSpec,
    loop: asyncio.AbstractEventLoop,
    counters: stats.StatsView,
    mine: stats.Counters,
) -> None:
    """A shard whose rooms go through Redis (several boxes)."""
    from shardchat.brokers.redis.broker import RedisBroker  # the optional extra

    config = spec.config
    shard: Shard | None = None

    def deliver(step: Callable[[], None]) -> None:
        assert shard is not None
        shard.broker_input(step)

    broker = RedisBroker(config, spec.shard_id, mine, deliver)
    # The rings carry no rooms here, but our ring's header still carries the
    # heartbeat the supervisor watches (server.shard_timeout).
    rings = _attach_rings(spec, mine)
    broker.stamp = rings.heartbeat
    try:
        engine = _engine(spec, broker, counters, mine)
        engine.advance(time.monotonic(), time.time())
        shard = Shard(config, spec.shard_id, engine, broker, counters, loop)
        shard.api = ApiServer(ApiControl(config, engine, broker, mine, spec.shard_id))
        # Connected (or trying, in the background) and beating before we accept.
        await broker.start(engine.inbox)
        await run(spec, loop, shard)
    finally:
        await broker.close()
        rings.close()
        counters.release()
