"""What the client does with each frame it reads: dispatch, dedup by seq, gap fill, acks."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from shardchat.client.records import ClientEvent, Message
from shardchat.core.errors import ChatError

__all__ = ["FrameHandler"]

# The client's logger: these lines keep the name they always had.
log = logging.getLogger("shardchat.client.chatclient")


@dataclass(slots=True)
class _Fill:
    """A room's ``gap`` ranges being fetched with ``history`` (the first is asked),
    and the room's messages received meanwhile, by seq."""

    ranges: list[tuple[int, int]]
    high: int  # the highest seq received or announced: what is acked
    got: dict[int, Message] = field(default_factory=dict)
    done: int = 0  # the last seq of the ranges answered


class FrameHandler:
    """The receiving half of :class:`~shardchat.client.chatclient.ChatClient`
    (which sets these attributes in its ``__init__``)."""

    on_event: Callable[[ClientEvent], None] | None
    drop_ack: Callable[[str, int], bool] | None
    ack_delay: float
    last_seq: dict[str, int]
    epochs: dict[str, str]
    gaps: int
    lost: int
    _fills: dict[str, _Fill]
    _ws: ClientConnection | None
    _queue: asyncio.Queue[Message | None]
    _acks: dict[str, asyncio.Future[int]]
    _unsent: dict[str, tuple[str, str]]
    _pending_joins: dict[str, tuple[str, asyncio.Future[dict[str, Any]]]]
    _ack_due: dict[str, int]
    _ack_scheduled: bool
    _tasks: set[asyncio.Task[None]]

    def _emit(self, event: ClientEvent) -> None:
        if self.on_event is not None:
            self.on_event(event)

    async def _read(self, ws: ClientConnection) -> None:
        async for raw in ws:
            frame = json.loads(raw)
            kind = frame.get("type")
            if kind == "message":
                self._on_message(ws, frame)
            elif kind == "ack":
                future = self._acks.get(frame.get("id", ""))
                if future is not None and not future.done():
                    future.set_result(frame["seq"])
                    self._unsent.pop(frame["id"], None)
            elif kind == "joined":
                self._on_joined(frame)
            elif kind == "gap":
                self._on_gap(ws, frame)
            elif kind == "history_end":
                self._on_history_end(ws, frame)
            elif kind in ("join", "leave"):
                self._emit(ClientEvent(kind, room=frame["room"], user=frame["sender"]))
            elif kind == "error":
                self._on_error(frame)

    def _on_error(self, frame: dict[str, Any]) -> None:
        request_id = frame.get("id", "")
        error = ChatError(frame["code"], frame["reason"], frame.get("retry_after"))
        future = self._acks.get(request_id)
        if future is not None and not future.done():
            self._unsent.pop(request_id, None)  # refused, not lost: never resent
            future.set_exception(error)
            return
        pending = self._pending_joins.get(request_id)
        if pending is not None and not pending[1].done():
            pending[1].set_exception(error)
            return
        log.debug("shardchat client: error frame %s", frame)

    def _on_joined(self, frame: dict[str, Any]) -> None:
        # Handled here, before the replay that follows it is read.
        room = frame["room"]
        epoch = frame["epoch"]
        if "recovered" in frame and not frame["recovered"]:
            self.gaps += 1
            log.debug("shardchat client: room %s lost messages while disconnected", room)
        if room not in self.epochs:
            self.last_seq.setdefault(room, frame["seq"])  # live from here
        elif epoch != self.epochs[room]:
            self.last_seq[room] = 0  # a new run of the room's sequence: take it all
        self.epochs[room] = epoch
        for pending_room, future in list(self._pending_joins.values()):
            if pending_room == room and not future.done():
                future.set_result(frame)
                break
        self._emit(ClientEvent("joined", room=room, users=tuple(frame.get("users", ()))))

    def _on_message(self, ws: ClientConnection, frame: dict[str, Any]) -> None:
        room = frame["room"]
        seq = frame["seq"]
        last = self.last_seq.get(room, 0)
        if seq > last:
            # Anything at or below `last` is a resend or a replay overlap: a duplicate.
            message = Message(
                room, seq, frame["sender"], frame["content"], frame["timestamp"], frame["id"]
            )
            fill = self._fills.get(room)
            if fill is not None:
                # A gap's range is being fetched: history's answer and the live
                # messages after the gap wait for each other, to go out in order.
                fill.got[seq] = message
                fill.high = max(fill.high, seq)
            else:
                self.last_seq[room] = seq
                self._queue.put_nowait(message)
        # Ack (cumulatively) what we hold, duplicates included (a resend means the
        # server missed our ack), once per ack_delay.
        fill = self._fills.get(room)
        self._ack_later(ws, room, fill.high if fill else self.last_seq.get(room, seq))

    def _on_gap(self, ws: ClientConnection, frame: dict[str, Any]) -> None:
        """Messages ``first..last`` will not come live: fetched with ``history``
        (one request per room at a time: its ``history_end`` names no request)."""
        room = frame["room"]
        first, last = max(frame["first"], self.last_seq.get(room, 0) + 1), frame["last"]
        self.gaps += 1
        fill = self._fills.get(room)
        if fill is not None:
            fill.high = max(fill.high, last)
            if first <= last:
                fill.ranges.append((first, last))  # asked when the current one is answered
        elif first <= last:
            fill = self._fills[room] = _Fill([(first, last)], last)
            self._ask_history(ws, room, first, last)
        # Acked past: those messages are not coming live (PROTOCOL.md, gap).
        self._ack_later(ws, room, fill.high if fill else max(last, self.last_seq.get(room, 0)))

    def _on_history_end(self, ws: ClientConnection, frame: dict[str, Any]) -> None:
        room = frame["room"]
        fill = self._fills.get(room)
        if fill is None:
            return
        first, last = fill.ranges.pop(0)
        self.lost += sum(1 for seq in range(first, last + 1) if seq not in fill.got)
        fill.done = last
        if fill.ranges:
            self._ask_history(ws, room, *fill.ranges[0])
        else:
            self._end_fill(room)

    def _end_fill(self, room: str, unanswered: bool = False) -> None:
        """The room's gaps are answered (or never will be): what came goes out in
        seq order, once."""
        fill = self._fills.pop(room)
        if unanswered:
            for first, last in fill.ranges:
                self.lost += sum(1 for seq in range(first, last + 1) if seq not in fill.got)
                fill.done = last
        for seq in sorted(fill.got):
            if seq > self.last_seq.get(room, 0):
                self.last_seq[room] = seq
                self._queue.put_nowait(fill.got[seq])
        # Past the ranges, even when their last messages are lost: the resume and
        # the acks go on from there.
        self.last_seq[room] = max(self.last_seq.get(room, 0), fill.done)

    def _ask_history(self, ws: ClientConnection, room: str, first: int, last: int) -> None:
        request = {"type": "history", "room": room, "since": first - 1, "limit": last - first + 1}
        task = asyncio.ensure_future(self._send_quietly(ws, request))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _ack_later(self, ws: ClientConnection, room: str, seq: int) -> None:
        self._ack_due[room] = seq
        if not self._ack_scheduled:
            self._ack_scheduled = True
            asyncio.get_running_loop().call_later(self.ack_delay, self._flush_acks, ws)

    def _flush_acks(self, received_on: ClientConnection) -> None:
        self._ack_scheduled = False
        # After a reconnect the acks go to the new connection: they are cumulative
        # seqs of the room, true on any connection.
        ws = self._ws or received_on
        due, self._ack_due = self._ack_due, {}
        for room, seq in due.items():
            if self.drop_ack is not None and self.drop_ack(room, seq):
                continue
            task = asyncio.ensure_future(self._send_ack(ws, room, seq))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _send_ack(ws: ClientConnection, room: str, seq: int) -> None:
        await FrameHandler._send_quietly(ws, {"type": "ack", "room": room, "seq": seq})

    @staticmethod
    async def _send_quietly(ws: ClientConnection, request: dict[str, Any]) -> None:
        """Send, or nothing when the connection is gone (its loss is handled)."""
        with contextlib.suppress(ConnectionClosed):
            await ws.send(json.dumps(request))
