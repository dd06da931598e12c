"""The client's connection loop: connect, rejoin with since and epoch, resend, back off."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import random
import ssl as ssl_
from typing import Any
from urllib.parse import urlencode

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from shardchat.client.frames import FrameHandler
from shardchat.client.records import PERMANENT_CLOSES, TRANSIENT_STATUSES, ClientEvent
from shardchat.core.errors import ClientError, Closed, Refused, Unavailable

__all__ = ["SessionLoop"]

# The client's logger: these lines keep the name they always had.
log = logging.getLogger("shardchat.client.chatclient")


class SessionLoop(FrameHandler):
    """The connecting half of :class:`~shardchat.client.chatclient.ChatClient`
    (which sets these attributes in its ``__init__``)."""

    url: str
    ssl: ssl_.SSLContext | None
    user: str | None
    token: str | None
    backoff: tuple[float, float]
    timeout: float | None
    attempts: int | None
    rooms: dict[str, None]
    reconnects: int
    shard: int | None
    name: str | None
    _reader: asyncio.Task[None] | None
    _started: asyncio.Future[None] | None
    _failure: ClientError | None
    _closing: bool
    _id_prefix: str
    _ids: itertools.count[int]

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
