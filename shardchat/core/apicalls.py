"""The server API's calls: a request body in, a checked call out; pure.

``POST /api/<method>`` with a JSON object (docs/api.yaml). Method and field
names follow Centrifugo's HTTP API, with ``room`` where it says ``channel``.
Every refusal raises one :class:`~shardchat.core.errors.ApiError` subclass
whose message names the field; nothing else is raised. What the calls do is
the shard's business (:mod:`shardchat.shard.apiserver`).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any

import orjson

from shardchat.core.errors import ApiBadJson, ApiBadRequest, ApiError, ApiNotFound
from shardchat.core.wire import MAX_ID, MAX_SEQ, NAME_RE

__all__ = [
    "CALLS",
    "METHODS",
    "Batch",
    "Broadcast",
    "Call",
    "Disconnect",
    "History",
    "Info",
    "Presence",
    "PresenceStats",
    "Publish",
    "Rooms",
    "Subscribe",
    "Unsubscribe",
    "error_body",
    "error_object",
    "matches",
    "parse",
    "result_body",
]

MAX_BATCH = 1000  # commands in one batch
MAX_BROADCAST = 1000  # rooms of one broadcast
MAX_ROOMS_PAGE = 1000  # rooms answered per page
DEFAULT_HISTORY = 100  # messages of a history page when no limit is given
MAX_REASON = 120  # bytes of a disconnect reason (a close frame holds 123)


@dataclass(frozen=True, slots=True)
class Publish:
    room: str
    content: str
    sender: str
    key: str | None  # idempotency: one message per (sender, room, key) for 600 s


@dataclass(frozen=True, slots=True)
class Broadcast:
    rooms: tuple[str, ...]
    content: str
    sender: str
    key: str | None


@dataclass(frozen=True, slots=True)
class Disconnect:
    user: str
    reconnect: bool  # False: close 4403 (do not reconnect); True: 4400
    reason: str


@dataclass(frozen=True, slots=True)
class Subscribe:
    user: str
    room: str


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    user: str
    room: str


@dataclass(frozen=True, slots=True)
class Presence:
    room: str


@dataclass(frozen=True, slots=True)
class PresenceStats:
    room: str


@dataclass(frozen=True, slots=True)
class History:
    room: str
    limit: int
    since: int | None
    before: int | None


@dataclass(frozen=True, slots=True)
class Rooms:
    pattern: str | None  # a glob over room names (fnmatch); None: every room
    limit: int
    cursor: str | None  # the last room of the previous page


@dataclass(frozen=True, slots=True)
class Info:
    pass


@dataclass(frozen=True, slots=True)
class Batch:
    commands: tuple[tuple[str, Call | ApiError], ...]  # (method, call or its refusal)


Call = (
    Publish
    | Broadcast
    | Disconnect
    | Subscribe
    | Unsubscribe
    | Presence
    | PresenceStats
    | History
    | Rooms
    | Info
    | Batch
)


class _Fields:
    """One request object's fields, each checked with a message naming it."""

    def __init__(self, obj: dict[str, Any], where: str) -> None:
        self.obj = obj
        self.where = where  # "" or "commands[3]." for a batch's command

    def fail(self, name: str, what: str) -> ApiBadRequest:
        return ApiBadRequest(f"{self.where}{name} {what}")

    def name(self, key: str, *, required: bool = True, default: str | None = None) -> str:
        value = self.obj.get(key)
        if value is None:
            if required:
                raise self.fail(key, "is required")
            assert default is not None
            return default
        if not isinstance(value, str) or NAME_RE.fullmatch(value) is None:
            raise self.fail(key, "must be 1-64 characters of [A-Za-z0-9_.:-]")
        return value

    def text(self, key: str, limit: int) -> str:
        value = self.obj.get(key)
        if value is None:
            raise self.fail(key, "is required")
        if not isinstance(value, str):
            raise self.fail(key, "must be a string")
        if len(value) * 4 > limit and len(value.encode()) > limit:
            raise self.fail(key, f"is over {limit} bytes")
        return value

    def key(self) -> str | None:
        value = self.obj.get("key")
        if value is None:
            return None
        if not isinstance(value, str) or NAME_RE.fullmatch(value) is None or len(value) > MAX_ID:
            raise self.fail("key", "must be 1-64 characters of [A-Za-z0-9_.:-]")
        return value

    def seq(self, key: str, low: int = 0, high: int = MAX_SEQ) -> int | None:
        value = self.obj.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise self.fail(key, f"must be an integer from {low} to {high}")
        return value

    def flag(self, key: str) -> bool:
        value = self.obj.get(key, False)
        if not isinstance(value, bool):
            raise self.fail(key, "must be true or false")
        return value

    def only(self, *known: str) -> None:
        unknown = sorted(set(self.obj) - set(known))
        if unknown:
            raise self.fail(unknown[0][:64], "is not a field of this method")


def _publish(f: _Fields, limits: Limits) -> Call:
    f.only("room", "content", "sender", "key")
    return Publish(
        f.name("room"),
        f.text("content", limits.max_content),
        f.name("sender", required=False, default=limits.sender),
        f.key(),
    )


def _broadcast(f: _Fields, limits: Limits) -> Call:
    f.only("rooms", "content", "sender", "key")
    rooms = f.obj.get("rooms")
    if rooms is None:
        raise f.fail("rooms", "is required")
    if not isinstance(rooms, list) or not 1 <= len(rooms) <= MAX_BROADCAST:
        raise f.fail("rooms", f"must be a list of 1-{MAX_BROADCAST} room names")
    for i, room in enumerate(rooms):
        if not isinstance(room, str) or NAME_RE.fullmatch(room) is None:
            raise f.fail(f"rooms[{i}]", "must be 1-64 characters of [A-Za-z0-9_.:-]")
    if len(set(rooms)) != len(rooms):
        raise f.fail("rooms", "must not name a room twice")
    return Broadcast(
        tuple(rooms),
        f.text("content", limits.max_content),
        f.name("sender", required=False, default=limits.sender),
        f.key(),
    )


def _disconnect(f: _Fields, limits: Limits) -> Call:
    f.only("user", "reconnect", "reason")
    reason = f.obj.get("reason", "disconnected by the server")
    if not isinstance(reason, str) or len(reason.encode()) > MAX_REASON:
        raise f.fail("reason", f"must be a string of at most {MAX_REASON} bytes")
    return Disconnect(f.name("user"), f.flag("reconnect"), reason)


def _subscribe(f: _Fields, limits: Limits) -> Call:
    f.only("user", "room")
    return Subscribe(f.name("user"), f.name("room"))


def _unsubscribe(f: _Fields, limits: Limits) -> Call:
    f.only("user", "room")
    return Unsubscribe(f.name("user"), f.name("room"))


def _presence(f: _Fields, limits: Limits) -> Call:
    f.only("room")
    return Presence(f.name("room"))


def _presence_stats(f: _Fields, limits: Limits) -> Call:
    f.only("room")
    return PresenceStats(f.name("room"))


def _history(f: _Fields, limits: Limits) -> Call:
    f.only("room", "limit", "since", "before")
    limit = f.seq("limit", 0, limits.history)
    return History(
        f.name("room"),
        min(DEFAULT_HISTORY, limits.history) if limit is None else limit,
        f.seq("since"),
        f.seq("before"),
    )


def _rooms(f: _Fields, limits: Limits) -> Call:
    f.only("pattern", "limit", "cursor")
    pattern = f.obj.get("pattern")
    if pattern is not None and (not isinstance(pattern, str) or not 1 <= len(pattern) <= 64):
        raise f.fail("pattern", 'must be a glob of 1-64 characters (e.g. "team.*")')
    cursor = f.obj.get("cursor")
    if cursor is not None:
        cursor = f.name("cursor")
    limit = f.seq("limit", 1, MAX_ROOMS_PAGE)
    return Rooms(pattern, MAX_ROOMS_PAGE if limit is None else limit, cursor)


def _info(f: _Fields, limits: Limits) -> Call:
    f.only()
    return Info()


def _batch(f: _Fields, limits: Limits) -> Call:
    f.only("commands")
    commands = f.obj.get("commands")
    if not isinstance(commands, list) or not 1 <= len(commands) <= MAX_BATCH:
        raise f.fail("commands", f"must be a list of 1-{MAX_BATCH} commands")
    parsed: list[tuple[str, Call | ApiError]] = []
    for i, command in enumerate(commands):
        where = f"commands[{i}]"
        if not isinstance(command, dict):
            raise f.fail(where, 'must be an object {"method": ..., "params": {...}}')
        method = command.get("method")
        params = command.get("params", {})
        if not isinstance(method, str) or method not in CALLS or method == "batch":
            raise f.fail(f"{where}.method", "must be a method other than batch")
        if not isinstance(params, dict):
            raise f.fail(f"{where}.params", "must be an object")
        try:
            parsed.append((method, CALLS[method](_Fields(params, f"{where}.params."), limits)))
        except ApiError as exc:
            parsed.append((method, exc))  # answered in its place; the others still run
    return Batch(tuple(parsed))


@dataclass(frozen=True, slots=True)
class Limits:
    """The configuration the checks need."""

    max_content: int
    history: int
    sender: str


CALLS = {
    "publish": _publish,
    "broadcast": _broadcast,
    "disconnect": _disconnect,
    "subscribe": _subscribe,
    "unsubscribe": _unsubscribe,
    "presence": _presence,
    "presence_stats": _presence_stats,
    "history": _history,
    "rooms": _rooms,
    "info": _info,
    "batch": _batch,
}
METHODS = tuple(CALLS)


def parse(method: str, body: bytes, limits: Limits) -> Call:
    """The call ``method`` with ``body`` asks for.

    Raises:
        ApiNotFound: no such method.
        ApiBadJson: the body is not JSON (an empty body is ``{}``).
        ApiBadRequest: not an object, or a field missing or wrong (named).
    """
    check = CALLS.get(method)
    if check is None:
        raise ApiNotFound(f"no such method: {method[:64]!r}")
    try:
        obj = orjson.loads(body) if body.strip() else {}
    except orjson.JSONDecodeError as exc:
        raise ApiBadJson(f"malformed JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ApiBadRequest("the body must be a JSON object")
    return check(_Fields(obj, ""), limits)


def matches(pattern: str | None, room: str) -> bool:
    """``rooms``' glob: fnmatch's ``*``, ``?`` and ``[...]``, case-sensitive."""
    return pattern is None or fnmatch.fnmatchcase(room, pattern)


def result_body(result: object) -> bytes:
    return orjson.dumps({"result": result})


def error_object(exc: ApiError) -> dict[str, object]:
    """An error's ``{"code", "message"}`` (and ``retry_after`` when it has one)."""
    error: dict[str, object] = {"code": exc.code, "message": exc.message}
    if exc.retry_after is not None:
        error["retry_after"] = exc.retry_after
    return error


def error_body(exc: ApiError) -> bytes:
    return orjson.dumps({"error": error_object(exc)})
