"""One box's broker: every shard writes its own ring and reads all the others.

docs/ARCHITECTURE.md, One box. :class:`ShmBroker` is the
:class:`~shardchat.core.broker.Broker` of one shard: it writes our ring (our
publishes, forwards, presence, history requests and answers) and hands the
records of the peers' rings to our engine through its
:class:`~shardchat.core.broker.BrokerListener` methods. A room's order is
set here: the room's owner shard sequences (:mod:`.sequencer`), and a
publish on another shard is forwarded to it through our ring and kept until
it comes back sequenced (:mod:`.forwarding`).

It never schedules: the shard's main module calls :meth:`commit` at the end
of each loop turn, :meth:`drain` when the doorbell rings (and again while it
returns True), and :meth:`tick` on its timer. An ack for a publish leaves
only once the record is committed (visible in the ring), so that an acked
message is in the ring before the client hears of it.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import Protocol

from shardchat import stats
from shardchat.brokers import segments
from shardchat.brokers.forwarding import Forwarder
from shardchat.brokers.presence_holders import REBUILD_TIMEOUT, Event, HolderState, Queries
from shardchat.brokers.sequencer import Sequencer, owner_of, plan_resend
from shardchat.core import wire
from shardchat.core.broker import BrokerListener, PresenceAnswer, Publication
from shardchat.core.config import OverloadConfig
from shardchat.core.overload import Queue
from shardchat.logs import log_event
from shardchat.ring import records
from shardchat.ring.layout import HEADER_SIZE, RecordKind, max_payload
from shardchat.ring.records import REPLAY_END, REPLAY_SKIP
from shardchat.ring.ring import Record, RingReader, RingWriter
from shardchat.ring.seqtable import SLOT_SIZE, RoomTable
from shardchat.stats import Counters
from shardchat.storage.durable import Durable

__all__ = ["POLL_LIMIT", "Bell", "ShmBroker"]

log = logging.getLogger(__name__)

_OVERLOAD_DEFAULTS = OverloadConfig()  # the configuration's defaults
POLL_LIMIT = 4096  # records per ring per drain: one busy peer cannot starve our clients

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

    def drain(self) -> None: ...


class ShmBroker:
    """Our ring, the peers' rings and seq tables, and the doorbells we ring."""

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
        """A broker over every shard's segment (``views``: header, ring, seq table).

        ``closing`` releases what the views are mapped from (:meth:`attach`).
        """
        workers = len(views)
        self.shard_id = shard_id
        self.workers = workers
        self.stats = counters
        ring_end = HEADER_SIZE + ring_bytes
        self._views = views
        self.tables = [
            RoomTable(view[ring_end : ring_end + table_slots * SLOT_SIZE], table_slots)
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
        self.backlog = 0  # bytes of the peers' rings unread when the last drain began
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
        self._acks_due: list[tuple[str, str, int]] = []  # (msg id, room, seq) once committed
        self._seqs_due: dict[str, int] = {}  # room -> seq, for the seq table once committed
        self._answers_due: list[tuple[str, int]] = []  # fills of our own rooms: (room, last)
        # The room store (storage.kind = "sqlite"): acks wait for it, fills read it.
        self.durable: Durable | None = None
        self._fills_due: list[tuple[str, int, int]] = []  # our own rooms' fills from the store
        self._failed_due: list[tuple[str, str]] = []  # publishes refused: the store is full
        self._uncommitted = 0  # payload bytes since the last commit
        self._written = 0  # records since the last commit
        self._commit_every = ring_bytes // 8
        self._handlers: dict[int, Handler] = {
            _ROOM_MSG: self._on_room_message,
            _FORWARD: self._on_forward,
            _PRESENCE: self._on_presence,
            _RESET: self._on_reset,
            _FORWARD_SEEN: self._on_forward_seen,
            _HISTORY_REQ: self._on_history_request,
            _REPLAY: self._on_replay,
            _SNAPSHOT: self._on_snapshot,
            _EVENT: self._on_presence_event,
            _TOLD: self._on_told,
            _QUERY: self._on_query,
            _ANSWER: self._on_answer,
            _CONTROL: self._on_control,
        }
        # The server API's control records from the peers (shard/apiserver.py).
        self.on_control: Callable[[bytes], None] | None = None

    @classmethod
    def attach(
        cls,
        owner_pid: int,
        shard_id: int,
        workers: int,
        ring_bytes: int,
        table_slots: int,
        counters: Counters,
        publish_timeout: float,
        overload: OverloadConfig = _OVERLOAD_DEFAULTS,
    ) -> ShmBroker:
        """The broker of shard ``shard_id`` over the supervisor's named segments."""
        attached = [
            segments.Segment.attach(segments.ring_name(owner_pid, i)) for i in range(workers)
        ]
        bells = [segments.Doorbell(segments.bell_name(owner_pid, i)) for i in range(workers)]

        def closing() -> None:
            for bell in bells:
                bell.close()
            for segment in attached:
                segment.close()

        views = [memoryview(segment.buf) for segment in attached]
        return cls(
            shard_id,
            views,
            ring_bytes,
            table_slots,
            bells,
            counters,
            publish_timeout,
            writer_pid=os.getpid(),
            closing=closing,
            overload=overload,
        )

    # Start-up

    def retained(self, shard: int) -> tuple[RingReader, list[Record]]:
        """Everything ``shard``'s ring still holds, and a reader left at its end."""
        reader = RingReader(self._ring_views[shard], from_oldest=True)
        held: list[Record] = []
        while batch := reader.poll(POLL_LIMIT):
            held += batch
        return reader, held

    def recover(self, listener: BrokerListener, now: float) -> None:
        """Rebuild from shared memory after a (re)start, then start delivering.

        Our own seq table gives each owned room's seq; every ring's retained
        records give the history still held and the ids and idempotency keys we
        already sequenced. Forwards to us from the last ``publish_timeout`` not
        sequenced yet are sequenced now: the previous incarnation may have died
        first.
        """
        self.listener = listener
        self._now_ns = now_ns = int(now * 1e9)
        oldest_forward_ns = now_ns - int(self.forwarder.give_up * 1e9)
        _, own = self.retained(self.shard_id)
        self._restore(listener, own)
        for room, seq in self.tables[self.shard_id].entries().items():
            self.sequencer.restore(room, seq)
            listener.restore(room, seq, None)
        if self.durable is not None:
            # After the table's rooms: the store's are not handed to the engine,
            # which fetches a room's history when it needs it.
            self._restore_stored(own, now)
        readers: dict[int, RingReader] = {}
        forwards: list[tuple[int, bytes]] = []
        for peer in self.peers:
            reader, held = self.retained(peer)
            readers[peer] = reader
            self._restore(listener, held)
            me = self.shard_id
            forwards += [
                (peer, payload) for _, kind, aux, payload in held if kind == _FORWARD and aux == me
            ]
        for peer, payload in forwards:
            publication = records.decode_forward(payload)
            if publication.publish_ns >= oldest_forward_ns:
                self._on_forward(peer, self.shard_id, payload)
        # Our view of the rooms we hold comes back from the peers' snapshots (and
        # what members were told, from our co-holders), sent on our RESET.
        self.holders.begin_rebuild(self.peers)
        self._rebuild_until = now + REBUILD_TIMEOUT
        self.writer.append(_RESET, 0, b"")
        self._written += 1
        self.readers = readers
        self.bells[self.shard_id].drain()

    def _restore_stored(self, own: list[Record], now: float) -> None:
        """Our rooms' seqs and recent idempotency keys from the store (into our seq
        table, which every shard reads); what our ring holds that the store lacks
        (this shard died before its writer wrote it) is stored again."""
        durable = self.durable
        assert durable is not None
        restored = durable.restore()
        sequencer = self.sequencer
        for room, seq in restored.seqs.items():
            sequencer.restore(room, seq)
            self._store_seq(room, seq)
        wall_ns = int(now * 1e9) - time.time_ns()  # monotonic = wall + this
        for key, room, seq, at in restored.keys:
            sequencer.remember("", room, seq, key, int(at * 1e9) + wall_ns)
        workers, me, seqs = self.workers, self.shard_id, restored.seqs
        for _, kind, _, payload in own:
            if kind != _ROOM_MSG:
                continue
            msg = records.decode_room_message(payload)
            if owner_of(msg.room, workers) == me and msg.seq > seqs.get(msg.room, 0):
                durable.sequenced(msg.room, msg.seq, time.time(), msg.key, msg.json)

    def _restore(self, listener: BrokerListener, held: list[Record]) -> None:
        workers, me = self.workers, self.shard_id
        for _, kind, _, payload in held:
            if kind != _ROOM_MSG:
                continue
            msg = records.decode_room_message(payload)
            listener.restore(msg.room, msg.seq, msg.json)
            if owner_of(msg.room, workers) == me:
                self.sequencer.remember(msg.msg_id, msg.room, msg.seq, msg.key, msg.publish_ns)
                self.sequencer.restore(msg.room, msg.seq)

    # The server API

    @property
    def node(self) -> str:
        """This engine's name among those that hear :meth:`control`."""
        return str(self.shard_id)

    def control(self, payload: bytes, heard: Callable[[int], None] | None = None) -> None:
        """Tell every other shard of the box (committed with the turn); ``heard``
        is told how many will read it."""
        self._write(_CONTROL, 0, payload)
        if heard is not None:
            heard(len(self.peers))

    def _on_control(self, peer: int, aux: int, payload: bytes) -> None:
        if self.on_control is not None:
            self.on_control(payload)

    # Broker

    def publish(self, publication: Publication, now: float) -> None:
        room = publication.room
        self._now_ns = int(now * 1e9)
        owner = owner_of(room, self.workers)
        if owner == self.shard_id:
            seen = self.sequencer.seen_key(publication.key, self._now_ns)
            if seen is None and self.durable is not None and self.durable.full:
                # The store cannot write: refused before it is sequenced (at the
                # commit, outside the engine's call), so nothing is seen unstored.
                self._failed_due.append((publication.msg_id, room))
                return
            if seen is None:
                seq = self._sequence(publication)
            else:
                room, seq = seen  # a retry of a publish we sequenced: its seq, once
            # Acked at the commit: an acked message is in the ring.
            self._acks_due.append((publication.msg_id, room, seq))
            return
        payload = records.encode_forward(publication)
        self._write(_FORWARD, owner, payload)
        self.forwarder.add(publication.msg_id, room, owner, payload, now)

    def full(self, room: str) -> Queue | None:
        """Forwards in flight to the room's owner at their bound; or, for a room we
        own, the peers' records we have not read yet (the forwards waiting for us
        to sequence them are among them) over theirs, or what our room store has
        not written yet (the acks wait for it) at its bound."""
        owner = owner_of(room, self.workers)
        if owner != self.shard_id:
            if self.forwarder.in_flight(owner) >= self._max_forwards:
                return Queue.FORWARDS
        elif self.backlog > self._max_backlog:
            return Queue.BACKLOG
        elif self.durable is not None and self.durable.waiting >= self._max_store:
            return Queue.STORE
        return None

    def announce(self, room: str, user: str, joined: bool) -> None:
        self._write(_PRESENCE, 0, records.encode_presence(records.Presence(room, user, joined)))
        self._emit(self.holders.announce(self.shard_id, room, user, joined))

    def presence(
        self,
        room: str,
        user: str,
        limit: int,
        then: Callable[[PresenceAnswer | None], None],
    ) -> PresenceAnswer | None:
        holders = self.holders
        if holders.holds(room):
            answer = holders.answer(room, user, limit, self._answer_budget(room))
            if answer is None:  # our view is being rebuilt: answered once it is
                self._local_waiting.append((room, user, limit, then))
            return answer
        qid, target = self.queries.ask(room, user, limit, self._now_ns / 1e9)
        self._asked[qid] = then
        self._write(
            _QUERY,
            target,
            records.encode_presence_query(records.PresenceQuery(qid, room, user, limit)),
        )
        return None

    def _answer_budget(self, room: str) -> int:
        """Bytes of names an answer may carry: the record must fit the ring."""
        return self._max_payload - 128 - len(room.encode())

    def snapshot(self, peer: int, pairs: list[tuple[str, str]]) -> None:
        self._pairs(_SNAPSHOT, peer, pairs)

    def _pairs(self, kind: int, peer: int, pairs: list[tuple[str, str]]) -> None:
        """(room, user) pairs for ``peer`` in chunks that fit a record, then an
        empty chunk: the end."""
        chunk: list[tuple[str, str]] = []
        size = 0
        for pair in pairs:
            chunk.append(pair)
            size += len(pair[0]) + len(pair[1]) + 8
            if size > self._max_payload // 2:
                self._write(kind, peer, records.encode_snapshot(chunk))
                chunk, size = [], 0
        if chunk:
            self._write(kind, peer, records.encode_snapshot(chunk))
        self._write(kind, peer, records.encode_snapshot([]))

    # Presence (the holders)

    def _emit(self, events: list[Event]) -> None:
        """Our view's events (we own the rooms): in our ring for every peer, and to
        our engine now. Then what waited for a rebuilt view is answered."""
        if events:
            listener = self.listener
            assert listener is not None
            occupancy = self.occupancy
            for e in events:
                record = records.PresenceEvent(e.room, e.user, e.joined, e.total)
                self._write(_EVENT, 0, records.encode_presence_event(record))
                listener.on_presence_event(e.room, e.user, e.joined, e.total)
                # The owner alone emits events: the room's first user in, its last out.
                if occupancy is not None and (e.total == 0 or (e.joined and e.total == 1)):
                    occupancy(e.room, e.user, e.joined)
        if self.holders.ready and (self._waiting_view or self._local_waiting):
            waiting, self._waiting_view = self._waiting_view, []
            for peer, qid, room, user, limit in waiting:
                self._answer(peer, qid, room, user, limit)
            local, self._local_waiting = self._local_waiting, []
            for room, user, limit, then in local:
                then(self.holders.answer(room, user, limit, self._answer_budget(room)))

    def _answer(self, peer: int, qid: int, room: str, user: str, limit: int) -> None:
        answer = self.holders.answer(room, user, limit, self._answer_budget(room))
        if answer is None:
            self._waiting_view.append((peer, qid, room, user, limit))
            return
        self._write(_ANSWER, peer, records.encode_presence_answer(qid, answer))

    def _on_presence_event(self, peer: int, aux: int, payload: bytes) -> None:
        e = records.decode_presence_event(payload)
        self.holders.event(peer, e.room, e.user, e.joined)
        assert self.listener is not None
        self.listener.on_presence_event(e.room, e.user, e.joined, e.count)

    def _on_told(self, peer: int, aux: int, payload: bytes) -> None:
        if aux == self.shard_id:
            self._emit(self.holders.told_chunk(peer, records.decode_snapshot(payload)))

    def _on_query(self, peer: int, aux: int, payload: bytes) -> None:
        if aux == self.shard_id:
            q = records.decode_presence_query(payload)
            self._answer(peer, q.qid, q.room, q.user, q.limit)

    def _on_answer(self, peer: int, aux: int, payload: bytes) -> None:
        if aux != self.shard_id:
            return
        qid, answer = records.decode_presence_answer(payload)
        if self.queries.answered(qid):  # the first answer; a second holder's is dropped
            self._asked.pop(qid)(answer)

    def _ask_again(self, asks: list[tuple[int, int, str, str, int]]) -> None:
        for qid, target, room, user, limit in asks:
            query = records.PresenceQuery(qid, room, user, limit)
            self._write(_QUERY, target, records.encode_presence_query(query))

    def fill(self, room: str, first: int, last: int) -> None:
        owner = owner_of(room, self.workers)
        if owner == self.shard_id:
            # We are the owner: nobody holds more than we do (our store, if we
            # have one). Answered at the next drain, outside the engine's call.
            if self.durable is not None:
                self._fills_due.append((room, first, last))
            else:
                self._answers_due.append((room, last))
            return
        request = records.HistoryRequest(room, first, last)
        self._write(_HISTORY_REQ, owner, records.encode_history_request(request))

    def latest_seq(self, room: str) -> int | None:
        return self.tables[owner_of(room, self.workers)].lookup(room)

    def serves_history(self, room: str) -> bool:
        # With a store, the store serves the owner's rooms' fills: its copy may go.
        return self.durable is None and owner_of(room, self.workers) == self.shard_id

    def open_room(self, room: str, then: Callable[[], None]) -> bool:
        return True  # every shard reads every ring: every room is open

    def close_room(self, room: str) -> None:
        pass

    def epoch_of(self, room: str) -> str | None:
        return None  # the supervisor's one epoch for every room

    def catch_up(self) -> None:
        """Commit what we wrote (a join must not see a frame before its record is
        in the ring), then read every ring to its end."""
        self.commit()
        while self.drain():
            pass

    # Sequencing (the owner)

    def _sequence(self, p: Publication) -> int:
        room = p.room
        seq = self.sequencer.assign(room, p.msg_id, p.key, self._now_ns)
        json = wire.message_json(room, p.sender, p.content, seq, p.timestamp, p.msg_id)
        # Ring first, table second, and the table only once the ring's tail is
        # committed (commit): a restart takes the larger of the two, so the table must
        # never name a seq whose record a restarted writer pads over. Due before the
        # write: a burst's commit inside it makes this record visible, and the table
        # must name it in that same commit. A reader lapped in between jumps past the
        # record and asks for the range up to the table's seq; one short of it, the
        # last message of a burst was never asked for, and the room waited for it.
        self._seqs_due[room] = seq
        if self.durable is not None:
            self.durable.sequenced(room, seq, p.timestamp / 1000, p.key, json)
        self._write(
            _ROOM_MSG,
            0,
            records.encode_room_message(room, seq, p.publish_ns, p.msg_id, json, p.key),
        )
        self.stats[_S_SEQUENCED] += 1
        log_event(log, logging.DEBUG, "sequenced", room=room, msg=p.msg_id, seq=seq)
        assert self.listener is not None
        self.listener.on_message(room, seq, p.msg_id, json, p.publish_ns)
        return seq

    def _store_seq(self, room: str, seq: int) -> None:
        table = self.tables[self.shard_id]
        offset = self._table_slots.get(room, -1)
        if offset == -1:
            offset = self._table_slots[room] = table.slot(room)
            if offset is None:
                log_event(log, logging.WARNING, "room_table_full", room=room)
        if offset is not None:
            table.set_seq(offset, seq)

    # Writing

    def _write(self, kind: int, aux: int, payload: bytes) -> None:
        self.writer.append(kind, aux, payload)
        self._written += 1
        self._uncommitted += len(payload)
        if self._uncommitted > self._commit_every:
            # A burst: let the readers start on it before the turn ends.
            self.commit()

    @property
    def commit_due(self) -> bool:
        return self._written > 0 or bool(self._acks_due) or bool(self._failed_due)

    def commit(self) -> None:
        """Make the records written since the last commit visible, then store the
        rooms' seqs in our table, ring every peer's bell once, and ack the
        publishes sequenced here: they are in the ring now."""
        if self._written:
            self.writer.commit()
            if self._seqs_due:
                seqs, self._seqs_due = self._seqs_due, {}
                for room, seq in seqs.items():
                    self._store_seq(room, seq)
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
        if durable is not None:
            # Acked once stored: the writer hands the turn back (drain).
            if self._acks_due or durable.due:
                acks, self._acks_due = self._acks_due, []
                durable.submit(acks)
            return
        if self._acks_due:
            acks, self._acks_due = self._acks_due, []
            listener = self.listener
            assert listener is not None
            for msg_id, room, seq in acks:
                listener.on_published(msg_id, room, seq)

    def heartbeat(self, now_ns: int) -> None:
        self.writer.heartbeat(now_ns)

    # Reading

    def drain(self, now: float | None = None) -> bool:
        """Hand every peer's new records to the listener, ``POLL_LIMIT`` per ring;
        True when there is more to read at once. ``now``: monotonic seconds."""
        listener = self.listener
        if listener is None:
            return False
        if now is not None:
            self._now_ns = int(now * 1e9)
        if self._answers_due:
            answers, self._answers_due = self._answers_due, []
            for room, last in answers:
                listener.on_replay_lost(room, last)
        if self.durable is not None:
            self._stored(listener)
        more = False
        counters = self.stats
        handlers = self._handlers
        # What waited for us when we came to read: the forwards we are to sequence
        # are among it (admission control, full()).
        self.backlog = sum(reader.backlog() for reader in self.readers.values())
        for peer, reader in self.readers.items():
            laps = reader.lapped
            batch = reader.poll(POLL_LIMIT)
            if batch:
                counters[_S_READ] += len(batch)
                for _, kind, aux, payload in batch:
                    handlers[kind](peer, aux, payload)
                if len(batch) == POLL_LIMIT:
                    more = True
            if reader.lapped != laps:
                log_event(log, logging.WARNING, "ring_lapped", peer=peer, lost=reader.lost)
                counters[_S_LAPS] = sum(r.lapped for r in self.readers.values())
                counters[_S_LOST] = sum(r.lost for r in self.readers.values())
                listener.on_resync(self._latest_of(peer))
                more = True
        return more

    def _stored(self, listener: BrokerListener) -> None:
        """The store's side of a drain: the acks of the turns it wrote (the peers'
        as FORWARD_SEEN records; seq 0 says it failed), then our own fills."""
        durable = self.durable
        assert durable is not None
        for turn, ok in durable.finished():
            for msg_id, room, seq in turn.acks:
                if ok:
                    listener.on_published(msg_id, room, seq)
                else:
                    listener.on_publish_failed(msg_id, room)
            for peer, msg_id, room, seq in turn.peer_acks:
                answer = records.ForwardSeen(msg_id, room, seq if ok else 0)
                self._write(_FORWARD_SEEN, peer, records.encode_forward_seen(answer))
        if self._fills_due:
            fills, self._fills_due = self._fills_due, []
            for room, first, last in fills:
                plan = plan_resend(durable.held(room, first, last), first, last, 1 << 30)
                if plan.lost_to:
                    listener.on_replay_lost(room, plan.lost_to)
                for message in plan.messages:
                    listener.on_replay(room, message.seq, message.payload)
                if plan.end is not None:
                    listener.on_replay_end(room, plan.end)

    def _latest_of(self, peer: int) -> Callable[[str], int | None]:
        """Where each room ``peer`` owns is now, by its seq table."""
        table, workers = self.tables[peer], self.workers

        def latest(room: str) -> int | None:
            if owner_of(room, workers) != peer:
                return None
            return table.lookup(room) or 0

        return latest

    def _on_room_message(self, peer: int, aux: int, payload: bytes) -> None:
        msg = records.decode_room_message(payload)
        listener = self.listener
        assert listener is not None
        if self.durable is None and self.forwarder.pending and self.forwarder.answered(msg.msg_id):
            # Without a store, sequenced is kept; with one, the owner says when
            # it is stored (FORWARD_SEEN).
            listener.on_published(msg.msg_id, msg.room, msg.seq)
        listener.on_message(msg.room, msg.seq, msg.msg_id, msg.json, msg.publish_ns)

    def _on_forward(self, peer: int, aux: int, payload: bytes) -> None:
        if aux != self.shard_id:
            return
        publication = records.decode_forward(payload)
        sequencer = self.sequencer
        seen = sequencer.seen(publication.msg_id) or sequencer.seen_key(
            publication.key, self._now_ns
        )
        durable = self.durable
        if seen is None and durable is not None and durable.full:
            answer = records.ForwardSeen(publication.msg_id, publication.room, 0)
            self._write(_FORWARD_SEEN, peer, records.encode_forward_seen(answer))
            return
        if seen is None:
            seq = self._sequence(publication)
            if durable is not None:
                durable.ack_peer(peer, publication.msg_id, publication.room, seq)
            return
        room, seq = seen
        if durable is not None:
            durable.ack_peer(peer, publication.msg_id, room, seq)  # once stored
            return
        answer = records.ForwardSeen(publication.msg_id, room, seq)
        self._write(_FORWARD_SEEN, peer, records.encode_forward_seen(answer))

    def _on_forward_seen(self, peer: int, aux: int, payload: bytes) -> None:
        if aux != self.shard_id:
            return
        seen = records.decode_forward_seen(payload)
        if self.forwarder.answered(seen.msg_id):
            assert self.listener is not None
            if seen.seq:
                self.listener.on_published(seen.msg_id, seen.room, seen.seq)
            else:  # the owner's store could not write it: not published
                self.listener.on_publish_failed(seen.msg_id, seen.room)

    def _on_presence(self, peer: int, aux: int, payload: bytes) -> None:
        p = records.decode_presence(payload)
        self._emit(self.holders.announce(peer, p.room, p.user, p.joined))

    def _on_reset(self, peer: int, aux: int, payload: bytes) -> None:
        """``peer`` (re)started: its users are gone (the rooms we own get their
        leaves), it gets what members were told of the rooms we hold with it
        and our local pairs, and requests to its previous incarnation may be
        lost: the engine asks again for the rooms it owns, we ask again what
        we asked of it."""
        listener = self.listener
        assert listener is not None
        holders = self.holders
        self._emit(holders.drop_shard(peer))
        if peer in holders.co_holders():
            self._pairs(_TOLD, peer, holders.told_for(peer))
        self._ask_again(
            [
                (q, p.target, p.room, p.user, p.limit)
                for q, p in self.queries.reset(peer, self._now_ns / 1e9)
            ]
        )
        listener.on_peer_reset(peer)
        listener.on_resync(self._latest_of(peer))

    def _on_snapshot(self, peer: int, aux: int, payload: bytes) -> None:
        if aux == self.shard_id:
            self._emit(self.holders.snapshot(peer, records.decode_snapshot(payload)))

    def _on_history_request(self, peer: int, aux: int, payload: bytes) -> None:
        """Resend one chunk of the asked range: at most 1/8 of a ring, so that a
        resend cannot lap the shard that asked (it asks for the next)."""
        if aux != self.shard_id:
            return
        req = records.decode_history_request(payload)
        assert self.listener is not None
        if self.durable is not None:
            held = self.durable.held(req.room, req.first, req.last)
        else:
            held = self.listener.held(req.room, req.first)
        plan = plan_resend(held, req.first, req.last, self._max_payload)
        room, write = req.room, self._write
        if plan.lost_to:
            write(
                _REPLAY, peer, records.encode_room_message(room, plan.lost_to, 0, REPLAY_SKIP, b"")
            )
        for message in plan.messages:
            write(
                _REPLAY,
                peer,
                records.encode_room_message(room, message.seq, 0, "", message.payload),
            )
        if plan.end is not None:
            write(_REPLAY, peer, records.encode_room_message(room, plan.end, 0, REPLAY_END, b""))

    def _on_replay(self, peer: int, aux: int, payload: bytes) -> None:
        if aux != self.shard_id:
            return
        msg = records.decode_room_message(payload)
        listener = self.listener
        assert listener is not None
        if msg.json:
            listener.on_replay(msg.room, msg.seq, msg.json)
        elif msg.msg_id == REPLAY_SKIP:
            listener.on_replay_lost(msg.room, msg.seq)
        else:
            listener.on_replay_end(msg.room, msg.seq)

    # Timers and gauges

    def tick(self, now: float) -> float | None:
        """Forward again what the owner has not sequenced yet, give up on what it
        never will; returns the next time this is needed."""
        self._now_ns = int(now * 1e9)
        presence = self._tick_presence(now)
        forwarder = self.forwarder
        if not forwarder.pending:
            return presence
        again, failed = forwarder.due(now, self._commit_every)  # an eighth of a ring
        for pending in again:
            self.stats[_S_RETRIED] += 1
            self._write(_FORWARD, pending.owner, pending.payload)
        if failed:
            listener = self.listener
            assert listener is not None
            for pending in failed:
                log_event(
                    log, logging.ERROR, "forward_failed", msg=pending.msg_id, owner=pending.owner
                )
                listener.on_publish_failed(pending.msg_id, pending.room)
        deadline = forwarder.next_deadline()
        if presence is not None and (deadline is None or presence < deadline):
            return presence
        return deadline

    def _tick_presence(self, now: float) -> float | None:
        """Queries the owner did not answer go to the replica, and fail after
        ``delivery.publish_timeout``; a rebuild waits for silent peers only so long."""
        holders = self.holders
        if not holders.ready and now >= self._rebuild_until:
            log_event(
                log, logging.WARNING, "presence_rebuild_timeout",
                peers=sorted(holders.waiting | holders.waiting_told),
            )  # fmt: skip
            self._emit(holders.give_up())
        queries = self.queries
        if queries.pending:
            again, failed = queries.due(now)
            self._ask_again([(q, p.target, p.room, p.user, p.limit) for q, p in again])
            for qid in failed:
                log_event(log, logging.WARNING, "presence_query_failed", query=qid)
                self._asked.pop(qid)(None)
        deadline = queries.next_deadline()
        if not holders.ready and (deadline is None or self._rebuild_until < deadline):
            return self._rebuild_until
        return deadline

    def record_lag(self) -> None:
        """Set the gauges of how many bytes of each peer's ring we have not read yet."""
        for peer, reader in self.readers.items():
            self.stats[stats.LAG_BASE + peer] = reader.backlog()

    def close(self) -> None:
        if self.durable is not None:
            self.durable.close()  # what was sequenced is written first
            self.durable = None
        self.listener = None
        self.readers = {}
        self.tables = []
        self._ring_views = []
        self._views = []
        self._closing()
