"""What the broker told the engine, applied: messages, acks, presence events, fills, room states.

These are the :class:`~shardchat.core.broker.BrokerListener` methods. A broker
never calls them: it is handed :attr:`RoomEngine.inbox`, which queues each
call, and the engine applies the queue at its next input (inbox.py).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable
from typing import TYPE_CHECKING

import orjson

from shardchat.core import wire
from shardchat.core.counters import LATENCY_BASE, LATENCY_BUCKETS_MS
from shardchat.core.errors import ErrorCode, ProtocolError
from shardchat.core.hookevents import HookEvent
from shardchat.core.interfaces import (
    ERROR,
    WARNING,
)
from shardchat.core.outputs import ApiResult, C, Close
from shardchat.core.roomlog import HeldMessage, RoomLog

if TYPE_CHECKING:
    pass
from shardchat.core.engine.rooms import Rooms
from shardchat.core.engine.state import (
    NO_CALL,
    S_LATENCY_COUNT,
    S_LATENCY_SUM,
)


class Deliveries(Rooms[C]):
    """The deliveries' part of the engine (applied from its inbox)."""

    __slots__ = ()

    def _apply_inbox(self) -> None:
        """:meth:`Inbox.apply <shardchat.core.engine.inbox.Inbox.apply>`, with the
        common cases of the two items every message brings handled in the loop
        (a message that follows on in its room, the ack of our own publish):
        once per message per shard, the engine's hot path, where a call per item
        was a fifth of its cost. Anything else runs its handler, in order; a
        handler that re-enters goes on with the same queue."""
        inbox = self.inbox
        queue = inbox.queue
        pop = queue.popleft
        on_message = inbox.message_handler
        on_published = inbox.published_handler
        # What each case needs is read from self there, not bound here: most calls
        # bring one item (a turn's message, or its ack at the turn's end).
        while queue:
            fn, args = pop()
            if fn is on_message:
                room, seq, _msg_id, json, publish_ns = args
                log_ = self.logs.get(room)
                if log_ is not None and seq == log_.seq + 1 and room not in self.gaps.parked:
                    log_.append(seq, json)
                    now = log_.touched = self.now
                    if room in self.members:
                        self.fanout.queue(room, json)
                        # _latency, inline
                        ns = int(now * 1e9) - publish_ns
                        counters = self.counters
                        counters[LATENCY_BASE + bisect_left(LATENCY_BUCKETS_MS, ns / 1e6)] += 1
                        counters[S_LATENCY_COUNT] += 1
                        if ns > 0:
                            counters[S_LATENCY_SUM] += ns // 1000
                    continue
            elif fn is on_published and not self._pending_messages:
                msg_id, room, seq = args
                sender = self._pending.pop(msg_id, None)
                if sender is not None:
                    # on_published's ack to a connection, inline
                    conn, request_id = sender
                    if conn in self.conns:
                        ack: dict[str, object] = {"type": "ack", "room": room, "seq": seq}
                        if request_id is not None:
                            ack["id"] = request_id
                        # wire.encode and _reply, inline
                        self._out.append(((conn,), wire.text_frame(orjson.dumps(ack))))
                    continue
            fn(*args)

    def on_message(self, room: str, seq: int, msg_id: str, json: bytes, publish_ns: int) -> None:
        log_ = self.logs.get(room)
        if log_ is None:
            log_ = self.logs[room] = RoomLog(self._epoch(room), self._capacity(room), seq - 1)
        if seq == log_.seq + 1 and room not in self.gaps.parked:
            log_.append(seq, json)
            log_.touched = self.now
            if room in self.members:
                self.fanout.queue(room, json)
                self._latency(int(self.now * 1e9) - publish_ns)
        elif seq > log_.seq:
            self.gaps.park(log_, room, seq, json, self.now)

    def on_published(self, msg_id: str, room: str, seq: int) -> None:
        if self._pending_messages:
            message = self._pending_messages.pop(msg_id, None)
            if message is not None:
                conn_id, user, content = message
                fields = {"seq": seq, "msg_id": msg_id, "content": content}
                self._events.append(HookEvent("message", user, room, conn_id, self.wall, fields))
        pending = self._pending.pop(msg_id, None)
        if pending is None:
            token = self._calls.pop(msg_id, NO_CALL)
            if token is not NO_CALL:
                self._out.append(((), ApiResult(token, True, room, seq)))
            return
        conn, request_id = pending
        if conn not in self.conns:
            return
        ack: dict[str, object] = {"type": "ack", "room": room, "seq": seq}
        if request_id is not None:
            ack["id"] = request_id
        self._reply(conn, ack)

    def on_publish_failed(self, msg_id: str, room: str) -> None:
        self._pending_messages.pop(msg_id, None)
        pending = self._pending.pop(msg_id, None)
        self.log.event(ERROR, "publish_failed", msg=msg_id, room=room)
        reason = (
            f"room {room}: the message is not known to be published (its broker did"
            " not confirm it); retrying with the same key is safe"
        )
        if pending is None:
            token = self._calls.pop(msg_id, NO_CALL)
            if token is not NO_CALL:
                code = ErrorCode.UNAVAILABLE.value
                self._out.append(((), ApiResult(token, False, room, code=code, reason=reason)))
            return
        conn, request_id = pending
        state = self.conns.get(conn)
        if state is not None:
            self._refuse(conn, state, ProtocolError(ErrorCode.UNAVAILABLE, reason, request_id))

    def on_presence_event(self, room: str, user: str, joined: bool, count: int) -> None:
        """A join or leave event, for our members of the room but that user's own
        connections; none in rooms over ``presence.events_limit``."""
        members = self.members.get(room)
        if not members or count > self.config.presence.events_limit:
            return
        conns = self.conns
        targets = [c for c in members if conns[c].user != user]
        if not targets:
            return
        kind = "join" if joined else "leave"
        frame = wire.text_frame(
            wire.encode(
                {"type": kind, "room": room, "sender": user, "timestamp": int(self.wall * 1000)}
            )
        )
        self._out.append((targets, frame))

    def on_peer_reset(self, peer: int) -> None:
        """A peer (re)started (its broker dropped its users): tell it who is here,
        then (after the snapshot, so that a rebuilding holder applies them) the
        connect-proxy info of our users that have one, each one's latest join's
        (members are in join order)."""
        self.broker.snapshot(peer, self.presence.local_pairs())
        conns = self.conns
        for room, members in self.members.items():
            infos: dict[str, str] = {}
            for conn in members:
                state = conns.get(conn)
                if state is not None and state.presence_info is not None:
                    infos[state.user] = state.presence_info
            for user, info in infos.items():
                self.broker.announce(room, user, True, info)

    def on_replay(self, room: str, seq: int, json: bytes) -> None:
        self.gaps.on_replay(room, seq, json)
        self.fetches.on_replay(room, seq, json)

    def on_replay_lost(self, room: str, last: int) -> None:
        self.gaps.on_lost(room, last)
        self.fetches.on_lost(room, last)

    def on_replay_end(self, room: str, last: int) -> None:
        self.gaps.on_end(room, self.now)
        self.fetches.on_end(room, last, self.now)

    def on_resync(self, latest: Callable[[str], int | None]) -> None:
        self.gaps.resync(latest, self.now)
        self.fetches.ask_again(latest, self.now)

    def on_room_state(self, room: str, epoch: str, seq: int) -> None:
        log_ = self.logs.get(room)
        if log_ is None:
            return  # made when needed, with the broker's epoch and seq
        waiting: list[Callable[[], None]] = []
        if log_.epoch != epoch:
            # The store lost the room (Redis restarted without its data): its seqs
            # start again under a new epoch. Members here hold seqs of the old one,
            # so they are closed to rejoin (ChatClient resumes with since/epoch and
            # gets recovered: false), and the log starts again.
            self.log.event(WARNING, "room_epoch_changed", room=room, epoch=epoch)
            waiting = self.gaps.restart(room)
            log_ = self.logs[room] = RoomLog(epoch, self._capacity(room), 0, self.now)
            members = self.members.get(room)
            if members:
                self._out.append((list(members), Close(1012, "room history was reset")))
        if seq > log_.seq:
            self.gaps.request(room, log_.seq + 1, seq, self.now, "resync")
        # Joins that waited for the old epoch's fill ask again: they wait for the
        # new one, or go on with the new log.
        for then in waiting:
            then()

    def held(self, room: str, first: int) -> list[HeldMessage]:
        log_ = self.logs.get(room)
        return [] if log_ is None else log_.after(first - 1)

    def restore(self, room: str, seq: int, json: bytes | None) -> None:
        log_ = self.logs.get(room)
        if json is None:
            if log_ is None:
                self.logs[room] = RoomLog(self._epoch(room), self._capacity(room), seq, self.now)
            else:
                log_.skip_to(seq)
            return
        if log_ is None:
            log_ = self.logs[room] = RoomLog(
                self._epoch(room), self._capacity(room), seq - 1, self.now
            )
        if seq > log_.seq + 1:
            log_.skip_to(seq - 1)  # a part of the ring already overwritten
        if seq == log_.seq + 1:
            log_.append(seq, json)
