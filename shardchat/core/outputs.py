"""What the room engine hands its caller: frames, closes, events and results.

The engine's output (``RoomEngine.take_outputs()``) is a list of
``(connections, item)`` pairs, in order. For connections the caller writes
``item`` (a ready WebSocket frame as ``bytes``, or several joined) to each of
``connections``, sends a :class:`Paced` replay as fast as the client reads
it, or closes them when ``item`` is a :class:`Close`. Connections are the
caller's own handles; the engine only keeps them as keys.

Items for no connection (``connections`` empty) go to the caller's other
sinks: an :class:`ApiResult` is the answer to a server-side call, for its
caller's token. A caller that has no sink for a kind skips it; a new kind is
a new class here, added to :data:`Item`. Other streams have their own
getters: commands for the broker (``take_commands``), webhook events
(``take_events``: :class:`shardchat.core.hookevents.HookEvent`), publishes
for the publish proxy (``take_proxied``).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from typing import NamedTuple, TypeVar

__all__ = ["ApiResult", "C", "Close", "Item", "Output", "Paced"]

C = TypeVar("C", bound=Hashable)  # the caller's connection handle


class Close(NamedTuple):
    """Close a connection with ``code``: a closing handshake, or with ``fail`` a
    failed connection (RFC 6455 7.1.7: close frame, then TCP close)."""

    code: int
    reason: str
    fail: bool = False


class Paced(NamedTuple):
    """A replay (``join`` with ``since``, ``history``): messages' JSON, framed and
    written as the client reads them, so that a long replay is not cut as a slow
    consumer (the server holds these messages anyway)."""

    payloads: list[bytes]


class ApiResult(NamedTuple):
    """The answer to a server-side call (``RoomEngine.publish_as``), for the caller's
    ``token``: ``ok`` with the room's ``seq``, or an error code and reason."""

    token: object
    ok: bool
    room: str
    seq: int = 0
    code: str = ""  # an ErrorCode's value when not ok
    reason: str = ""
    retry_after: float | None = None  # with code overloaded: when to try again


Item = bytes | Close | Paced | ApiResult
Output = tuple[Iterable[C], Item]
