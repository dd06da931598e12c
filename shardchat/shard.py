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
from .addrtable import table_capacity
from .bus import Bus
from .config import Config
from .connection import HANDSHAKE_TIMEOUT
from .context import ShardContext
from .hooks import Hooks
from .hub import SWEEP_SLICES, Hub
from .obs import configure_logging, log_event, set_process_role
from .router import Router
from .tls import server_context

__all__ = ["EXIT_BOOT_ERROR", "ShardSpec", "run_shard"]

log = logging.getLogger(__name__)

EXIT_BOOT_ERROR = 3  # the supervisor stops instead of restarting a shard that cannot boot
# Accepts between two gc.freeze() calls: long-lived connection objects leave the GC's walk.
FREEZE_EVERY = 1000


@dataclass(frozen=True, slots=True, kw_only=True)
class ShardSpec:
    """What the supervisor hands a shard at fork."""

    config: Config
    shard_id: int
    epoch: str
    supervisor_pid: int
    incarnation: int  # 0 at first start, +1 at every restart
    app: object | None = None  # the lifecycle hooks object, loaded by the supervisor
    close_fds: tuple[int, ...] = ()  # the supervisor's descriptors (admin port, wakeup)


def run_shard(spec: ShardSpec) -> None:
    """Process entry point of a shard (the target of the supervisor's fork)."""
    # The child inherits the supervisor's signal setup: undo it before the loop exists.
    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    _drop_inherited(spec.close_fds)
    set_process_role(spec.shard_id)
    configure_logging(spec.config.log.level, spec.config.log.format)
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(_serve(spec))
    except OSError as exc:
        log_event(log, logging.ERROR, "shard_boot_failed", error=str(exc))
        sys.exit(EXIT_BOOT_ERROR)


def _drop_inherited(fds: tuple[int, ...]) -> None:
    """Let go of the supervisor's descriptors, the admin listening socket first:
    a shard holding it would keep the port open after the supervisor is gone.
    Each number is pointed at /dev/null rather than closed, so that the
    supervisor's socket objects copied by the fork never close a reused number."""
    if not fds:
        return
    null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    try:
        for fd in fds:
            try:
                os.dup2(null, fd)
            except OSError:
                pass
    finally:
        os.close(null)


def _attach_stats(spec: ShardSpec) -> tuple[shm.Segment, stats.StatsView]:
    segment = shm.Segment.attach(shm.stats_name(spec.supervisor_pid))
    server = spec.config.server
    workers = spec.config.workers
    addr_capacity = table_capacity(server.max_per_ip, server.max_connections, workers)
    view = stats.StatsView(memoryview(segment.buf), workers, spec.shard_id, addr_capacity)
    mine = view.mine
    assert mine is not None
    # Gauges describe this incarnation; counters carry on across restarts.
    mine[stats.Slot.PID] = os.getpid()
    mine[stats.Slot.STARTED_NS] = time.time_ns()
    mine[stats.Slot.CONNECTIONS] = 0
    mine[stats.Slot.ROOMS] = 0
    if view.addrs is not None:
        view.addrs.clear(spec.shard_id)
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
    server = await loop.create_server(
        hub.new_connection,
        config.server.host,
        config.server.port,
        reuse_port=True,
        backlog=config.server.backlog,
        ssl=server_context(config.server),
        ssl_handshake_timeout=HANDSHAKE_TIMEOUT if config.server.tls_cert else None,
    )
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
        nonlocal frozen_at
        hub.sweep(loop.time())
        bus.heartbeat()
        # A safety net under the doorbells: a drain costs little when idle.
        bus.drain()
        bus.record_lag()
        if os.getppid() != spec.supervisor_pid:
            log_event(log, logging.WARNING, "supervisor_gone")
            request_stop(False)
        if hub.accepted_total - frozen_at >= FREEZE_EVERY:
            frozen_at = hub.accepted_total
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
