"""A shard: one process, one uvloop loop, one SO_REUSEPORT listening socket.

Entered in the child right after the supervisor forks it (no loop or thread
exists before that, python/asyncio#347). It attaches to the shared memory,
rebuilds its rooms from it, binds its own socket, so that the kernel spreads
connections over the shards' accept queues, serves the connection adapter
with a :class:`~shardchat.hub.Hub`, and runs one sweep per tick for
heartbeats, timeouts, forward retries and gauges. SIGTERM and SIGINT drain:
stop accepting, close every connection with 1001 ``shutdown``, exit within
``graceful_timeout``. SIGQUIT exits at once. A supervisor that disappears
(``os.getppid()`` changes) is treated as SIGTERM.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass

import uvloop

from . import shm, stats
from .bus import Bus
from .config import Config
from .context import ShardContext
from .hooks import Hooks
from .hub import SWEEP_SLICES, Hub
from .obs import configure_logging, log_event, set_process_role
from .router import Router

__all__ = ["EXIT_BOOT_ERROR", "ShardSpec", "run_shard"]

log = logging.getLogger(__name__)

EXIT_BOOT_ERROR = 3  # the supervisor stops instead of restarting a shard that cannot boot
# Accepts between two gc.collect(); gc.freeze() calls: long-lived connection objects
# leave the GC's walk (closed ones are freed by reference counting: see
# Connection.connection_lost).
FREEZE_EVERY = 1000
_S_UNLISTENED = int(stats.Slot.UNLISTENED)


@dataclass(frozen=True, slots=True, kw_only=True)
class ShardSpec:
    """What the supervisor hands a shard at fork."""

    config: Config
    shard_id: int
    epoch: str
    supervisor_pid: int
    incarnation: int  # 0 at first start, +1 at every restart
    app: object | None = None  # the lifecycle hooks object, loaded by the supervisor


def run_shard(spec: ShardSpec) -> None:
    """Process entry point of a shard (the target of the supervisor's fork)."""
    # The child inherits the supervisor's signal setup: undo it before the loop exists.
    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    set_process_role(spec.shard_id)
    configure_logging(spec.config.log.level, spec.config.log.format)
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(_serve(spec))
    except OSError as exc:
        log_event(log, logging.ERROR, "shard_boot_failed", error=str(exc))
        sys.exit(EXIT_BOOT_ERROR)


def _attach_stats(spec: ShardSpec) -> tuple[shm.Segment, stats.StatsView]:
    segment = shm.Segment.attach(shm.stats_name(spec.supervisor_pid))
    view = stats.StatsView(memoryview(segment.buf), spec.config.workers, spec.shard_id)
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


async def _serve(spec: ShardSpec) -> None:
    config = spec.config
    loop = asyncio.get_running_loop()
    stats_segment, counters = _attach_stats(spec)
    assert counters.mine is not None
    bus = Bus(
        loop,
        spec.supervisor_pid,
        spec.shard_id,
        config.workers,
        config.ring.bytes,
        config.ring.rooms,
    )
    bus.counters = counters.mine
    try:
        router = Router(ShardContext(config, spec.shard_id, spec.epoch, bus, loop, counters.mine))
        router.recover()
        hub = Hub(config, spec.shard_id, router, loop, counters, Hooks(spec.app))
        await _run(spec, loop, hub, bus)
    finally:
        bus.close()
        counters.release()
        stats_segment.close()


async def _run(spec: ShardSpec, loop: asyncio.AbstractEventLoop, hub: Hub, bus: Bus) -> None:
    config = spec.config
    mine = bus.counters
    assert mine is not None

    async def listen() -> asyncio.Server:
        listening = await loop.create_server(
            hub.new_connection,
            config.server.host,
            config.server.port,
            reuse_port=True,
            backlog=config.server.backlog,
        )
        # The supervisor takes it out of the accept group when our loop stops beating.
        mine[stats.Slot.LISTEN_FD] = listening.sockets[0].fileno()
        return listening

    server = await listen()
    relistening = False

    async def relisten() -> None:
        # The supervisor shut our socket down while the loop was stuck: a fresh one
        # joins the port's SO_REUSEPORT group again.
        nonlocal server, relistening
        old, server = server, await listen()
        old.close()
        mine[stats.Slot.UNLISTENED] = 0
        relistening = False
        log_event(log, logging.WARNING, "shard_relisten")

    stop = asyncio.Event()
    quick = False

    def request_stop(is_quick: bool) -> None:
        nonlocal quick
        quick = quick or is_quick
        stop.set()

    loop.add_signal_handler(signal.SIGTERM, request_stop, False)
    loop.add_signal_handler(signal.SIGINT, request_stop, False)
    loop.add_signal_handler(signal.SIGQUIT, request_stop, True)

    hb = config.heartbeat
    # A full pass over the connections takes one tick, in SWEEP_SLICES calls.
    tick = min(1.0, hb.interval / 2, hb.timeout / 2, config.delivery.ack_timeout / 2)
    tick /= SWEEP_SLICES
    frozen_at = 0

    def sweep() -> None:
        nonlocal frozen_at, relistening
        hub.sweep(loop.time())
        bus.heartbeat()
        if mine[_S_UNLISTENED] and not relistening and not stop.is_set():
            relistening = True
            loop.create_task(relisten())
        # A safety net under the doorbells: a drain costs little when idle.
        bus.drain()
        bus.record_lag()
        if os.getppid() != spec.supervisor_pid:
            log_event(log, logging.WARNING, "supervisor_gone")
            request_stop(False)
        if hub.accepted_total - frozen_at >= FREEZE_EVERY:
            frozen_at = hub.accepted_total
            # Collect first: what is garbage now must not be frozen for ever. The walk
            # covers only what was not frozen yet (at most about FREEZE_EVERY
            # connections' objects), so the pause stays short.
            gc.collect()
            gc.freeze()
        if not stop.is_set() or hub.connections:
            loop.call_later(tick, sweep)

    gc.collect()
    gc.freeze()
    loop.call_later(tick, sweep)
    log_event(
        log,
        logging.INFO,
        "shard_start",
        pid=os.getpid(),
        port=config.server.port,
        incarnation=spec.incarnation,
    )
    await stop.wait()

    server.close()
    if not quick:
        hub.drain()
        try:
            await asyncio.wait_for(
                hub.all_closed.wait(), max(0.1, config.server.graceful_timeout - 0.5)
            )
        except TimeoutError:
            log_event(log, logging.WARNING, "drain_timeout", connections=len(hub.connections))
    for conn in list(hub.connections):
        conn.abort()
    log_event(log, logging.INFO, "shard_exit", connections_left=len(hub.connections))
