"""A shard's lifecycle on its loop: listen, tick, relisten, stop and drain.

This is the only module of the shard that schedules timers: the sweep's
timer (heartbeats, timeouts, the broker's heartbeat and lag, the doorbell's
safety net, the collector's freezes), the relisten after the supervisor took
a stuck shard out of the accept group, and the shutdown.

SIGTERM and SIGINT drain: stop accepting, close every connection with 1001
``shutdown``, exit within ``graceful_timeout``. SIGQUIT exits at once. A
supervisor that disappears (``os.getppid()`` changes) is treated as SIGTERM.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import time
from typing import TYPE_CHECKING

from shardchat import stats
from shardchat.logs import log_event
from shardchat.shard.backend import BackendLinks
from shardchat.shard.connection import HANDSHAKE_TIMEOUT
from shardchat.shard.handler import Shard
from shardchat.shard.sweep import SWEEP_SLICES
from shardchat.tls import server_context

if TYPE_CHECKING:
    from shardchat.shard.process import ShardSpec

__all__ = ["FREEZE_EVERY", "run"]

log = logging.getLogger(__name__)

# Accepts between two gc.collect(); gc.freeze() calls: long-lived connection objects
# leave the GC's walk (closed ones are freed by reference counting: see
# Connection.connection_lost). The collection walks what was not frozen yet, so
# its pause grows with this: 1,000 accepts made a 1.5-2.5 ms pause once a
# second at 1,000 conn/s (in the connect p99); 200 make it a fifth.
FREEZE_EVERY = 200
_S_UNLISTENED = int(stats.Slot.UNLISTENED)


async def run(spec: ShardSpec, loop: asyncio.AbstractEventLoop, shard: Shard) -> None:
    """Listen and serve until a signal; then drain (or not, on SIGQUIT) and return."""
    config = spec.config
    mine = shard.counters.mine
    assert mine is not None
    links = BackendLinks(spec, shard)

    async def listen() -> asyncio.Server:
        listening = await loop.create_server(
            shard.new_connection,
            config.server.host,
            config.server.port,
            reuse_port=True,
            backlog=config.server.backlog,
            ssl=server_context(config.server),
            ssl_handshake_timeout=HANDSHAKE_TIMEOUT if config.server.tls_cert else None,
        )
        # The supervisor takes it out of the accept group when our loop stops beating.
        mine[stats.Slot.LISTEN_FD] = listening.sockets[0].fileno()
        return listening

    server = await listen()
    relistening = False
    api_server: asyncio.Server | None = None
    api = config.api
    if api.key and api.port:
        # The server API's own listener (e.g. an internal address), shared by the
        # shards like the main port.
        api_server = await loop.create_server(
            shard.new_api_connection,
            api.host,
            api.port,
            reuse_port=True,
            backlog=config.server.backlog,
            ssl=server_context(config.server),
        )

    async def relisten() -> None:
        # The supervisor shut our socket down while the loop was stuck: a fresh one
        # joins the port's SO_REUSEPORT group again.
        nonlocal server, relistening
        old, server = server, await listen()
        old.close()
        mine[_S_UNLISTENED] = 0
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
    broker = shard.broker

    def sweep() -> None:
        nonlocal frozen_at, relistening
        if mine[_S_UNLISTENED] and not relistening and not stop.is_set():
            relistening = True
            loop.create_task(relisten())
        shard.sweep(loop.time())
        broker.heartbeat(time.monotonic_ns())
        # A safety net under the doorbells: a read costs little when idle.
        shard.read_peers()
        broker.record_lag()
        if os.getppid() != spec.supervisor_pid:
            log_event(log, logging.WARNING, "supervisor_gone")
            request_stop(False)
        if shard.accepted_total - frozen_at >= FREEZE_EVERY:
            frozen_at = shard.accepted_total
            # Collect first: what is garbage now must not be frozen for ever. The walk
            # covers only what was not frozen yet (at most about FREEZE_EVERY
            # connections' objects), so the pause stays short.
            gc.collect()
            gc.freeze()
        if not stop.is_set() or shard.connections or shard.api_conns:
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
    if api_server is not None:
        api_server.close()
    if not quick:
        shard.drain_connections()
        try:
            await asyncio.wait_for(
                shard.all_closed.wait(), max(0.1, config.server.graceful_timeout - 0.5)
            )
        except TimeoutError:
            log_event(log, logging.WARNING, "drain_timeout", connections=len(shard.connections))
    for conn in list(shard.connections):
        conn.abort()
    await links.close(quick)
    for api_conn in list(shard.api_conns):
        api_conn.abort()
    log_event(log, logging.INFO, "shard_exit", connections_left=len(shard.connections))
