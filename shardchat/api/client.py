"""The server API's Python client, sync and asyncio, over one keep-alive connection.

::

    from shardchat.api import ApiClient
    api = ApiClient("http://127.0.0.1:8080", key)
    api.publish("lobby", "deploy at 5")          # {"seq": 7, "epoch": "..."}
    api.disconnect("mallory")                     # closed 4403 on every shard

A refusal raises the :class:`~shardchat.core.errors.ApiError` subclass of its
code (``ApiBadRequest``, ``ApiUnauthorized``, ``ApiRoomFull`` ...). HTTP is
h11's, as on the server; a connection the server closed is opened again once.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Mapping, Sequence
from typing import Any, cast
from urllib.parse import urlsplit

import h11
import orjson

from shardchat.api.types import (
    BroadcastReply,
    HistoryResult,
    InfoResult,
    PresenceResult,
    PresenceStatsResult,
    PublishResult,
    RoomsResult,
)
from shardchat.core.errors import API_ERRORS, ApiError
from shardchat.httpanswer import Answer, AnswerError, AnswerGone, AnswerReader, post_bytes

__all__ = ["ApiClient", "AsyncApiClient", "raise_for"]

_MAX_ANSWER = 64 << 20  # bytes of an answer at most


def raise_for(status: int, body: bytes) -> Any:
    """The ``result`` of an answer; its error raised as the class of its code."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise ApiError(f"HTTP {status}: not a JSON answer: {body[:200]!r}") from None
    if status == 200 and isinstance(obj, dict) and "result" in obj:
        return obj["result"]
    error = obj.get("error") if isinstance(obj, dict) else None
    if isinstance(error, dict):
        cls = API_ERRORS.get(str(error.get("code")), ApiError)
        raise cls(str(error.get("message", "")), error.get("retry_after"))
    raise ApiError(f"HTTP {status}: {body[:200]!r}")


def batch_replies(result: Any) -> list[Any | ApiError]:
    """A batch's replies: each result, or the error of its code (not raised)."""
    out: list[Any | ApiError] = []
    for reply in result["replies"]:
        if "error" in reply:
            error = reply["error"]
            cls = API_ERRORS.get(error["code"], ApiError)
            out.append(cls(error["message"], error.get("retry_after")))
        else:
            out.append(reply["result"])
    return out


def _params(**given: Any) -> dict[str, Any]:
    """The given parameters, without the ones left out (None)."""
    return {k: v for k, v in given.items() if v is not None}


class _Connection:
    """The request bytes and the parse of one answer, shared by both clients."""

    def __init__(self, url: str, key: str, timeout: float, context: ssl.SSLContext | None) -> None:
        parts = urlsplit(url if "://" in url else "http://" + url)
        self.tls = parts.scheme == "https"
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or (443 if self.tls else 80)
        self.base = parts.path.rstrip("/")
        self.key = key
        self.timeout = timeout
        # https: the system's trust store unless given a context (a private CA).
        self.context = (context or ssl.create_default_context()) if self.tls else None
        self.authority = f"{self.host}:{self.port}"

    def request(
        self, method: str, params: Mapping[str, Any] | None
    ) -> tuple[h11.Connection, bytes]:
        conn = h11.Connection(h11.CLIENT)
        headers = [
            ("Host", self.authority),
            ("X-API-Key", self.key),
            ("Content-Type", "application/json"),
        ]
        body = orjson.dumps(dict(params or {}))
        return conn, post_bytes(conn, f"{self.base}/api/{method}", headers, body)


class ApiClient:
    """A blocking client (one connection, kept alive; not for several threads at once)."""

    def __init__(
        self, url: str, key: str, *, timeout: float = 10.0, ssl: ssl.SSLContext | None = None
    ) -> None:
        self._conn = _Connection(url, key, timeout, ssl)
        self._sock: socket.socket | None = None

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _connect(self) -> socket.socket:
        c = self._conn
        sock = socket.create_connection((c.host, c.port), timeout=c.timeout)
        if c.context is not None:
            sock = c.context.wrap_socket(sock, server_hostname=c.host)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def call(self, method: str, params: Mapping[str, Any] | None = None) -> Any:
        """POST /api/``method``; its ``result``, or its error raised."""
        conn, data = self._conn.request(method, params)
        reused = self._sock is not None
        try:
            try:
                answer = self._exchange(conn, data)
            except (ConnectionError, AnswerGone):
                if not reused:
                    raise
                self.close()  # the server closed the kept connection: once more, anew
                conn, data = self._conn.request(method, params)
                answer = self._exchange(conn, data)
        except AnswerError as exc:
            self.close()
            raise ApiError(str(exc)) from None
        if not answer.reusable:
            self.close()
        return raise_for(answer.status, answer.body)

    def _exchange(self, conn: h11.Connection, data: bytes) -> Answer:
        if self._sock is None:
            self._sock = self._connect()
        sock = self._sock
        sock.sendall(data)
        reader = AnswerReader(conn, _MAX_ANSWER)
        while (answer := reader.feed(sock.recv(65536))) is None:
            pass
        return answer

    # The methods

    def publish(
        self, room: str, content: str, *, sender: str | None = None, key: str | None = None
    ) -> PublishResult:
        params = _params(room=room, content=content, sender=sender, key=key)
        return cast(PublishResult, self.call("publish", params))

    def broadcast(
        self,
        rooms: Sequence[str],
        content: str,
        *,
        sender: str | None = None,
        key: str | None = None,
    ) -> list[BroadcastReply]:
        params = _params(rooms=list(rooms), content=content, sender=sender, key=key)
        return cast(list[BroadcastReply], self.call("broadcast", params)["replies"])

    def disconnect(self, user: str, *, reconnect: bool = False, reason: str | None = None) -> None:
        self.call("disconnect", _params(user=user, reconnect=reconnect, reason=reason))

    def subscribe(self, user: str, room: str) -> None:
        self.call("subscribe", {"user": user, "room": room})

    def unsubscribe(self, user: str, room: str) -> None:
        self.call("unsubscribe", {"user": user, "room": room})

    def presence(self, room: str) -> PresenceResult:
        return cast(PresenceResult, self.call("presence", {"room": room}))

    def presence_stats(self, room: str) -> PresenceStatsResult:
        return cast(PresenceStatsResult, self.call("presence_stats", {"room": room}))

    def history(
        self,
        room: str,
        *,
        limit: int | None = None,
        since: int | None = None,
        before: int | None = None,
    ) -> HistoryResult:
        params = _params(room=room, limit=limit, since=since, before=before)
        return cast(HistoryResult, self.call("history", params))

    def rooms(
        self, *, pattern: str | None = None, limit: int | None = None, cursor: str | None = None
    ) -> RoomsResult:
        params = _params(pattern=pattern, limit=limit, cursor=cursor)
        return cast(RoomsResult, self.call("rooms", params))

    def info(self) -> InfoResult:
        return cast(InfoResult, self.call("info"))

    def batch(self, commands: Sequence[tuple[str, Mapping[str, Any]]]) -> list[Any | ApiError]:
        """Several calls in one request, answered in order: each reply is the call's
        result, or its error (returned, not raised)."""
        params = {"commands": [{"method": m, "params": dict(p)} for m, p in commands]}
        return batch_replies(self.call("batch", params))


class AsyncApiClient:
    """The asyncio client: the same methods, awaited (one call at a time per client)."""

    def __init__(
        self, url: str, key: str, *, timeout: float = 10.0, ssl: ssl.SSLContext | None = None
    ) -> None:
        self._conn = _Connection(url, key, timeout, ssl)
        self._streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self._lock = asyncio.Lock()

    async def aclose(self) -> None:
        if self._streams is not None:
            writer = self._streams[1]
            self._streams = None
            writer.close()
            try:
                await writer.wait_closed()
            except OSError:
                pass

    async def __aenter__(self) -> AsyncApiClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def call(self, method: str, params: Mapping[str, Any] | None = None) -> Any:
        async with self._lock:
            conn, data = self._conn.request(method, params)
            reused = self._streams is not None
            timeout = self._conn.timeout
            try:
                try:
                    answer = await asyncio.wait_for(self._exchange(conn, data), timeout)
                except (ConnectionError, AnswerGone):
                    if not reused:
                        raise
                    await self.aclose()  # the server closed the kept connection
                    conn, data = self._conn.request(method, params)
                    answer = await asyncio.wait_for(self._exchange(conn, data), timeout)
            except AnswerError as exc:
                await self.aclose()
                raise ApiError(str(exc)) from None
            if not answer.reusable:
                await self.aclose()
            return raise_for(answer.status, answer.body)

    async def _exchange(self, conn: h11.Connection, data: bytes) -> Answer:
        if self._streams is None:
            c = self._conn
            self._streams = await asyncio.open_connection(c.host, c.port, ssl=c.context)
        reader, writer = self._streams
        writer.write(data)
        await writer.drain()
        answer = AnswerReader(conn, _MAX_ANSWER)
        while (whole := answer.feed(await reader.read(65536))) is None:
            pass
        return whole

    async def publish(
        self, room: str, content: str, *, sender: str | None = None, key: str | None = None
    ) -> PublishResult:
        params = _params(room=room, content=content, sender=sender, key=key)
        return cast(PublishResult, await self.call("publish", params))

    async def broadcast(
        self,
        rooms: Sequence[str],
        content: str,
        *,
        sender: str | None = None,
        key: str | None = None,
    ) -> list[BroadcastReply]:
        params = _params(rooms=list(rooms), content=content, sender=sender, key=key)
        return cast(list[BroadcastReply], (await self.call("broadcast", params))["replies"])

    async def disconnect(
        self, user: str, *, reconnect: bool = False, reason: str | None = None
    ) -> None:
        await self.call("disconnect", _params(user=user, reconnect=reconnect, reason=reason))

    async def subscribe(self, user: str, room: str) -> None:
        await self.call("subscribe", {"user": user, "room": room})

    async def unsubscribe(self, user: str, room: str) -> None:
        await self.call("unsubscribe", {"user": user, "room": room})

    async def presence(self, room: str) -> PresenceResult:
        return cast(PresenceResult, await self.call("presence", {"room": room}))

    async def presence_stats(self, room: str) -> PresenceStatsResult:
        return cast(PresenceStatsResult, await self.call("presence_stats", {"room": room}))

    async def history(
        self,
        room: str,
        *,
        limit: int | None = None,
        since: int | None = None,
        before: int | None = None,
    ) -> HistoryResult:
        params = _params(room=room, limit=limit, since=since, before=before)
        return cast(HistoryResult, await self.call("history", params))

    async def rooms(
        self, *, pattern: str | None = None, limit: int | None = None, cursor: str | None = None
    ) -> RoomsResult:
        params = _params(pattern=pattern, limit=limit, cursor=cursor)
        return cast(RoomsResult, await self.call("rooms", params))

    async def info(self) -> InfoResult:
        return cast(InfoResult, await self.call("info"))

    async def batch(
        self, commands: Sequence[tuple[str, Mapping[str, Any]]]
    ) -> list[Any | ApiError]:
        params = {"commands": [{"method": m, "params": dict(p)} for m, p in commands]}
        return batch_replies(await self.call("batch", params))
