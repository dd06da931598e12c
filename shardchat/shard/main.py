"""A shard: one process, one uvloop loop, one SO_REUSEPORT listening socket.

Entered in the child right after the supervisor forks it (no loop or thread
exists before that, python/asyncio#347). It attaches to the shared memory,
has its broker rebuild the rooms from it, binds its own socket, so that the
kernel spreads connections over the shards' accept queues, and drives the
room engine.

This is the only module of the shard that schedules anything. :class:`Shard`
is the connection adapter's handler: it hands the engine plain values, takes
the engine's output after every input and writes it, and owns

- the end of each loop turn (one ``call_soon``): the broker commits the
  turn's records (then acks what they hold) and the engine's per-room frames
  are written, each room's joined once, once to each member;
- the doorbell: a thread blocked on our semaphore wakes the loop
  (``call_soon_threadsafe``), which absorbs extra posts and drains the
  rings; measured here, this bridge adds about 15-20 us per wake-up over an
  eventfd with ``loop.add_reader``;
- the sweep: heartbeats and timeouts of a slice of the connections per call,
  and once per pass the engine's and the broker's timers.

With ``broker.kind = "redis"`` the broker is a
:class:`~shardchat.brokers.redis_broker.RedisBroker` instead: no doorbell, and
what it hears from Redis comes in through :meth:`Shard.broker_input`.

SIGTERM and SIGINT drain: stop accepting, close every connection with 1001
``shutdown``, exit within ``graceful_timeout``. SIGQUIT exits at once. A
supervisor that disappears (``os.getppid()`` changes) is treated as SIGTERM.
"""

from __future__ import annotations

import asyncio
import base64
import gc
import hashlib
import logging
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import uvloop

from shardchat import stats
from shardchat.addrtable import table_capacity
from shardchat.auth import verifier_from_config
from shardchat.brokers import segments
from shardchat.brokers.shm import Bell, ShmBroker
from shardchat.core.admission import Upgrade
from shardchat.core.broker import Broker, BrokerListener
from shardchat.core.config import Config
from shardchat.core.engine import RoomEngine
from shardchat.core.errors import RingError
from shardchat.core.outputs import Close, Paced
from shardchat.core.wire import text_frame
from shardchat.hooks import Hooks
from shardchat.logs import configure_logging, log_event, set_process_role
from shardchat.shard.connection import HANDSHAKE_TIMEOUT, Connection
from shardchat.tls import server_context

__all__ = ["EXIT_BOOT_ERROR", "SWEEP_CHUNK", "SWEEP_SLICES", "Shard", "ShardSpec", "run_shard"]

log = logging.getLogger(__name__)

EXIT_BOOT_ERROR = 3  # the supervisor stops instead of restarting a shard that cannot boot
# Accepts between two gc.collect(); gc.freeze() calls: long-lived connection objects
# leave the GC's walk (closed ones are freed by reference counting: see
# Connection.connection_lost). The collection walks what was not frozen yet, so
# its pause grows with this: 1,000 accepts made a 1.5-2.5 ms pause once a
# second at 1,000 conn/s (in the connect p99); 200 make it a fifth.
FREEZE_EVERY = 200
# A pass over every connection takes this many sweep calls: with 15,000
# connections a call ticks 300 of them (some 150 us)...
SWEEP_SLICES = 50
# ...in chunks of this many, one per loop turn, so that the I/O that came
# meanwhile (a ping, an accept) waits for one chunk (some 20 us) and not the
# slice: the slice showed in the ping RTT p99 (perf/RESULTS.md, issue 14).
SWEEP_CHUNK = 32
BELL_WAIT = 0.2  # seconds; the bell thread checks for shutdown this often
_NONES: list[None] = [None] * SWEEP_CHUNK
_CHAT_PAGE = Path(__file__).parent.parent / "static" / "index.html"
_S_CONNECTIONS = int(stats.Slot.CONNECTIONS)
_S_UNLISTENED = int(stats.Slot.UNLISTENED)
_TEXT = "text/plain; charset=utf-8"

_monotonic = time.monotonic
_time = time.time


class LoopBroker(Broker, Protocol):
    """What the shard's loop calls on its broker, besides the engine's calls."""

    listener: BrokerListener | None

    @property
    def commit_due(self) -> bool: ...

    def commit(self) -> None: ...

    def drain(self, now: float | None = None) -> bool: ...

    def tick(self, now: float) -> float | None: ...

    def heartbeat(self, now_ns: int) -> None: ...

    def record_lag(self) -> None: ...


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


class Shard:
    """One shard's loop around its engine and broker (the connections' handler)."""

    def __init__(
        self,
        config: Config,
        shard_id: int,
        engine: RoomEngine[Connection],
        broker: LoopBroker,
        counters: stats.StatsView,
        loop: asyncio.AbstractEventLoop,
        bell: Bell | None = None,
    ) -> None:
        self.config = config
        self.shard_id = shard_id
        self.engine = engine
        self.broker = broker
        self.bell = bell  # our doorbell (the shared-memory broker); None: none to wait on
        self.counters = counters
        self.loop = loop
        self.clock = loop.time()  # the connections' coarse clock, refreshed by the sweep
        self.heartbeat_interval = config.heartbeat.interval
        self.max_frame = config.limits.max_frame
        self.send_queue = config.limits.send_queue
        self.connections: set[Connection] = set()
        self.accepted_total = 0
        self.all_closed = asyncio.Event()
        self._chat_page = _CHAT_PAGE.read_bytes()
        self.page_csp = _page_csp(self._chat_page)
        self._next_conn_id = 0
        self._turn_due = False
        self._drain_due = False
        self._wake_pending = False
        # The sweep's pass: its connections, and the next pass's as they come (the
        # live ones this pass ticked, then the ones added meanwhile), so that a
        # pass starts without copying the whole set (0.3-0.5 ms at 15,000: an
        # incref, a cache miss, per connection, once a pass).
        self._sweep_list: list[Connection | None] = []  # None: ticked, let go
        self._sweep_next: list[Connection | None] = []
        self._sweep_new: list[Connection] = []
        self._sweep_at = 0  # the next of this pass's connections to tick
        self._sweep_end = 0  # where this slice ends (its chunks go on until there)
        self._sweep_now = 0.0  # the slice's loop time
        self._stopping = threading.Event()
        self._bell_thread: threading.Thread | None = None

    # Output

    def _emit(self) -> None:
        """Write what the engine produced, in its order, and end the turn later."""
        engine = self.engine
        out = engine.out
        if out:
            engine.out = []
            _write(out)
        if not self._turn_due and (engine.flush_due or self.broker.commit_due):
            self._turn_due = True
            self.loop.call_soon(self._end_turn)

    def _end_turn(self) -> None:
        """Commit the turn's records (acks follow), then write each room's frames."""
        self._turn_due = False
        engine = self.engine
        engine.take_deferred()
        self.broker.commit()
        out = engine.out
        if out:
            engine.out = []
        if engine.flush_due:
            rooms = engine.flush()
            if out:
                _write_turn(out, rooms)
            else:
                _write(rooms)
        elif out:
            _write(out)

    # ConnectionHandler

    def new_connection(self) -> Connection:
        self._next_conn_id += 1
        conn = Connection(self, self._next_conn_id)
        self.add(conn)
        self.accepted_total += 1
        return conn

    def add(self, conn: Connection) -> None:
        """Hold ``conn``: the sweep ticks it from its next pass on."""
        self.connections.add(conn)
        self._sweep_new.append(conn)

    def http_get(self, path: str) -> tuple[int, str, bytes]:
        if path == "/healthz":
            if self.engine.draining:
                return 503, _TEXT, b"draining\n"
            return 200, _TEXT, b"ok\n"
        if path in ("/", "/index.html"):
            return 200, "text/html; charset=utf-8", self._chat_page
        return 404, _TEXT, b"not found\n"

    def refuse_upgrade(
        self, conn: Connection, path: str, query: str, headers: dict[str, str]
    ) -> tuple[int, str] | None:
        engine = self.engine
        engine.advance(_monotonic(), _time())
        # Upgraded connections on every shard (handshakes under way do not count).
        connections = self.counters.total(_S_CONNECTIONS)
        upgrade = Upgrade(conn.conn_id, conn.peer, path, query, headers)
        refusal = engine.admit(conn, upgrade, connections)
        return None if refusal is None else (refusal.status, refusal.text)

    def opened(self, conn: Connection) -> None:
        self.engine.open(conn)
        self._emit()

    def text_received(self, conn: Connection, data: bytes | bytearray | memoryview) -> None:
        engine = self.engine
        engine.advance(_monotonic(), _time())
        engine.receive(conn, data)
        self._emit()

    def broker_input(self, step: Callable[[], None]) -> None:
        """Something the broker heard (from Redis) for the engine: the time first,
        the engine's output after."""
        engine = self.engine
        engine.advance(_monotonic(), _time())
        step()
        self._emit()

    def closed(self, conn: Connection) -> None:
        self.connections.discard(conn)
        if self.engine.draining and not self.connections:
            self.all_closed.set()
        self.engine.closed(conn, conn.close_code, conn.close_reason)
        self._emit()

    def slow_consumer(self, conn: Connection) -> None:
        # PROTOCOL.md: close 4429, from the next turn, outside the write() that
        # found the client slow.
        self.loop.call_soon(self._close_slow, conn)

    def _close_slow(self, conn: Connection) -> None:
        if conn.close_slow():
            state = self.engine.conns.get(conn)
            user = state.user if state is not None else None
            log_event(log, logging.INFO, "slow_consumer", conn=conn.conn_id, user=user)

    # The doorbell

    def start_bell(self) -> None:
        """Deliver the peers' records from now on: wake on our doorbell."""
        if self.bell is None:
            return
        self._bell_thread = threading.Thread(
            target=self._bell_loop, name="shardchat-bell", daemon=True
        )
        self._bell_thread.start()
        self.drain()

    def _bell_loop(self) -> None:
        bell = self.bell
        assert bell is not None
        loop = self.loop
        while not self._stopping.is_set():
            if bell.wait(BELL_WAIT) and not self._wake_pending:
                self._wake_pending = True
                try:
                    loop.call_soon_threadsafe(self._wake)
                except RuntimeError:
                    return  # the loop is closed: the shard is exiting

    def _wake(self) -> None:
        self._wake_pending = False
        if self.broker.listener is None:
            return  # closed
        # Absorb the posts that arrived meanwhile, then read: in that order no
        # post is lost between a drain and the next wait (STYLE.md section 4).
        assert self.bell is not None
        self.bell.drain()
        self.drain()

    def drain(self) -> None:
        """Hand the peers' new records to the engine; again next turn if there is more."""
        self._drain_due = False
        now = _monotonic()
        self.engine.advance(now, _time())
        more = self.broker.drain(now)
        self._emit()
        if more and not self._drain_due:
            self._drain_due = True
            self.loop.call_soon(self.drain)

    def stop_bell(self) -> None:
        self._stopping.set()
        if self._bell_thread is not None:
            self._bell_thread.join(2 * BELL_WAIT)

    # The sweep

    def sweep(self, now: float) -> None:
        """One slice of the shard's sweep (``SWEEP_SLICES`` slices a pass): heartbeats
        and timeouts of a slice of the connections, so that no single pause grows
        with all of them; the engine's and the broker's timers once per pass."""
        self.clock = now
        if self._sweep_at >= len(self._sweep_list):
            # No copy: the next list was built as the last pass went (a copy would
            # incref every connection at once).
            self._sweep_list = self._sweep_next
            self._sweep_list += self._sweep_new
            self._sweep_next, self._sweep_new = [], []
            self._sweep_at = self._sweep_end = 0  # no chunk is pending: the pass is done
            engine = self.engine
            mono = _monotonic()
            engine.advance(mono, _time())
            engine.tick()
            self.broker.tick(mono)
            self._emit()
        chunking = self._sweep_at < self._sweep_end  # the last slice's chunks go on
        self._sweep_now = now
        self._sweep_end = min(
            len(self._sweep_list),
            max(self._sweep_end, self._sweep_at) + -(-len(self._sweep_list) // SWEEP_SLICES),
        )
        if not chunking:
            self._sweep_chunk()

    def _sweep_chunk(self) -> None:
        """``SWEEP_CHUNK`` connections of the slice, then the rest on the loop's next
        turn: a pong that arrives meanwhile waits for one chunk, not the slice."""
        hb = self.config.heartbeat
        interval, timeout, idle = hb.interval, hb.timeout, hb.idle_timeout
        now = self._sweep_now
        start = self._sweep_at
        end = min(self._sweep_end, start + SWEEP_CHUNK)
        held, carried, listed = self.connections, self._sweep_next, self._sweep_list
        for conn in listed[start:end]:
            if conn in held:  # not closed since it was listed
                conn.tick(now, interval, timeout, idle)
                carried.append(conn)
        # Let go of them chunk by chunk: dropping the whole list at the next pass
        # start would be a decref, a cache miss, per connection at once.
        listed[start:end] = _NONES[: end - start]
        self._sweep_at = end
        if end < self._sweep_end:
            self.loop.call_soon(self._sweep_chunk)

    def drain_connections(self) -> None:
        """Stop taking connections and close every open one with 1001 ``shutdown``."""
        self.broker.commit()
        _write(self.engine.drain())
        if not self.connections:
            self.all_closed.set()
        for conn in list(self.connections):
            if conn.is_open:
                conn.close(1001, "shutdown")
            elif conn.close_deadline == 0.0:
                conn.abort()


def _write_turn(
    out: list[tuple[Iterable[Connection], bytes | Close | Paced]],
    rooms: list[tuple[Iterable[Connection], bytes | Close | Paced]],
) -> None:
    """The end of a turn: the replies (acks above all), then the rooms' frames.

    A sender is usually a member of the room it published to, so its ack and
    the room's frames of the turn go out in one write instead of two (a tenth
    of the writes of small rooms). Each connection still gets its replies
    before its room frames; only the order between different connections
    changes, which nobody can see. A close or a paced replay among the replies
    keeps the plain order.
    """
    held: dict[Connection, bytes] = {}
    for conns, item in out:
        if type(item) is not bytes:
            _write(out)
            _write(rooms)
            return
        for conn in conns:
            before = held.get(conn)
            held[conn] = item if before is None else before + item
    take = held.pop
    for conns, item in rooms:
        assert type(item) is bytes  # flush() returns frames only
        for conn in conns:
            transport = conn.out
            if transport is not None:
                first = take(conn, None)
                transport.write(item if first is None else first + item)
    for conn, item in held.items():
        transport = conn.out
        if transport is not None:
            transport.write(item)


def _write(out: Iterable[tuple[Iterable[Connection], bytes | Close | Paced]]) -> None:
    """The engine's output onto the transports: the fan-out's hot loop.

    A frame goes to ``conn.out``, which the adapter sets exactly while frames may
    be written beside the Sans-I/O protocol (the transport, or the connection's
    own queue); replays are paced by the adapter; closes go through it.
    """
    for conns, item in out:
        if type(item) is bytes:
            for conn in conns:
                transport = conn.out
                if transport is not None:
                    transport.write(item)
        elif type(item) is Paced:
            payloads = item.payloads
            for conn in conns:
                conn.send_paced(text_frame(payload) for payload in payloads)
        else:
            assert isinstance(item, Close)
            for conn in conns:
                if item.fail:
                    conn.fail(item.code, item.reason)
                else:
                    conn.close(item.code, item.reason)


def _page_csp(page: bytes) -> str:
    """The chat page's Content-Security-Policy: its own inline script and style by
    hash, WebSockets to this origin, nothing else (no framing, no other origins)."""
    hashes = {
        kind: " ".join(
            "'sha256-" + base64.b64encode(hashlib.sha256(body).digest()).decode() + "'"
            for body in re.findall(rb"<" + kind.encode() + rb">(.*?)</" + kind.encode(), page, re.S)
        )
        for kind in ("script", "style")
    }
    return (
        f"default-src 'none'; script-src {hashes['script']}; style-src {hashes['style']}; "
        "connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    )


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
    except (OSError, RingError) as exc:
        # A port that cannot be bound, a segment that is not a ring: restarting
        # would fail the same way, so the supervisor stops instead.
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


async def _serve(spec: ShardSpec) -> None:
    config = spec.config
    loop = asyncio.get_running_loop()
    stats_segment, counters = _attach_stats(spec)
    mine = counters.mine
    assert mine is not None
    if config.broker.kind == "redis":
        await _serve_redis(spec, loop, counters, mine)
        stats_segment.close()
        return
    broker = _attach_rings(spec, mine)
    shard: Shard | None = None
    try:
        engine = _engine(spec, broker, counters, mine)
        now = time.monotonic()
        engine.advance(now, time.time())
        broker.recover(engine, now)
        broker.commit()
        shard = Shard(
            config, spec.shard_id, engine, broker, counters, loop, broker.bells[spec.shard_id]
        )
        shard.start_bell()
        await _run(spec, loop, shard)
    finally:
        if shard is not None:
            shard.stop_bell()
        broker.close()
        counters.release()
        stats_segment.close()


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
        verify=None if verifier is None else verifier.verify,
        addrs=counters.addrs,
    )


async def _serve_redis(
    spec: ShardSpec,
    loop: asyncio.AbstractEventLoop,
    counters: stats.StatsView,
    mine: stats.Counters,
) -> None:
    """A shard whose rooms go through Redis (DESIGN.md, Beyond one box)."""
    from shardchat.brokers.redis_broker import RedisBroker  # the optional extra

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
        # Connected (or trying, in the background) and beating before we accept.
        await broker.start(engine)
        await _run(spec, loop, shard)
    finally:
        await broker.close()
        rings.close()
        counters.release()


async def _run(spec: ShardSpec, loop: asyncio.AbstractEventLoop, shard: Shard) -> None:
    config = spec.config
    mine = shard.counters.mine
    assert mine is not None

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
        # A safety net under the doorbells: a drain costs little when idle.
        shard.drain()
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
        if not stop.is_set() or shard.connections:
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
        shard.drain_connections()
        try:
            await asyncio.wait_for(
                shard.all_closed.wait(), max(0.1, config.server.graceful_timeout - 0.5)
            )
        except TimeoutError:
            log_event(log, logging.WARNING, "drain_timeout", connections=len(shard.connections))
    for conn in list(shard.connections):
        conn.abort()
    log_event(log, logging.INFO, "shard_exit", connections_left=len(shard.connections))
