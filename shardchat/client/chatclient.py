"""An asyncio client for shardchat that delivers every room message exactly once.

Built on ``websockets``. It acks what it receives, cumulatively and at most
every ``ack_delay`` (so the server resends what it lost), drops duplicates by
``seq``, and when the connection drops or its shard restarts it reconnects
with exponential backoff and jitter and rejoins every room with ``since`` =
the last seq it saw and that room's ``epoch``, so the application sees each
message once and in order::

    async with ChatClient("ws://127.0.0.1:8080/ws", user="ada", rooms=["lobby"]) as chat:
        seq = await chat.send("lobby", "hello")      # the seq the server gave it
        async for message in chat.messages():        # every message, once, in order
            print(message.room, message.seq, message.sender, message.content)

Failures are of two kinds. Permanent ones raise at once, with the server's
status or code and reason: :class:`Refused` (HTTP 4xx at the upgrade),
:class:`ChatError` (a refused ``join`` or ``send``), :class:`Closed` (a close
that says the client broke the protocol). Transient ones (connection refused,
HTTP 503, close 1001, 1006, 4408, 4409, 4429) are retried, bounded by
``timeout`` and ``attempts`` when given, then raise :class:`Unavailable`.

A ``gap`` frame (PROTOCOL.md, Extensions: messages the server could not
deliver on this connection) is counted in ``gaps``, and its range is asked
for with ``history``: the room's later messages wait until the answer is in,
so that the application still gets every message the server holds once and
in seq order; what ``history`` cannot return any more is counted in ``lost``.

Publishing is at least once: a ``send`` whose ack was lost with the
connection is sent again after the reconnect, with the same ``key``
(PROTOCOL.md, Extensions: the server deduplicates by user, room and ``key``),
so that it is sequenced once.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import random
import secrets
import ssl as ssl_
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any
from urllib.parse import urlencode

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from shardchat.core.errors import ChatError, ClientError, Closed, Refused, Unavailable

__all__ = [
    "ACK_DELAY",
    "ChatClient",
    "ChatError",
    "ClientError",
    "ClientEvent",
    "Closed",
    "Message",
    "Refused",
    "Unavailable",
]

log = logging.getLogger(__name__)

ACK_DELAY = 0.05  # seconds between acks at most: 20 a second per connection in a busy room

# Close codes that say the client broke the protocol: reconnecting would do it again;
# and 4403: the server API disconnected this user and asks it not to come back
# (4400, disconnected with leave to reconnect, is retried like any other close).
PERMANENT_CLOSES = frozenset({1002, 1003, 1007, 1008, 1009, 1010, 4403})
# HTTP statuses at the upgrade that a later attempt may not get (4xx otherwise is final).
TRANSIENT_STATUSES = frozenset({408, 429})


@dataclass(frozen=True, slots=True)
class Message:
    room: str
    seq: int
    sender: str
    content: str
    timestamp: int
    id: str


@dataclass(frozen=True, slots=True)
class ClientEvent:
    """What happened to the connection or a room, for ``on_event``.

    ``kind`` is one of: ``connected`` (first connection), ``disconnected``
    (``detail`` says why; a retry follows in ``delay`` seconds),
    ``reconnected`` (``recovered`` is False when some messages could not be
    recovered), ``joined`` (``room``, ``users`` there now), and the presence
    events ``join`` / ``leave`` (``room``, ``user``).
    """

    kind: str
    room: str = ""
    user: str = ""
    users: tuple[str, ...] = ()
    detail: str = ""
    delay: float = 0.0
    recovered: bool | None = None


@dataclass(slots=True)
class _Fill:
    """A room's ``gap`` ranges being fetched with ``history`` (the first is asked),
    and the room's messages received meanwhile, by seq."""

    ranges: list[tuple[int, int]]
    high: int  # the highest seq received or announced: what is acked
    got: dict[int, Message] = field(default_factory=dict)
    done: int = 0  # the last seq of the ranges answered


class ChatClient:
    """A reconnecting, acking client for rooms over one WebSocket connection.

    Args:
        url: ``ws://host:port/ws``, or ``wss://`` for a server with TLS.
        user: the user name (when the server does not use tokens).
        rooms: rooms to join at once.
        token: a signed token, when the server requires one.
        backoff: first and largest delay between reconnects, in seconds; each
            failed attempt doubles the delay, with up to 25% jitter.
        timeout: give up (raise :class:`Unavailable`) when the server could not
            be reached for this many seconds in a row; None retries for ever.
        attempts: give up after this many failed attempts in a row; None: no limit.
        ack_delay: seconds between acks at most, per connection. Acks are
            cumulative, so one ack covers everything that came since the last
            one (TCP's delayed ack): in a busy room the server reads one ack per
            interval instead of one per read. Keep it well under the server's
            ``delivery.ack_timeout`` (2 s by default); 0 acks once per loop turn.
        on_event: called with a :class:`ClientEvent` for connection changes and
            presence events (on the event loop: keep it quick).
        drop_ack: a test hook called with (room, seq): when it returns True, that
            ack is not sent (to show that the server resends).
        ssl: the TLS context of a ``wss://`` URL (e.g. one that trusts a private
            CA); None verifies against the system's CAs.

    Raises (from :meth:`start`, :meth:`send`, :meth:`join` and :meth:`messages`):
        Refused: the upgrade got an HTTP 4xx (``status``, ``reason``): at once.
        ChatError: a ``join`` or ``send`` was refused (``code``, ``reason``): at once.
        Closed: the server closed with a code a reconnect would not mend, or the
            client was closed while a call waited.
        Unavailable: ``timeout`` or ``attempts`` ran out while retrying.
    """

    def __init__(
        self,
        url: str,
        *,
        user: str | None = None,
        rooms: Sequence[str] = (),
        token: str | None = None,
        backoff: tuple[float, float] = (0.05, 5.0),
        timeout: float | None = None,
        attempts: int | None = None,
        ack_delay: float = ACK_DELAY,
        on_event: Callable[[ClientEvent], None] | None = None,
        drop_ack: Callable[[str, int], bool] | None = None,
        ssl: ssl_.SSLContext | None = None,
    ) -> None:
        self.url = url
        self.ssl = ssl
        self.user = user
        self.token = token
        self.backoff = backoff
        self.timeout = timeout
        self.attempts = attempts
        self.ack_delay = ack_delay
        self.on_event = on_event
        self.drop_ack = drop_ack
        self.rooms: dict[str, None] = dict.fromkeys(rooms)
        self.last_seq: dict[str, int] = {}  # the last seq delivered per room
        self.epochs: dict[str, str] = {}
        self.reconnects = 0
        # Rejoins where the server no longer held what was missed, and `gap` frames.
        self.gaps = 0
        self.lost = 0  # messages of `gap` ranges that `history` could not return
        self._fills: dict[str, _Fill] = {}  # rooms whose gaps are being fetched
        self.shard: int | None = None
        self.name: str | None = None  # the user name the server gave us (welcome)
        self._ws: ClientConnection | None = None
        self._reader: asyncio.Task[None] | None = None
        self._started: asyncio.Future[None] | None = None
        self._failure: ClientError | None = None
        self._closing = False
        self._queue: asyncio.Queue[Message | None] = asyncio.Queue()
        self._acks: dict[str, asyncio.Future[int]] = {}
        self._unsent: dict[str, tuple[str, str]] = {}  # request id -> (room, content)
        # A publish's request id doubles as its idempotency key (sent as `key`), so
        # ids are unique to this client, not just to this connection: the server
        # deduplicates by (user, room, key), and another program of the same user
        # must not collide with ours.
        self._id_prefix = secrets.token_hex(4)
        self._ids = itertools.count(1)
        self._pending_joins: dict[str, tuple[str, asyncio.Future[dict[str, Any]]]] = {}
        self._ack_due: dict[str, int] = {}
        self._ack_scheduled = False
        self._runner: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> ChatClient:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def start(self) -> None:
        """Connect and join ``rooms``, then keep the connection up in the background.

        Returns once connected; raises at once for a permanent refusal
        (:class:`Refused`, :class:`ChatError`) and :class:`Unavailable` when
        ``timeout`` or ``attempts`` run out first.
        """
        self._started = asyncio.get_running_loop().create_future()
        self._runner = asyncio.create_task(self._run())
        try:
            await self._started
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Leave with a normal close (1000); pending calls raise :class:`Closed`."""
        self._closing = True
        ws = self._ws
        if ws is not None:
            await ws.close(1000)
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
        self._fail(Closed(1000, "client closed"), ended=True)

    async def join(self, room: str) -> None:
        """Join ``room`` (now when connected, else at the next connection).

        Raises :class:`ChatError` when the server refuses it (``unauthorized``,
        ``room_full``); the room is then forgotten.
        """
        self._check()
        self.rooms[room] = None
        ws, reader = self._ws, self._reader
        if ws is not None and reader is not None:
            try:
                await self._join(ws, room, reader)
            except ChatError:
                self.rooms.pop(room, None)
                raise

    async def send(self, room: str, content: str) -> int:
        """Publish and wait for the ack; returns the message's seq.

        Raises :class:`ChatError` when the server refuses it (``rate_limited``,
        ``not_member``, ``too_large``, ``rejected``, ``overloaded`` with its
        ``retry_after`` ...), or the client's failure.
        """
        self._check()
        request_id = f"{self._id_prefix}-{next(self._ids)}"
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._acks[request_id] = future
        self._unsent[request_id] = (room, content)
        try:
            if self._ws is not None:
                with contextlib.suppress(ConnectionClosed):  # resent after the reconnect
                    await self._send_publish(self._ws, request_id, room, content)
            return await future
        finally:
            self._acks.pop(request_id, None)
            self._unsent.pop(request_id, None)

    async def messages(self) -> AsyncIterator[Message]:
        """Every room message, once, in seq order per room.

        Ends after :meth:`close`; raises the client's failure when it has one.
        """
        while True:
            item = await self._queue.get()
            if item is None:
                self._queue.put_nowait(None)  # for any other reader of the stream
                if self._failure is not None and not (
                    isinstance(self._failure, Closed) and self._failure.code == 1000
                ):
                    raise self._failure
                return
            yield item

    # Connection loop

    def _check(self) -> None:
        if self._failure is not None:
            raise self._failure
        if self._closing:
            raise Closed(1000, "client closed")

    def _emit(self, event: ClientEvent) -> None:
        if self.on_event is not None:
            self.on_event(event)

    def _fail(self, error: ClientError, ended: bool = False) -> None:
        """Stop for good: every waiting call raises ``error``, the stream ends."""
        if self._failure is None and not ended:
            self._failure = error
        failure = self._failure or error
        if self._started is not None and not self._started.done():
            self._started.set_exception(failure)
        futures: list[asyncio.Future[Any]] = [*self._acks.values()]
        futures += [future for _, future in self._pending_joins.values()]
        for future in futures:
            if not future.done():
                future.set_exception(failure)
        self._queue.put_nowait(None)

    def _connect_url(self) -> str:
        params: list[tuple[str, str]] = []
        if self.user is not None:
            params.append(("user", self.user))
        if self.token is not None:
            params.append(("token", self.token))
        return self.url + ("?" + urlencode(params) if params else "")

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        delay = self.backoff[0]
        failures = 0
        outage_start = loop.time()
        try:
            while not self._closing:
                remaining = None
                if self.timeout is not None:
                    remaining = self.timeout - (loop.time() - outage_start)
                try:
                    tls: dict[str, Any] = {} if self.ssl is None else {"ssl": self.ssl}
                    ws = await connect(
                        self._connect_url(),
                        compression=None,
                        max_size=None,
                        max_queue=None,
                        open_timeout=max(0.05, min(10.0, remaining or 10.0)),
                        close_timeout=2,
                        **tls,
                    )
                except InvalidStatus as exc:
                    status = exc.response.status_code
                    reason = exc.response.body.decode(errors="replace").strip()
                    if 400 <= status < 500 and status not in TRANSIENT_STATUSES:
                        raise Refused(status, reason) from None
                    last = f"HTTP {status}: {reason}"
                except (TimeoutError, OSError, InvalidHandshake) as exc:
                    last = str(exc) or type(exc).__name__
                else:
                    try:
                        last = await self._session(ws)
                        # The session was up: a new outage starts now.
                        delay, failures, outage_start = self.backoff[0], 0, loop.time()
                    finally:
                        self._ws = self._reader = None
                        await ws.close(1000)
                if self._closing:
                    return
                failures += 1
                if self.attempts is not None and failures >= self.attempts:
                    raise Unavailable(failures, last)
                wait = delay * (1 + random.random() / 4)
                if self.timeout is not None:
                    left = self.timeout - (loop.time() - outage_start)
                    if left <= 0:
                        raise Unavailable(failures, last)
                    wait = min(wait, left)
                log.debug("shardchat client: %s; reconnecting in %.2fs", last, wait)
                self._emit(ClientEvent("disconnected", detail=last, delay=wait))
                await asyncio.sleep(wait)
                delay = min(self.backoff[1], delay * 2)
                self.reconnects += 1
        except ClientError as exc:
            self._fail(exc)

    async def _session(self, ws: ClientConnection) -> str:
        """One connection, from the welcome until it drops: why it dropped.

        Raises :class:`ClientError` for a permanent failure.
        """
        try:
            welcome = json.loads(await ws.recv())
        except ConnectionClosed:
            return f"closed ({ws.close_code or 1006}) before the welcome"
        self.shard = welcome.get("shard")
        self.name = welcome.get("user")
        reader = asyncio.create_task(self._read(ws))
        try:
            first = self._started is not None and not self._started.done()
            recovered = True
            for room in list(self.rooms):
                joined = await self._join(ws, room, reader)
                recovered = recovered and joined.get("recovered", True) is not False
            self._ws, self._reader = ws, reader
            for request_id, (room, content) in list(self._unsent.items()):
                await self._send_publish(ws, request_id, room, content)
            if first:
                assert self._started is not None
                self._started.set_result(None)
                self._emit(ClientEvent("connected"))
            else:
                self._emit(ClientEvent("reconnected", recovered=recovered))
            await reader
        except ConnectionClosed:
            pass  # why is in the close frame, read below
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionClosed):
                await reader
            # The answers will not come on this connection: what arrived goes out,
            # the ranges not fetched are lost (the rejoin resumes after them).
            for room in list(self._fills):
                self._end_fill(room, unanswered=True)
        code, reason = ws.close_code, ws.close_reason
        if code in PERMANENT_CLOSES:
            raise Closed(code, reason or "")
        return f"closed ({code or 1006}{' ' + reason if reason else ''})"

    async def _join(
        self, ws: ClientConnection, room: str, reader: asyncio.Task[None]
    ) -> dict[str, Any]:
        request_id = f"{self._id_prefix}-j{next(self._ids)}"
        request: dict[str, Any] = {"type": "join", "room": room, "id": request_id}
        if room in self.last_seq and room in self.epochs:
            request["since"] = self.last_seq[room]
            request["epoch"] = self.epochs[room]
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending_joins[request_id] = (room, future)
        try:
            await ws.send(json.dumps(request))
            # The reader ends first when the connection drops: its error is ours.
            waiting: set[asyncio.Future[Any]] = {future, reader}
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            if not future.done():
                reader.result()  # raises the ConnectionClosed, if any
                raise ConnectionClosed(None, None)  # ended without one: closed all the same
            return future.result()
        finally:
            self._pending_joins.pop(request_id, None)

    async def _send_publish(
        self, ws: ClientConnection, request_id: str, room: str, content: str
    ) -> None:
        await ws.send(
            json.dumps(
                {
                    "type": "message",
                    "room": room,
                    "content": content,
                    "id": request_id,
                    "key": request_id,
                }
            )
        )

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
        await ChatClient._send_quietly(ws, {"type": "ack", "room": room, "seq": seq})

    @staticmethod
    async def _send_quietly(ws: ClientConnection, request: dict[str, Any]) -> None:
        """Send, or nothing when the connection is gone (its loss is handled)."""
        with contextlib.suppress(ConnectionClosed):
            await ws.send(json.dumps(request))
