"""The engine's state: a connection's, a join's, the shard's, and the helpers every part uses.

:class:`EngineState` holds what the engine knows (its connections, room logs,
members, the requests waiting on the broker) and its output getters; the
parts of the engine (rooms, deliveries, joins, requests, connections, the
server's calls) build on it one above the other, and
:class:`~shardchat.core.engine.facade.RoomEngine` is the top.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Generic, cast

from shardchat.core import wire
from shardchat.core.admission import Admitted, Verify
from shardchat.core.broker import (
    Broker,
    BrokerListener,
    Holding,
)
from shardchat.core.config import Config
from shardchat.core.counters import (
    Counters,
    Slot,
    error_slot,
)
from shardchat.core.engine.commands import Command, CommandQueue
from shardchat.core.engine.inbox import Inbox
from shardchat.core.errors import ErrorCode, ProtocolError
from shardchat.core.fanout import Fanout
from shardchat.core.gapfill import GAP_JOIN_WAIT, GapFill
from shardchat.core.historyfetch import HistoryFetches
from shardchat.core.hookevents import HookEvent, ProxiedPublish
from shardchat.core.interfaces import (
    NO_LOG,
    ConnInfo,
    EventLog,
    HookRunner,
    PeerCounts,
)
from shardchat.core.messages import (
    ClientMessage,
    Join,
    RoomId,
)
from shardchat.core.outputs import C, Close, Output
from shardchat.core.presence import LocalPresence
from shardchat.core.ratelimit import TokenBucket
from shardchat.core.reliable import ReliableRooms
from shardchat.core.roomlog import TAIL, HeldMessage, RoomLog, unexpired

if TYPE_CHECKING:
    pass
import enum
from dataclasses import dataclass

__all__ = [
    "EVICT_EVERY",
    "MAX_DEFERRED",
    "NO_CALL",
    "PROTOCOL_VERSION",
    "ConnState",
    "EngineState",
    "JoinStage",
    "PendingJoin",
    "is_utf8",
    "presence_unavailable",
]

PROTOCOL_VERSION = 1
EVICT_EVERY = 30.0  # seconds between scans for idle rooms to drop

S_CONNECTIONS = int(Slot.CONNECTIONS)
S_OPENED = int(Slot.CONNECTIONS_OPENED)
S_PUBLISHED = int(Slot.MESSAGES_PUBLISHED)
S_RATE_LIMITED = int(Slot.RATE_LIMITED)
S_SLOW = int(Slot.SLOW_CONSUMER_CLOSES)
S_HOOK_ERRORS = int(Slot.HOOK_ERRORS)
S_REFUSED = int(Slot.HTTP_REFUSED)
S_JOINS = int(Slot.JOINS)
S_LEAVES = int(Slot.LEAVES)
S_ROOMS = int(Slot.ROOMS)
S_LATENCY_COUNT = int(Slot.LATENCY_COUNT)
S_LATENCY_SUM = int(Slot.LATENCY_SUM_US)

MAX_DEFERRED = 256  # requests a connection may send while its joins wait


class JoinStage(enum.IntEnum):
    """Where a join is; each stage waits on the broker, in this order."""

    ADMITTED = 0  # named in the upgrade's query: starts when the connection opens
    OPENING = 1  # the broker subscribes to the room and loads its state
    FETCHING = 2  # the room's history is fetched back, or its gap filled, first
    ASKING = 3  # the room's presence holder is asked who is in it
    DONE = 4  # answered with `joined`, or refused


@dataclass(slots=True, eq=False)
class PendingJoin(Generic[C]):
    """One join in flight: its connection, its request and its stage."""

    conn: C
    request: Join
    stage: JoinStage = JoinStage.ADMITTED
    # A resume from before the log's oldest message: what was fetched of the
    # seqs between (None: nothing asked).
    older: dict[int, bytes] | None = None
    pinned: bool = False  # its room's log is held whole until it is answered


class ConnState:
    """The engine's state of one admitted connection."""

    __slots__ = (
        "allowed_rooms",
        "bucket",
        "conn_id",
        "deferred",
        "errors",
        "info",
        "joins",
        "opened",
        "peer",
        "presence_info",
        "rooms",
        "user",
    )

    def __init__(self, conn_id: int, peer: str, admitted: Admitted, bucket: TokenBucket) -> None:
        self.conn_id = conn_id  # the adapter's id, for logs and hooks
        self.peer = peer  # the client's IP address
        self.user = admitted.user
        self.allowed_rooms = admitted.allowed_rooms  # from the token; None = any room
        self.presence_info = admitted.info  # the connect proxy's info (JSON), or None
        # The rooms this connection has joined: a tuple, not a set, because a set
        # is 216 bytes for one room and most connections are in a few (joins are
        # rate-limited, so the linear add and remove stay cheap).
        self.rooms: tuple[RoomId, ...] = ()
        self.errors = 0  # consecutive malformed requests
        self.bucket = bucket
        self.info: ConnInfo | None = None  # what hooks and events see, once open
        self.opened = False  # the upgrade completed
        # A join can wait for its broker (joins.py): the connection's requests
        # that come meanwhile wait behind it, so that a message sent right after a
        # join (or after the welcome of a join at open) is taken as a member's.
        # This connection's joins in flight: a tuple, empty (shared) for nearly all.
        self.joins: tuple[PendingJoin[Any], ...] = ()
        self.deferred: list[ClientMessage] | None = None  # what came meanwhile, in order


class EngineState(Generic[C]):
    """What one shard's engine knows, and what every part of it uses."""

    # Slots, and none in the parts above: the engine has more attributes than
    # CPython 3.11 shares keys for (30), and its hot path reads them often.
    __slots__ = (
        "_calls",
        "_events",
        "_expiries",
        "_msg_counter",
        "_msg_prefix",
        "_next_evict",
        "_out",
        "_pending",
        "_pending_messages",
        "_proxied",
        "_ready",
        "broker",
        "config",
        "conns",
        "counters",
        "draining",
        "epoch",
        "fanout",
        "fetches",
        "gaps",
        "history",
        "hook_kinds",
        "hooks",
        "inbox",
        "log",
        "logs",
        "members",
        "now",
        "open_count",
        "peers",
        "pins",
        "presence",
        "proxy_waiting",
        "publish_proxy",
        "reliable",
        "shard_id",
        "verify",
        "wall",
    )

    def __init__(
        self,
        config: Config,
        shard_id: int,
        epoch: str,
        broker: Broker,
        counters: Counters,
        hooks: HookRunner,
        *,
        id_prefix: str,
        verify: Verify | None = None,
        peers: PeerCounts | None = None,
        log: EventLog = NO_LOG,
    ) -> None:
        """``broker``: the broker the caller runs :meth:`take_commands` on (the
        engine only reads it and asks it questions); ``counters``: this shard's
        block of counter slots; ``id_prefix``: the message ids' random part,
        unique per run (drawn by the caller: the core draws no random numbers);
        ``verify``: the token verifier when ``auth`` is on; ``peers``: the whole
        server's connections per address when ``server.max_per_ip`` is on."""
        self.config = config
        self.shard_id = shard_id
        self.epoch = epoch  # this run of the rooms' sequences (PROTOCOL.md, epoch)
        self.broker = CommandQueue(broker)  # commands queued, questions passed on
        # The broker's listener: what it tells us, queued (the deliveries part,
        # deliveries.py, implements the listener's methods).
        self.inbox = Inbox(cast("BrokerListener", self))
        self.counters = counters  # this shard's block of counter slots
        self.hooks = hooks
        self.log = log
        self.history = config.delivery.history
        self.now = 0.0  # monotonic seconds, as last given to advance()
        self.wall = 0.0  # Unix seconds, as last given to advance()
        self.draining = False
        self.conns: dict[C, ConnState] = {}  # admitted connections
        self.open_count = 0
        self.verify = verify
        self.peers = peers  # open connections per client address, on every shard
        self._out: list[Output[C]] = []  # taken by take_outputs()
        self._ready: list[C] = []  # connections whose last join ended with requests waiting
        # (token exp, conn id, connection), soonest first: closed with 4401 then.
        self._expiries: list[tuple[float, int, C]] = []
        self.logs: dict[str, RoomLog] = {}
        # Rooms whose log holds up to `delivery.history` while a resume's older
        # messages are fetched: the log's part must not roll away meanwhile.
        self.pins: dict[str, int] = {}
        self.presence = LocalPresence()  # our own connections per (room, user)
        self.reliable: ReliableRooms[C] = ReliableRooms(config.delivery, counters)
        self.fanout: Fanout[C] = Fanout(self.logs, self.reliable, counters)
        self.members = self.fanout.members  # room -> local members
        self.gaps = GapFill(
            self.broker,
            self.logs,
            self.fanout.queue,
            counters,
            epoch,
            self.history,
            log,
            config.delivery.gap_give_up,
            capacity=self._capacity,
        )
        # What a `history` answer needs and the log lacks (a gap, older messages).
        self.fetches = HistoryFetches(self.broker, GAP_JOIN_WAIT)
        self._pending: dict[str, tuple[C, str | None]] = {}  # msg id -> sender, request id
        self._calls: dict[str, object] = {}  # msg id -> the publish_as caller's token
        # Webhook events (core/hookevents.py), taken with take_events(): only the
        # kinds the caller asks for are made.
        self.hook_kinds: frozenset[str] = frozenset()
        self._events: list[HookEvent] = []
        self._pending_messages: dict[str, tuple[int, str, str]] = {}  # conn id, user, content
        # proxy.publish_url: publishes wait for the backend's verdict (take_proxied()).
        self.publish_proxy = False
        self._proxied: list[ProxiedPublish[C]] = []
        self.proxy_waiting = 0  # publishes sent to the proxy (or about to be), not answered
        self._next_evict = 0.0
        self._msg_prefix = f"{shard_id}-{id_prefix}-"
        self._msg_counter = 0

    def take_outputs(self) -> list[Output[C]]:
        """What the inputs so far produced for connections and sinks, in order;
        forgotten after (websockets' ``data_to_send``)."""
        out, self._out = self._out, []
        return out

    def take_commands(self) -> list[Command]:
        """The calls for the broker the inputs so far produced, in order; forgotten
        after. The caller runs them (``commands.run_commands``) and then applies
        what the broker answered (:meth:`deliver`)."""
        return self.broker.take()

    def take_events(self) -> list[HookEvent]:
        """The webhook events the inputs so far made, in order; forgotten after."""
        events, self._events = self._events, []
        return events

    def take_proxied(self) -> list[ProxiedPublish[C]]:
        """The publishes waiting for the publish proxy's verdict
        (:meth:`publish_answered`), in order; forgotten after."""
        proxied, self._proxied = self._proxied, []
        return proxied

    @property
    def turn_due(self) -> bool:
        """The end of the turn has work: frames queued for the rooms, requests that
        waited for a join, or broker answers or commands not yet handled."""
        return bool(self.fanout.outbox or self._ready or self.inbox.queue or self.broker.commands)

    @property
    def proxied_due(self) -> bool:
        """Publishes wait to be sent to the publish proxy (:meth:`take_proxied`, at
        the end of the turn: one request for the turn's publishes)."""
        return bool(self._proxied)

    def _unexpired(self, messages: list[HeldMessage]) -> list[HeldMessage]:
        """``messages`` without those older than ``delivery.history_ttl``: never
        replayed, whether held here or read from a store not yet pruned."""
        ttl = self.config.delivery.history_ttl
        if not ttl or not messages:
            return messages
        return unexpired(messages, int((self.wall - ttl) * 1000))

    def _capacity(self, room: str) -> int:
        """How many of ``room``'s messages this engine's log holds: with a store,
        the room's owner keeps ``delivery.history_memory`` for the box and the
        others a tail; without one every engine keeps ``delivery.history``."""
        holding = self.broker.holding(room)
        if holding is Holding.EVERY or room in self.pins:
            return self.history  # pinned: an answer's fetch needs the log whole
        memory = min(self.history, self.config.delivery.history_memory)
        if holding is Holding.HERE or room in self.reliable.rooms:
            return memory  # a reliable connection's resends come from this log
        return min(memory, TAIL)

    def advance(self, now: float, wall: float) -> None:
        """The time for the inputs that follow: monotonic and Unix seconds."""
        self.now = now
        self.wall = wall

    def deliver(self) -> None:
        """Input: apply what the broker told :attr:`inbox` since the last input,
        in order. Every other input starts with it too."""
        if self.inbox.queue:
            self._apply_inbox()

    def _apply_inbox(self) -> None:
        """Apply the inbox's queue (the deliveries part handles its hot items inline)."""
        self.inbox.apply()

    def _close(self, conn: C, state: ConnState, close: Close) -> None:
        self._out.append(((conn,), close))
        state.deferred = None  # closing: what waited is not taken

    def _refuse(self, conn: C, state: ConnState, exc: ProtocolError) -> None:
        """Every error frame goes out here, so that each is counted once by code."""
        self._send(conn, wire.error_payload(exc.code, exc.reason, exc.request_id, exc.retry_after))
        self.counters[error_slot(exc.code)] += 1
        if not exc.code.malformed:
            return
        state.errors += 1
        if state.errors >= self.config.limits.max_errors:
            self._close(conn, state, Close(1008, "too many errors", fail=True))

    @staticmethod
    def _check_allowed(state: ConnState, room: RoomId, request_id: str | None) -> None:
        if state.allowed_rooms is not None and room not in state.allowed_rooms:
            raise ProtocolError(
                ErrorCode.UNAUTHORIZED, f"your token does not allow room {room}", request_id
            )

    @staticmethod
    def _require_member(state: ConnState, room: RoomId, request_id: str | None) -> None:
        if room not in state.rooms:
            raise ProtocolError(ErrorCode.NOT_MEMBER, f"not a member of room {room}", request_id)

    def _reply(self, conn: C, obj: dict[str, object]) -> None:
        self._out.append(((conn,), wire.text_frame(wire.encode(obj))))

    def _send(self, conn: C, payload: bytes) -> None:
        self._out.append(((conn,), wire.text_frame(payload)))

    def _count_hook_errors(self) -> None:
        hooks = self.hooks
        if hooks.errors:
            self.counters[S_HOOK_ERRORS] += hooks.errors
            hooks.errors = 0

    def _event(
        self, kind: str, state: ConnState, room: str | None, fields: dict[str, object] | None
    ) -> None:
        self._events.append(HookEvent(kind, state.user, room, state.conn_id, self.wall, fields))

    def _catch_up(self) -> None:
        """Have the broker deliver everything available now, and apply it."""
        self.broker.catch_up()
        self.deliver()


NO_CALL = object()  # no publish_as caller waits for this message id


def presence_unavailable(room: str, request_id: str | None) -> ProtocolError:
    return ProtocolError(
        ErrorCode.UNAVAILABLE,
        f"room {room}: its presence did not answer (a shard is restarting); try again",
        request_id,
    )


def is_utf8(data: bytes | bytearray | memoryview) -> bool:
    try:
        bytes(data).decode()
    except UnicodeDecodeError:
        return False
    return True
