"""Rooms across shards: sequencing at the owner, forwarding, fan-out, presence.

DESIGN.md, Rooms: a room's owner (``crc32(room) % workers``) alone assigns
its ``seq``. A publish on another shard is forwarded to the owner through
our ring and kept until the owner's sequenced record comes back (then the
sender gets its ``ack``); every acked publish is sequenced exactly once.

Every shard reads every ring and keeps a :class:`RoomLog` of each room it
sees, so ``join`` with ``since`` and ``history`` are answered locally. Two
parts live in their own modules: forwarding (:mod:`shardchat.forwarding`)
and the filling of gaps from the owner (:mod:`shardchat.gapfill`).

Fan-out: each room's new frames of one loop turn are joined once and written
once to each local member (:meth:`Router.flush`).
"""

from __future__ import annotations

import logging
import secrets
import time

from . import records, stats, wire
from .connection import Connection
from .context import ShardContext
from .delivery import Reliable
from .forwarding import Forwarder, send_ack
from .gapfill import GapFill
from .messages import AppCloseCode
from .obs import log_event
from .presence import PresenceView
from .ring import Record, RingReader
from .ringlayout import RecordKind, max_payload
from .rooms import HeldMessage, RoomLog, owner_of

__all__ = ["Router"]

log = logging.getLogger(__name__)

EVICT_EVERY = 30.0  # seconds between scans for idle rooms to drop

_ROOM_MSG = int(RecordKind.ROOM_MSG)
_FORWARD = int(RecordKind.FORWARD)
_PRESENCE = int(RecordKind.PRESENCE)
_RESET = int(RecordKind.RESET)
_FORWARD_SEEN = int(RecordKind.FORWARD_SEEN)
_HISTORY_REQ = int(RecordKind.HISTORY_REQ)
_REPLAY = int(RecordKind.REPLAY)
_SNAPSHOT = int(RecordKind.SNAPSHOT)
_S_JOINS = int(stats.Slot.JOINS)
_S_LEAVES = int(stats.Slot.LEAVES)
_S_ROOMS = int(stats.Slot.ROOMS)
_S_SEQUENCED = int(stats.Slot.MESSAGES_SEQUENCED)
_S_DELIVERED = int(stats.Slot.FRAMES_DELIVERED)
_S_BYTES_OUT = int(stats.Slot.BYTES_OUT)
_S_RESENDS = int(stats.Slot.RESENDS)
_S_LATENCY_COUNT = int(stats.Slot.LATENCY_COUNT)
_S_LATENCY_SUM = int(stats.Slot.LATENCY_SUM_US)


class Router:
    def __init__(self, ctx: ShardContext) -> None:
        config = ctx.config
        self.config = config
        self.stats = ctx.counters  # this shard's block of stats slots
        self.shard_id = ctx.shard_id
        self.workers = config.workers
        self.epoch = ctx.epoch
        self.bus = ctx.bus
        self.loop = ctx.loop
        self.history = config.delivery.history
        self.members: dict[str, dict[Connection, None]] = {}
        self.logs: dict[str, RoomLog] = {}
        self.forwarder = Forwarder(ctx, self._sequence)
        self.gaps = GapFill(ctx, self.logs, self._queue)
        self.presence = PresenceView()
        self.reliable: dict[str, dict[Connection, Reliable]] = {}
        idle = config.delivery.room_idle
        self._next_evict = ctx.loop.time() + min(EVICT_EVERY, idle or EVICT_EVERY)
        self._table_slots: dict[str, int | None] = {}
        self._outbox: dict[str, list[bytes]] = {}
        # Owner acks of this turn, sent by the flush after the bus's commit.
        self._acks: list[tuple[Connection, str, int, str | None]] = []
        self._seqs_due: dict[str, int] = {}  # owned rooms' seqs the table does not show yet
        ctx.bus.on_commit = self._store_seqs
        self._flush_scheduled = False
        self._msg_prefix = f"{ctx.shard_id}-{secrets.token_hex(3)}-"
        self._msg_counter = 0
        self._max_payload = max_payload(config.ring.bytes)

    # Start-up

    def recover(self) -> None:
        """Rebuild rooms from shared memory after a (re)start, then start the bus.

        Our own room table gives each owned room's seq; every ring's retained
        records give the history still held and the ids we already sequenced.
        Forwards to us that are recent and not yet sequenced are sequenced now:
        the previous incarnation may have died before it got to them.
        """
        bus = self.bus
        _, own = bus.retained(self.shard_id)
        self._rebuild(own)
        for room, seq in bus.tables[self.shard_id].entries().items():
            log_ = self.logs.get(room)
            if log_ is None:
                self.logs[room] = RoomLog(self.epoch, self.history, seq)
            else:
                log_.skip_to(seq)
        readers: dict[int, RingReader] = {}
        forwards: list[tuple[int, Record]] = []
        for peer in bus.peers:
            reader, retained = bus.retained(peer)
            readers[peer] = reader
            self._rebuild(retained)
            forwards += [(peer, r) for r in retained if r[1] == _FORWARD and r[2] == self.shard_id]
        oldest_ok = time.monotonic_ns() - int(self.config.delivery.publish_timeout * 1e9)
        for peer, (_, _, _, payload) in forwards:
            forward = records.decode_forward(payload)
            if forward.publish_ns >= oldest_ok:
                self.forwarder.on_forward(peer, forward)
        bus.publish(_RESET, 0, b"")
        bus.start(self.on_records, self.gaps.on_lapped, readers)

    def _rebuild(self, retained: list[Record]) -> None:
        for _, kind, _, payload in retained:
            if kind != _ROOM_MSG:
                continue
            msg = records.decode_room_message(payload)
            log_ = self.logs.get(msg.room)
            if log_ is None:
                log_ = self.logs[msg.room] = RoomLog(self.epoch, self.history, msg.seq - 1)
            if msg.seq > log_.seq + 1:
                log_.skip_to(msg.seq - 1)  # a part of the ring already overwritten
            if msg.seq == log_.seq + 1:
                log_.append(msg.seq, msg.json)
            if owner_of(msg.room, self.workers) == self.shard_id:
                self.forwarder.remember(msg.msg_id, msg.room, msg.seq, msg.key, msg.publish_ns)

    # Publishing

    def next_msg_id(self) -> str:
        self._msg_counter += 1
        return self._msg_prefix + str(self._msg_counter)

    def publish(self, conn: Connection, room: str, content: str, request_id: str | None) -> str:
        """Sequence here or forward to the owner; the sender's ack follows. Returns the msg id."""
        msg_id = self.next_msg_id()
        key = records.idempotency_key(conn.user, request_id)
        forward = records.Forward(
            msg_id, room, conn.user, content, time.time_ns() // 1_000_000, time.monotonic_ns(), key
        )
        owner = owner_of(room, self.workers)
        if owner == self.shard_id:
            seen = self.forwarder.seen_key(key)
            if seen is None:
                seq = self._sequence(forward)
            else:
                room, seq = seen  # a retry: the original's seq, sequenced once
            # Acked in the flush, after the commit: an acked message is in the ring.
            self._acks.append((conn, room, seq, request_id))
            self._schedule_flush()
        else:
            self.forwarder.send(conn, request_id, forward, owner)
        return msg_id

    def _sequence(self, f: records.Forward) -> int:
        room = f.room
        log_ = self._log(room)
        seq = log_.seq + 1
        json = wire.encode(
            {
                "type": "message",
                "room": room,
                "sender": f.sender,
                "content": f.content,
                "seq": seq,
                "timestamp": f.timestamp,
                "id": f.msg_id,
            }
        )
        # Ring first, table second, and the table only once the ring's tail covers the
        # record (at the commit, _store_seqs): the table never runs ahead of the ring,
        # so a restart never skips (and clears) history the ring still holds.
        self.bus.publish(
            _ROOM_MSG,
            0,
            records.encode_room_message(room, seq, f.publish_ns, f.msg_id, json, f.key),
        )
        log_.append(seq, json)
        self._seqs_due[room] = seq
        self.forwarder.remember(f.msg_id, room, seq, f.key)
        self._queue(room, json)
        self.stats[_S_SEQUENCED] += 1
        self._latency(time.monotonic_ns() - f.publish_ns)
        log_event(log, logging.DEBUG, "sequenced", room=room, msg=f.msg_id, seq=seq)
        return seq

    def _latency(self, ns: int) -> None:
        """Publish-to-delivery time of one message, into the histogram."""
        counters = self.stats
        counters[stats.latency_slot(ns / 1e6)] += 1
        counters[_S_LATENCY_COUNT] += 1
        counters[_S_LATENCY_SUM] += max(0, ns // 1000)

    def _store_seqs(self) -> None:
        """The bus committed our ring's tail: the seq table may now show those seqs."""
        if self._seqs_due:
            due, self._seqs_due = self._seqs_due, {}
            for room, seq in due.items():
                self._store_seq(room, seq)

    def _store_seq(self, room: str, seq: int) -> None:
        table = self.bus.tables[self.shard_id]
        offset = self._table_slots.get(room, -1)
        if offset == -1:
            offset = self._table_slots[room] = table.slot(room)
            if offset is None:
                log_event(log, logging.WARNING, "room_table_full", room=room)
        if offset is not None:
            table.set_seq(offset, seq)

    # Records from peers

    def on_records(self, peer: int, batch: list[Record]) -> None:
        me = self.shard_id
        for _, kind, aux, payload in batch:
            if kind == _ROOM_MSG:
                self._on_room_message(records.decode_room_message(payload))
            elif kind == _FORWARD:
                if aux == me:
                    self.forwarder.on_forward(peer, records.decode_forward(payload))
            elif kind == _PRESENCE:
                p = records.decode_presence(payload)
                self._presence_change(p.room, p.user, peer, p.joined)
            elif kind == _FORWARD_SEEN:
                if aux == me:
                    seen = records.decode_forward_seen(payload)
                    self.forwarder.acknowledge(seen.msg_id, seen.room, seen.seq)
            elif kind == _REPLAY:
                if aux == me:
                    self.gaps.on_replay(records.decode_room_message(payload))
            elif kind == _HISTORY_REQ:
                if aux == me:
                    self.gaps.answer(peer, records.decode_history_request(payload))
            elif kind == _RESET:
                self._on_reset(peer)
            elif kind == _SNAPSHOT:
                for room, user in records.decode_snapshot(payload):
                    self._presence_change(room, user, peer, True)

    def _on_room_message(self, msg: records.RoomMessage) -> None:
        if self.forwarder.pending:
            self.forwarder.acknowledge(msg.msg_id, msg.room, msg.seq)
        room = msg.room
        log_ = self.logs.get(room)
        if log_ is None:
            log_ = self.logs[room] = RoomLog(self.epoch, self.history, msg.seq - 1)
        seq = msg.seq
        if seq == log_.seq + 1 and room not in self.gaps.held_back:
            log_.append(seq, msg.json)
            log_.touched = self.loop.time()
            self._queue(room, msg.json)
            if room in self.members:
                self._latency(time.monotonic_ns() - msg.publish_ns)
        elif seq > log_.seq:
            self.gaps.hold_back(log_, msg)

    # Presence

    def _presence_change(self, room: str, user: str, shard: int, joined: bool) -> None:
        if self.presence.change(room, user, shard, joined):
            self._presence_event(room, user, "join" if joined else "leave")

    def _presence_event(
        self, room: str, user: str, kind: str, skip: Connection | None = None
    ) -> None:
        members = self.members.get(room)
        if not members or self.presence.count(room) > self.config.presence.events_limit:
            return
        frame = wire.text_frame(
            wire.encode(
                {
                    "type": kind,
                    "room": room,
                    "sender": user,
                    "timestamp": time.time_ns() // 1_000_000,
                }
            )
        )
        for conn in members:
            if conn is not skip:
                conn.send(frame)

    def _on_reset(self, peer: int) -> None:
        """A peer (re)started: its users are gone; tell it (and all) who is here, and
        ask it again for the gaps it was filling for us."""
        self.gaps.on_owner_reset(peer)
        for room, user in self.presence.drop_shard(peer):
            self._presence_event(room, user, "leave")
        pairs = self.presence.local_pairs()
        chunk: list[tuple[str, str]] = []
        size = 0
        for pair in pairs:
            chunk.append(pair)
            size += len(pair[0]) + len(pair[1]) + 8
            if size > self._max_payload // 2:
                self.bus.publish(_SNAPSHOT, peer, records.encode_snapshot(chunk))
                chunk, size = [], 0
        if chunk:
            self.bus.publish(_SNAPSHOT, peer, records.encode_snapshot(chunk))

    def users(self, room: str) -> list[str]:
        return self.presence.users(room)

    # Membership

    def _log(self, room: str) -> RoomLog:
        log_ = self.logs.get(room)
        if log_ is None:
            owner = owner_of(room, self.workers)
            seq = self.bus.tables[owner].lookup(room) or 0
            log_ = self.logs[room] = RoomLog(self.epoch, self.history, seq)
        log_.touched = self.loop.time()
        return log_

    def _evict_idle(self, now: float) -> None:
        """Drop the logs of rooms this shard does not own, has no members of and has
        not used for ``delivery.room_idle``: every shard's memory stays with the rooms
        in use, and the owner keeps the history for a later join."""
        idle = self.config.delivery.room_idle
        busy = self.members.keys() | self.gaps.held_back.keys() | self.reliable.keys()
        dropped = [
            room
            for room, log_ in self.logs.items()
            if now - log_.touched >= idle
            and room not in busy
            and owner_of(room, self.workers) != self.shard_id
        ]
        for room in dropped:
            del self.logs[room]
        if dropped:
            log_event(log, logging.INFO, "rooms_dropped", count=len(dropped), kept=len(self.logs))

    def join(self, conn: Connection, room: str) -> RoomLog:
        """Add a member; the caller answers ``joined`` from the returned log."""
        # Catch up with the rings and deliver what is queued: the joiner's live
        # frames start right after the log's current seq.
        self.bus.drain()
        self.flush()
        log_ = self._log(room)
        self.members.setdefault(room, {})[conn] = None
        self.stats[_S_JOINS] += 1
        self.stats[_S_ROOMS] = len(self.members)
        if self.presence.local_join(room, conn.user):
            presence = records.encode_presence(records.Presence(room, conn.user, True))
            self.bus.publish(_PRESENCE, 0, presence)
            if self.presence.change(room, conn.user, self.shard_id, True):
                self._presence_event(room, conn.user, "join", skip=conn)
        return log_

    def leave(self, conn: Connection, room: str) -> None:
        reliable = self.reliable.get(room)
        if reliable is not None and reliable.pop(conn, None) is not None and not reliable:
            del self.reliable[room]
        members = self.members.get(room)
        if members is not None and conn in members:
            del members[conn]
            if not members:
                del self.members[room]
            self.stats[_S_LEAVES] += 1
            self.stats[_S_ROOMS] = len(self.members)
        if self.presence.local_leave(room, conn.user):
            presence = records.encode_presence(records.Presence(room, conn.user, False))
            self.bus.publish(_PRESENCE, 0, presence)
            self._presence_change(room, conn.user, self.shard_id, False)

    def replay(self, room: str, since: int, limit: int | None = None) -> list[HeldMessage]:
        """The held messages after ``since`` (``history``), once the rings are read."""
        self.bus.drain()
        self.flush()
        log_ = self.logs.get(room)
        return [] if log_ is None else log_.after(since, limit)

    # Fan-out

    def _queue(self, room: str, json: bytes) -> None:
        if room not in self.members:
            return
        frames = self._outbox.get(room)
        if frames is None:
            self._outbox[room] = [wire.text_frame(json)]
        else:
            frames.append(wire.text_frame(json))
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self.flush)

    def flush(self) -> None:
        """Commit our ring, then send this turn's owner acks, then write each room's
        queued frames, joined once, once to each local member. Nothing sequenced here
        reaches a client before its record is visible in the ring (the tail is
        committed): an owner killed after that loses no message anyone saw or had
        acked."""
        self._flush_scheduled = False
        self.bus.commit()
        if self._acks:
            acks, self._acks = self._acks, []
            for conn, room, seq, request_id in acks:
                send_ack(conn, room, seq, request_id)
        if not self._outbox:
            return
        outbox, self._outbox = self._outbox, {}
        members_of = self.members
        delivered = 0
        sent = 0
        for room, frames in outbox.items():
            members = members_of.get(room)
            if not members:
                continue
            buf = frames[0] if len(frames) == 1 else b"".join(frames)
            for conn in members:
                out = conn.out
                if out is not None:
                    out.write(buf)
            delivered += len(frames) * len(members)
            sent += len(buf) * len(members)
            reliable = self.reliable.get(room)
            if reliable:
                latest = self.logs[room].seq
                now = self.loop.time()
                timeout = self.config.delivery.ack_timeout
                for state in reliable.values():
                    state.sent(latest, now, timeout)
        counters = self.stats
        counters[_S_DELIVERED] += delivered
        counters[_S_BYTES_OUT] += sent

    # Reliable delivery

    def ack(self, conn: Connection, room: str, seq: int) -> None:
        """A client's cumulative ack; the first one puts it in reliable mode for the room.

        No flush here: an ack must not cut the loop turn's batch short (that
        would cost the whole room its coalescing). A client cannot ack what it
        has not received, so the room's seq is a safe upper bound.
        """
        latest = self.logs[room].seq if room in self.logs else 0
        reliable = self.reliable.setdefault(room, {})
        state = reliable.get(conn)
        if state is None:
            reliable[conn] = state = Reliable(min(seq, latest))
            state.sent(latest, self.loop.time(), self.config.delivery.ack_timeout)
        else:
            state.ack(seq, latest, self.loop.time(), self.config.delivery.ack_timeout)

    def _resend_due(self, now: float) -> None:
        delivery = self.config.delivery
        for room, states in list(self.reliable.items()):
            log_ = self.logs.get(room)
            for conn, state in list(states.items()):
                if not state.due(now):
                    continue
                if state.exhausted(delivery.ack_retries) or log_ is None:
                    conn.close(AppCloseCode.ACK_TIMEOUT, "ack timeout")
                    del states[conn]
                    continue
                held = log_.after(state.acked)
                if held:
                    conn.send(b"".join(wire.text_frame(m.payload) for m in held))
                    self.stats[_S_RESENDS] += len(held)
                state.resent(now, delivery.ack_timeout)
            if not states:
                del self.reliable[room]

    # Timers

    def sweep(self, now: float) -> None:
        """Resends, forward retries, gap deadlines, idle rooms; once per shard tick."""
        if self.reliable:
            self._resend_due(now)
        idle = self.config.delivery.room_idle
        if idle and now >= self._next_evict:
            self._next_evict = now + min(EVICT_EVERY, idle)
            self._evict_idle(now)
        if self.forwarder.pending:
            self.forwarder.sweep(now)
        if self.gaps.held_back:
            self.gaps.sweep(now)
