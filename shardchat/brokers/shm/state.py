"""The shm broker's state, and the writing of our ring: records, commits, acks.

The parts of :class:`~shardchat.brokers.shm.ShmBroker` (one job per module)
share this state; it writes our ring (:meth:`ShmState._write`) and makes each
turn's records visible at once (:meth:`ShmState.commit`), with the rooms' seqs
stored in our table after them and the publishes sequenced here acked.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Protocol

from shardchat import stats
from shardchat.brokers.forwarding import Forwarder
from shardchat.brokers.presence_holders import HolderState, Queries
from shardchat.brokers.sequencer import Sequencer, owner_of
from shardchat.core.broker import BrokerListener, PresenceAnswer
from shardchat.core.config import OverloadConfig
from shardchat.logs import log_event
from shardchat.ring.layout import HEADER_SIZE, RecordKind, max_payload
from shardchat.ring.ring import RingReader, RingWriter
from shardchat.ring.seqtable import SLOT_SIZE, SeqTable
from shardchat.stats import Counters
from shardchat.storage.durable import Durable

__all__ = ["POLL_LIMIT", "Bell", "Handler", "ShmState"]

log = logging.getLogger(__name__)

_OVERLOAD_DEFAULTS = OverloadConfig()  # the configuration's defaults
POLL_LIMIT = 4096  # records per ring per read: one busy peer cannot starve our clients
OWNERS_KEPT = 1 << 16  # rooms whose owner the broker remembers at most

_ROOM_MSG = int(RecordKind.ROOM_MSG)
_FORWARD = int(RecordKind.FORWARD)
_PRESENCE = int(RecordKind.PRESENCE)
_RESET = int(RecordKind.RESET)
_FORWARD_SEEN = int(RecordKind.FORWARD_SEEN)
_HISTORY_REQ = int(RecordKind.HISTORY_REQ)
_REPLAY = int(RecordKind.REPLAY)
_SNAPSHOT = int(RecordKind.SNAPSHOT)
_EVENT = int(RecordKind.PRESENCE_EVENT)
_TOLD = int(RecordKind.TOLD)
_QUERY = int(RecordKind.PRESENCE_QUERY)
_ANSWER = int(RecordKind.PRESENCE_ANSWER)
_CONTROL = int(RecordKind.CONTROL)
_S_WRITTEN = int(stats.Slot.RING_RECORDS_WRITTEN)
_S_READ = int(stats.Slot.RING_RECORDS_READ)
_S_LAPS = int(stats.Slot.RING_LAPS)
_S_LOST = int(stats.Slot.RING_RECORDS_LOST)
_S_SEQUENCED = int(stats.Slot.MESSAGES_SEQUENCED)
_S_RETRIED = int(stats.Slot.FORWARDS_RETRIED)

Handler = Callable[[int, int, bytes], None]  # peer, aux, payload


class Bell(Protocol):
    """A doorbell (:class:`~shardchat.brokers.segments.Doorbell`): a wake-up, never a lock."""

    def ring(self) -> None: ...

    def wait(self, timeout: float) -> bool: ...

    def absorb(self) -> None: ...


class ShmState:
    """Our ring, the peers' rings and seq tables, and the doorbells we ring."""

    # Slots for what the parts below use (they add none), and a __dict__ for the
    # rest (the shard's stamp, a test's stand-in): past the 30 keys CPython 3.11
    # shares per class, and the publishes' hot path reads them often.
    __slots__ = (
        "_acks_due",
        "_answers_due",
        "_asked",
        "_closing",
        "_commit_every",
        "_failed_due",
        "_fills_due",
        "_handlers",
        "_local_waiting",
        "_max_backlog",
        "_max_forwards",
        "_max_payload",
        "_max_store",
        "_now_ns",
        "_owners",
        "_rebuild_until",
        "_ring_views",
        "_seqs_due",
        "_table_slots",
        "_uncommitted",
        "_views",
        "_waiting_view",
        "_written",
        "backlog",
        "bells",
        "durable",
        "forwarder",
        "holders",
        "listener",
        "occupancy",
        "on_control",
        "peers",
        "queries",
        "readers",
        "sequencer",
        "shard_id",
        "stats",
        "tables",
        "unstored",
        "workers",
        "writer",
        "__dict__",
    )

    def __init__(
        self,
        shard_id: int,
        views: list[memoryview],
        ring_bytes: int,
        table_slots: int,
        bells: Sequence[Bell],
        counters: Counters,
        publish_timeout: float,
        *,
        writer_pid: int = 0,
        closing: Callable[[], None] = lambda: None,
        overload: OverloadConfig = _OVERLOAD_DEFAULTS,
    ) -> None:
        """The state of a broker over every shard's segment (``views``: header, ring, seq table).

        ``closing`` releases what the views are mapped from (:meth:`attach`).
        """
        workers = len(views)
        self.shard_id = shard_id
        self.workers = workers
        self.stats = counters
        ring_end = HEADER_SIZE + ring_bytes
        self._views = views
        self.tables = [
            SeqTable(view[ring_end : ring_end + table_slots * SLOT_SIZE], table_slots)
            for view in views
        ]
        # Pads over a record the previous incarnation died writing.
        self.writer = RingWriter(views[shard_id][:ring_end], writer_pid=writer_pid)
        self._ring_views = [view[:ring_end] for view in views]
        self.readers: dict[int, RingReader] = {}
        self.bells = bells
        self._closing = closing
        self.peers = [i for i in range(workers) if i != shard_id]
        self.listener: BrokerListener | None = None
        self.sequencer = Sequencer(self.tables[shard_id].lookup)
        self.forwarder = Forwarder(publish_timeout)
        self._max_forwards = overload.forwards
        self._max_backlog = overload.backlog
        self._max_store = overload.store
        self.backlog = 0  # bytes of the peers' rings unread when the last read began
        # The presence of the rooms we hold (owner or replica), our queries for
        # the others, and what waits for our view while it is rebuilt.
        self.holders = HolderState(shard_id, workers)
        self.queries = Queries(workers, publish_timeout)
        self._asked: dict[int, Callable[[PresenceAnswer | None], None]] = {}
        # Told when a room we own got its first user or lost its last (webhooks'
        # room_occupied / room_vacated): room, user, occupied.
        self.occupancy: Callable[[str, str, bool], None] | None = None
        self._waiting_view: list[
            tuple[int, int, str, str, int]
        ] = []  # peer, qid, room, user, limit
        self._local_waiting: list[
            tuple[str, str, int, Callable[[PresenceAnswer | None], None]]
        ] = []
        self._rebuild_until = 0.0
        self._now_ns = 0  # monotonic ns, as of the last call that gave the time
        self._max_payload = max_payload(ring_bytes)
        self._table_slots: dict[str, int | None] = {}
        self._owners: dict[str, int] = {}  # room -> owner_of(room), remembered (_owner)
        self._acks_due: list[tuple[str, str, int]] = []  # (msg id, room, seq) once committed
        self._seqs_due: dict[str, int] = {}  # room -> seq, for the seq table once committed
        self._answers_due: list[tuple[str, int]] = []  # fills of our own rooms: (room, last)
        # The room store (storage.kind = "sqlite"): it keeps what we sequence and
        # answers our rooms' fills; every ack waits for it (durable.py).
        self.durable: Durable | None = None
        self.unstored = 0  # messages the store could not write before it closed
        self._fills_due: list[tuple[str, int, int]] = []  # our own rooms' fills from the store
        self._failed_due: list[tuple[str, str]] = []  # publishes refused: the store is full
        self._uncommitted = 0  # payload bytes since the last commit
        self._written = 0  # records since the last commit
        self._commit_every = ring_bytes // 8
        self._handlers = self._record_handlers()
        # The server API's control records from the peers (shard/apiserver.py).
        self.on_control: Callable[[bytes], None] | None = None

    def _record_handlers(self) -> dict[int, Handler]:
        """Each record kind's handler, by kind (:class:`ShmBroker` has them all)."""
        return {}

    def _owner(self, room: str) -> int:
        """``owner_of(room)``, remembered for the publishes' hot path (each asks
        twice: ``full`` and ``publish``), which reads ``self._owners`` first; the
        rooms remembered are dropped now and then."""
        owners = self._owners
        if len(owners) >= OWNERS_KEPT:
            owners.clear()
        owner = owners[room] = owner_of(room, self.workers)
        return owner

    def _store_seq(self, room: str, seq: int) -> None:
        table = self.tables[self.shard_id]
        offset = self._table_slots.get(room, -1)
        if offset == -1:
            offset = self._table_slots[room] = table.slot(room)
            if offset is None:
                log_event(log, logging.WARNING, "room_table_full", room=room)
        if offset is not None:
            table.set_seq(offset, seq)

    def _write(self, kind: int, aux: int, payload: bytes) -> None:
        self.writer.append(kind, aux, payload)
        self._written += 1
        self._uncommitted += len(payload)
        if self._uncommitted > self._commit_every:
            # A burst: let the readers start on it before the turn ends.
            self.commit()

    @property
    def commit_due(self) -> bool:
        # Asked at least once a turn: no bool() calls.
        if self._written or self._acks_due or self._failed_due or self._fills_due:
            return True  # the fills: our own rooms', answered at the commit
        durable = self.durable
        return durable is not None and durable.due  # a retry's answer waits for the store

    def commit(self) -> None:
        """Make the records written since the last commit visible, then store the
        rooms' seqs in our table, ring every peer's bell once, and ack the
        publishes sequenced here: they are in the ring now."""
        if self._written:
            self.writer.commit()
            if self._seqs_due:
                seqs, self._seqs_due = self._seqs_due, {}
                slots = self._table_slots
                set_seq = self.tables[self.shard_id].set_seq
                for room, seq in seqs.items():
                    # _store_seq, inline for a room whose slot is known: every turn
                    offset = slots.get(room, -1)
                    if offset == -1:
                        self._store_seq(room, seq)
                    elif offset is not None:
                        set_seq(offset, seq)
            self.stats[_S_WRITTEN] += self._written
            self._written = 0
            self._uncommitted = 0
            bells = self.bells
            for peer in self.peers:
                bells[peer].ring()
        if self._failed_due:
            failed, self._failed_due = self._failed_due, []
            assert self.listener is not None
            for msg_id, room in failed:
                self.listener.on_publish_failed(msg_id, room)
        durable = self.durable
        if durable is not None and durable.due:
            # The turn's messages to the writer, with the acks that wait for it
            # (back through read_stored).
            durable.submit(self.writer.tail)
        if self._acks_due:
            acks, self._acks_due = self._acks_due, []
            listener = self.listener
            assert listener is not None
            for msg_id, room, seq in acks:
                listener.on_published(msg_id, room, seq)
        if self._fills_due:
            self._answer_own_fills()

    def _answer_own_fills(self) -> None:
        """Our own rooms' fills from the store, at the commit (:mod:`.history`)."""

    def heartbeat(self, now_ns: int) -> None:
        self.writer.heartbeat(now_ns)
