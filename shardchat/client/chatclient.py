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
import secrets
import ssl as ssl_
from collections.abc import AsyncIterator, Callable, Sequence
from types import TracebackType
from typing import Any

from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from shardchat.client.frames import _Fill
from shardchat.client.records import ACK_DELAY, ClientEvent, Message
from shardchat.client.session import SessionLoop
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


class ChatClient(SessionLoop):
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

    def _check(self) -> None:
        if self._failure is not None:
            raise self._failure
        if self._closing:
            raise Closed(1000, "client closed")
