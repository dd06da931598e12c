"""What the room engine hands its caller: frames for connections, and closes.

The engine's output is a list of ``(connections, item)`` pairs, in order: the
caller writes ``item`` (a ready WebSocket frame, or several joined) to each of
``connections``, sends a :class:`Paced` replay as fast as the client reads it,
or closes them when ``item`` is a :class:`Close`.
Connections are the caller's own handles; the engine only keeps them as keys.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from typing import NamedTuple, TypeVar

__all__ = ["C", "Close", "Output", "Paced"]

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


Output = tuple[Iterable[C], bytes | Close | Paced]
