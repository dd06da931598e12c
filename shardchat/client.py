"""An asyncio client for shardchat that delivers every room message exactly once.

Built on ``websockets``. It acks what it receives, cumulatively and at most
every ``ack_delay`` (so the server resends what it lost), drops duplicates by
``seq``, and when the connection drops or its shard restarts it reconnects
with backoff and rejoins every room with ``since`` = the last seq it saw and
that room's ``epoch``, so the application sees each message once and in
order::

    async with ChatClient("ws://127.0.0.1:8080/ws", user="ada", rooms=["lobby"]) as chat:
        seq = await chat.send("lobby", "hello")      # the seq the server gave it
        async for message in chat.messages():        # every message, once, in order
            print(message.room, message.seq, message.sender, message.content)

Publishing is at least once: a ``send`` whose ack was lost with the
connection is sent again after the reconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import random
import ssl as ssl_
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any
from urllib.parse import urlencode

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from .errors import ShardchatError

__all__ = ["ACK_DELAY", "ChatClient", "ChatError", "Message"]

log = logging.getLogger(__name__)

ACK_DELAY = 0.05  # seconds between acks at most: 20 a second per connection in a busy room


@dataclass(frozen=True, slots=True)
class Message:
    room: str
    seq: int
    sender: str
    content: str
    timestamp: int
    id: str


class ChatError(ShardchatError):
    """The server refused a request (an ``error`` frame); ``code`` is the protocol's."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(f"{code}: {reason}")
        self.code = code
        self.reason = reason


class ChatClient:
    """A reconnecting, acking client for rooms over one WebSocket connection.

    Args:
        url: ``ws://host:port/ws``, or ``wss://`` for a server with TLS.
        user: the user name (when the server does not use tokens).
        rooms: rooms to join at once.
        token: a signed token, when the server requires one.
        backoff: first and largest delay between reconnects, in seconds.
        ack_delay: seconds between acks at most, per connection. Acks are
            cumulative, so one ack covers everything that came since the last
            one (TCP's delayed ack): in a busy room the server reads one ack per
            interval instead of one per read. Keep it well under the server's
            ``delivery.ack_timeout`` (2 s by default); 0 acks once per loop turn.
        drop_ack: a test hook called with (room, seq): when it returns True, that
            ack is not sent (to show that the server resends).
        ssl: the TLS context of a ``wss://`` URL (e.g. one that trusts a private
            CA); None verifies against the system's CAs.
    """

    def __init__(
        self,
        url: str,
        *,
        user: str | None = None,
        rooms: Sequence[str] = (),
        token: str | None = None,
        backoff: tuple[float, float] = (0.05, 5.0),
        ack_delay: float = ACK_DELAY,
        drop_ack: Callable[[str, int], bool] | None = None,
        ssl: ssl_.SSLContext | None = None,
    ) -> None:
        self.url = url
        self.ssl = ssl
        self.user = user
        self.token = token
        self.backoff = backoff
        self.ack_delay = ack_delay
        self.drop_ack = drop_ack
        self.rooms: dict[str, None] = dict.fromkeys(rooms)
        self.last_seq: dict[str, int] = {}  # the last seq delivered per room
        self.epochs: dict[str, str] = {}
        self.reconnects = 0
        self.gaps = 0  # rejoins where the server no longer held what was missed
        self.shard: int | None = None
        self._ws: ClientConnection | None = None
        self._connected = asyncio.Event()
        self._closing = False
        self._queue: asyncio.Queue[Message] = asyncio.Queue()
        self._acks: dict[str, asyncio.Future[int]] = {}
        self._unsent: dict[str, tuple[str, str]] = {}  # request id -> (room, content)
        self._ids = itertools.count(1)
        self._ack_due: dict[str, int] = {}
        self._ack_scheduled = False
        self._runner: asyncio.Task[None] | None = None
        self._joined: dict[str, asyncio.Future[dict[str, Any]]] = {}
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
        """Connect (and keep reconnecting) in the background; return once connected."""
        self._runner = asyncio.create_task(self._run())
        await self._connected.wait()

    async def close(self) -> None:
        self._closing = True
        if self._ws is not None:
            await self._ws.close()
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner

    async def join(self, room: str) -> None:
        self.rooms[room] = None
        if self._ws is not None:
            await self._join(self._ws, room)

    async def send(self, room: str, content: str) -> int:
        """Publish and wait for the ack; returns the message's seq."""
        request_id = f"c{next(self._ids)}"
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._acks[request_id] = future
        self._unsent[request_id] = (room, content)
        try:
            if self._ws is not None:
                await self._send_publish(self._ws, request_id, room, content)
            return await future
        finally:
            self._acks.pop(request_id, None)
            self._unsent.pop(request_id, None)

    async def messages(self) -> AsyncIterator[Message]:
        """Every room message, once, in seq order per room."""
        while True:
            yield await self._queue.get()

    # Connection loop

    def _connect_url(self) -> str:
        params: list[tuple[str, str]] = []
        if self.user is not None:
            params.append(("user", self.user))
        if self.token is not None:
            params.append(("token", self.token))
        return self.url + ("?" + urlencode(params) if params else "")

    async def _run(self) -> None:
        delay = self.backoff[0]
        while not self._closing:
            try:
                tls: dict[str, Any] = {} if self.ssl is None else {"ssl": self.ssl}
                async with connect(
                    self._connect_url(), compression=None, max_size=None, max_queue=None, **tls
                ) as ws:
                    delay = self.backoff[0]
                    await self._session(ws)
            except (TimeoutError, OSError, ConnectionClosed, InvalidHandshake) as exc:
                if self._closing:
                    return
                log.info("shardchat client reconnecting in %.2fs: %r", delay, exc)
            finally:
                self._ws = None
                self._connected.clear()
            if self._closing:
                return
            await asyncio.sleep(delay * (1 + random.random() / 4))
            delay = min(self.backoff[1], delay * 2)
            self.reconnects += 1

    async def _session(self, ws: ClientConnection) -> None:
        welcome = json.loads(await ws.recv())
        self.shard = welcome.get("shard")
        reader = asyncio.create_task(self._read(ws))
        try:
            for room in list(self.rooms):
                await self._join(ws, room)
            self._ws = ws
            for request_id, (room, content) in list(self._unsent.items()):
                await self._send_publish(ws, request_id, room, content)
            self._connected.set()
            await reader
        finally:
            reader.cancel()

    async def _join(self, ws: ClientConnection, room: str) -> None:
        request: dict[str, Any] = {"type": "join", "room": room}
        if room in self.last_seq and room in self.epochs:
            request["since"] = self.last_seq[room]
            request["epoch"] = self.epochs[room]
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._joined[room] = future
        await ws.send(json.dumps(request))
        await future

    async def _send_publish(
        self, ws: ClientConnection, request_id: str, room: str, content: str
    ) -> None:
        await ws.send(
            json.dumps({"type": "message", "room": room, "content": content, "id": request_id})
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
            elif kind == "error":
                future = self._acks.get(frame.get("id", ""))
                if future is not None and not future.done():
                    future.set_exception(ChatError(frame["code"], frame["reason"]))

    def _on_joined(self, frame: dict[str, Any]) -> None:
        # Handled here, before the replay that follows it is read.
        room = frame["room"]
        epoch = frame["epoch"]
        if "recovered" in frame and not frame["recovered"]:
            self.gaps += 1
            log.warning("shardchat client: room %s lost messages while disconnected", room)
        if room not in self.epochs:
            self.last_seq.setdefault(room, frame["seq"])  # live from here
        elif epoch != self.epochs[room]:
            self.last_seq[room] = 0  # a new run of the room's sequence: take it all
        self.epochs[room] = epoch
        joined = self._joined.pop(room, None)
        if joined is not None and not joined.done():
            joined.set_result(frame)

    def _on_message(self, ws: ClientConnection, frame: dict[str, Any]) -> None:
        room = frame["room"]
        seq = frame["seq"]
        last = self.last_seq.get(room, 0)
        if seq > last:
            # Anything at or below `last` is a resend or a replay overlap: a duplicate.
            self.last_seq[room] = seq
            self._queue.put_nowait(
                Message(
                    room, seq, frame["sender"], frame["content"], frame["timestamp"], frame["id"]
                )
            )
        # Ack (cumulatively) what we hold, duplicates included (a resend means the
        # server missed our ack), once per ack_delay.
        self._ack_due[room] = self.last_seq.get(room, seq)
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
        with contextlib.suppress(ConnectionClosed):
            await ws.send(json.dumps({"type": "ack", "room": room, "seq": seq}))
