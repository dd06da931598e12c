"""The shard's handler of its connections: engine inputs in, the engine's output written.

:class:`Shard` hands the engine plain values, takes the engine's output after
every input and writes it, and owns the end of each loop turn (one
``call_soon``): the broker commits the turn's records (then acks what they
hold) and the engine's per-room frames are written, each room's joined once,
once to each member.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from shardchat import stats
from shardchat.backend.proxy import ConnectProxy, PublishProxy
from shardchat.backend.webhooks import WebhookSender
from shardchat.brokers.shm import Bell
from shardchat.core.admission import Upgrade
from shardchat.core.broker import Broker, BrokerListener
from shardchat.core.config import Config
from shardchat.core.engine import RoomEngine, after_input, end_turn
from shardchat.core.errors import ApiError
from shardchat.core.hookevents import ProxiedPublish, Verdict
from shardchat.logs import log_event
from shardchat.shard.apiconn import Answer, ApiConnection
from shardchat.shard.apiserver import ApiServer
from shardchat.shard.bell import Doorbell
from shardchat.shard.connection import Connection
from shardchat.shard.handshake import Later
from shardchat.shard.journal import Journal
from shardchat.shard.pages import Pages
from shardchat.shard.sweep import Sweep
from shardchat.shard.upgrades import ask_connect_proxy, proxied
from shardchat.shard.writer import Output, write, write_turn

if TYPE_CHECKING:
    from shardchat.auth import Identity

__all__ = ["LoopBroker", "Shard"]

log = logging.getLogger(__name__)

_S_CONNECTIONS = int(stats.Slot.CONNECTIONS)

_monotonic = time.monotonic
_time = time.time


class LoopBroker(Broker, Protocol):
    """What the shard's loop calls on its broker, besides the engine's calls."""

    listener: BrokerListener | None
    # Told when a room's presence, held here, got its first user or lost its last.
    occupancy: Callable[[str, str, bool], None] | None

    @property
    def commit_due(self) -> bool: ...

    def commit(self) -> None: ...

    def read_peers(self, now: float | None = None) -> bool: ...

    def tick(self, now: float) -> float | None: ...

    def heartbeat(self, now_ns: int) -> None: ...

    def record_lag(self) -> None: ...


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
        self.counters = counters
        self.loop = loop
        self.clock = loop.time()  # the connections' coarse clock, refreshed by the sweep
        self.heartbeat_interval = config.heartbeat.interval
        self.max_frame = config.limits.max_frame
        self.send_queue = config.limits.send_queue
        self.connections: set[Connection] = set()
        self.accepted_total = 0
        self.all_closed = asyncio.Event()
        self.pages = Pages()
        self.page_csp = self.pages.csp
        self.sweeper = Sweep(self.connections, loop, config.heartbeat, self._pass)
        # Our doorbell (the shared-memory broker); None: none to wait on.
        self.doorbell = None if bell is None else Doorbell(bell, loop, self._rung)
        self._next_conn_id = 0
        self._turn_due = False
        self._read_due = False
        self._replies: list[Output] = []  # replies to clients' messages, for the turn's end
        self.webhooks: WebhookSender | None = None  # webhooks.url set: the event sender
        self.connect_proxy: ConnectProxy | None = None  # proxy.connect_url set
        self.journal: Journal | None = None  # webhooks on: open connections, for a successor
        self.publish_proxy: PublishProxy[Connection] | None = None  # proxy.publish_url set
        # The server API (shard/apiserver.py), set by the boot. On the main port
        # unless it has a listener of its own (api.port); off (404) without a key.
        self.api: ApiServer | None = None
        self.api_key = config.api.key.encode()
        self.api_on_main = True  # /api/ on the main port: served, or refused with 404
        self.api_conns: set[ApiConnection] = set()

    # Output

    def _emit(self, at_turn_end: bool = False) -> None:
        """Write what the engine produced, in its order, and end the turn later.

        ``at_turn_end``: a client's message, whose replies (an ack, an error) wait for
        the turn's end, where each connection's replies go out in one write: a
        burst of refused publishes cost a write (a syscall) each, a quarter of
        the shard's time at 5x its capacity."""
        engine = self.engine
        out = after_input(engine, self.broker)
        if out:
            if at_turn_end:
                self._replies += out
            else:
                if self._replies:  # written in their order, before what followed them
                    out = self._replies + out
                    self._replies = []
                write(out)
        if self.webhooks is not None:  # else the engine makes no events (no hook_kinds)
            self._take_events()
        if not self._turn_due and (
            self._replies or engine.turn_due or self.broker.commit_due or engine.proxied_due
        ):
            self._turn_due = True
            self.loop.call_soon(self._end_turn)

    def _end_turn(self) -> None:
        """Commit the turn's records (acks follow), then write each room's frames."""
        self._turn_due = False
        engine = self.engine
        engine.advance(_monotonic(), _time())
        out, rooms = end_turn(engine, self.broker)
        if self._replies:
            out = self._replies + out
            self._replies = []
        if self.publish_proxy is not None:
            proxied = engine.take_proxied()
            if proxied:
                # The turn's publishes, in one request to the publish proxy.
                self.publish_proxy.send(proxied)
        if rooms:
            if out:
                write_turn(out, rooms)
            else:
                write(rooms)
        elif out:
            write_turn(out, [])
        if self.webhooks is not None:
            self._take_events()
        if engine.turn_due or self.broker.commit_due:
            # What the turn's end set off (a record a command wrote) ends next turn.
            self._turn_due = True
            self.loop.call_soon(self._end_turn)

    def _take_events(self) -> None:
        """The engine's webhook events: to the journal (for a successor, should this
        shard be killed) and to the sender (which stamps them with id, shard, box)."""
        events = self.engine.take_events()
        sender = self.webhooks
        if sender is None or not events:
            return
        journal = self.journal
        compact = False
        emit = sender.emit
        for event in events:
            fields = event.fields or {}
            if event.conn is not None:
                if journal is not None:
                    compact |= journal.record(event.kind, event.conn, event.user, event.room)
                fields = {"conn": event.conn, **fields}
            emit(event.kind, event.user, event.room, fields, when=event.time)
        if compact:
            assert journal is not None
            journal.compact(
                (state.conn_id, state.user, state.rooms)
                for state in self.engine.conns.values()
                if state.opened
            )

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
        self.sweeper.add(conn)

    def http_get(self, path: str) -> tuple[int, str, bytes]:
        return self.pages.get(path, self.engine.draining)

    def refuse_upgrade(
        self, conn: Connection, path: str, query: str, headers: dict[str, str]
    ) -> tuple[int, str] | Later | None:
        upgrade = Upgrade(conn.conn_id, conn.peer, path, query, headers)
        proxy = proxied(self, upgrade)
        if proxy is not None:
            return ask_connect_proxy(self, proxy, conn, upgrade)
        return self.admit(conn, upgrade)

    def admit(
        self, conn: Connection, upgrade: Upgrade, identity: Identity | None = None
    ) -> tuple[int, str] | None:
        """An engine input: the upgrade's checks (with the connect proxy's
        ``identity``); the refusal's status and text, or None to upgrade."""
        engine = self.engine
        engine.advance(_monotonic(), _time())
        # Upgraded connections on every shard (handshakes under way do not count).
        refusal = engine.admit(conn, upgrade, self.counters.total(_S_CONNECTIONS), identity)
        self._emit()  # what the broker said before it, applied first
        return None if refusal is None else (refusal.status, refusal.text)

    def publish_answered(
        self, items: list[ProxiedPublish[Connection]], verdicts: list[Verdict] | None, reason: str
    ) -> None:
        """The publish proxy's verdicts: an engine input."""
        engine = self.engine
        engine.advance(_monotonic(), _time())
        engine.publish_answered(items, verdicts, reason)
        self._emit()

    def opened(self, conn: Connection) -> None:
        self.engine.advance(_monotonic(), _time())
        self.engine.open(conn)
        self._emit()

    def text_received(self, conn: Connection, data: bytes | bytearray | memoryview) -> None:
        engine = self.engine
        engine.advance(_monotonic(), _time())
        engine.receive(conn, data)
        self._emit(at_turn_end=True)

    def broker_input(self, step: Callable[[], None]) -> None:
        """Something the broker heard (from Redis) for the engine: the time first,
        the engine's output after."""
        engine = self.engine
        engine.advance(_monotonic(), _time())
        step()  # queued in the engine's inbox, applied by _emit
        self._emit()

    def closed(self, conn: Connection) -> None:
        self.connections.discard(conn)
        if self.engine.draining and not self.connections and not self.api_conns:
            self.all_closed.set()
        self.engine.advance(_monotonic(), _time())
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

    # ApiHandler: the server API's HTTP connections

    def new_api_connection(self) -> ApiConnection:
        """A connection of the API's own listener (api.port)."""
        self._next_conn_id += 1
        conn = ApiConnection(self, self._next_conn_id)
        self.api_conns.add(conn)
        return conn

    def api_takeover(self, conn: Connection, head: bytes) -> None:
        """``conn``'s first bytes ask for /api/: an API connection takes its transport."""
        transport = conn.transport
        self.connections.discard(conn)
        conn.handed_over()
        if transport is None:
            return
        api = ApiConnection(self, conn.conn_id, elsewhere=bool(self.config.api.port))
        self.api_conns.add(api)
        transport.set_protocol(api)
        api.connection_made(transport)
        api.data_received(head)

    def api_call(self, conn: ApiConnection, method: str, body: bytes, answer: Answer) -> None:
        api = self.api
        assert api is not None  # no API connection is made without it
        api.call(method, body, conn.peer, answer)
        self._emit()

    def api_refused(self, conn: ApiConnection, method: str, exc: ApiError) -> None:
        if self.api is not None:
            self.api.refused(method, exc, conn.peer)

    def api_closed(self, conn: ApiConnection) -> None:
        self.api_conns.discard(conn)
        if self.engine.draining and not self.connections and not self.api_conns:
            self.all_closed.set()

    # The peers' records (shared-memory broker)

    def start_bell(self) -> None:
        """Deliver the peers' records from now on: wake on our doorbell."""
        if self.doorbell is None:
            return
        self.doorbell.start()
        self.read_peers()

    def stop_bell(self) -> None:
        if self.doorbell is not None:
            self.doorbell.stop()

    def _rung(self) -> None:
        if self.broker.listener is not None:  # else closed
            self.read_peers()

    def read_peers(self) -> None:
        """Hand the peers' new records to the engine; again next turn if there is more."""
        self._read_due = False
        now = _monotonic()
        self.engine.advance(now, _time())
        more = self.broker.read_peers(now)
        self._emit()
        if more and not self._read_due:
            self._read_due = True
            self.loop.call_soon(self.read_peers)

    # Time

    def sweep(self, now: float) -> None:
        """One slice of the sweep (see :mod:`shardchat.shard.sweep`)."""
        self.clock = now
        self.sweeper.run(now)

    def _pass(self) -> None:
        """The start of a sweep pass: the engine's and the broker's timers."""
        engine = self.engine
        mono = _monotonic()
        engine.advance(mono, _time())
        engine.tick()
        self.broker.tick(mono)
        if self.api is not None:
            self.api.tick(mono)
            if self.api_conns:
                hb = self.config.heartbeat
                for api in list(self.api_conns):
                    api.tick(self.clock, hb.interval, hb.timeout, hb.idle_timeout)
        self._emit()

    def drain_connections(self) -> None:
        """Stop taking connections and close every open one with 1001 ``shutdown``."""
        if self._replies:  # replies waiting for the turn's end go before the closes
            replies, self._replies = self._replies, []
            write_turn(replies, [])
        self.broker.commit()
        write(self.engine.stop_admitting())
        if not self.connections and not self.api_conns:
            self.all_closed.set()
        for api in list(self.api_conns):
            api.drain()
        for conn in list(self.connections):
            if conn.is_open:
                conn.close(1001, "shutdown")
            elif conn.close_deadline == 0.0:
                conn.abort()
