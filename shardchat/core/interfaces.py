"""The small interfaces the pure core is handed: hooks, an event log, peer counts.

The core imports nothing outside ``shardchat.core`` and ``shardchat.ring``
(tests/core/test_layering.py checks it): what it needs from the process
around it comes in as one of these, implemented outside the core by an
adapter (``shardchat.hooks.Hooks``, ``shardchat.logs.EventLogger``,
``shardchat.addrtable.PeerTable``); counters come in as
:class:`~shardchat.core.counters.Counters`. Tests hand in plain objects.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

__all__ = [
    "DEBUG",
    "ERROR",
    "INFO",
    "NO_LOG",
    "WARNING",
    "ConnInfo",
    "ConnectInfo",
    "EventLog",
    "HookRunner",
    "NoLog",
    "PeerCounts",
]

# Levels of EventLog.event: the numbers of the standard library's logging levels,
# so that an adapter passes them through unchanged.
DEBUG = 10
INFO = 20
WARNING = 30
ERROR = 40


class EventLog(Protocol):
    """Structured log lines: a stable event name and its fields."""

    def enabled(self, level: int) -> bool:
        """Whether a line at ``level`` would be written (to skip building it)."""

    def event(self, level: int, name: str, **fields: object) -> None:
        """One line: ``name`` (a stable event to filter on) and ``fields``."""


class NoLog:
    """An :class:`EventLog` that writes nothing (the default of tests)."""

    def enabled(self, level: int) -> bool:
        return False

    def event(self, level: int, name: str, **fields: object) -> None:
        pass


NO_LOG = NoLog()


@dataclass(frozen=True, slots=True)
class ConnectInfo:
    """A connection asking to upgrade, as hooks see it."""

    shard: int
    peer: str  # the client's IP address
    user: str  # the user it will be (token subject, user parameter or guest name)
    path: str  # the request path with its query
    headers: Mapping[str, str]
    rooms: tuple[str, ...]  # rooms it asks to join at connect


@dataclass(frozen=True, slots=True)
class ConnInfo:
    """An open connection, as hooks see it."""

    shard: int
    conn: int  # connection id, unique within the shard
    user: str
    peer: str


class HookRunner(Protocol):
    """The loaded lifecycle hooks, each called through a guard that counts its
    failures in ``errors`` (the engine moves them into its counters).

    ``guest_name`` names a user who gave no name: admission takes it from here
    instead of drawing random numbers itself. ``on_message`` returns the content
    to publish, or raises :class:`~shardchat.core.errors.Reject`."""

    app: object | None
    errors: int
    has_connect: bool
    has_open: bool
    has_message: bool
    has_close: bool
    guest_name: Callable[[], str]

    def on_connect(self, info: ConnectInfo) -> str | None: ...

    def on_open(self, info: ConnInfo) -> None: ...

    def on_message(self, info: ConnInfo, room: str, content: str) -> str: ...

    def on_close(self, info: ConnInfo, code: int, reason: str) -> None: ...


class PeerCounts(Protocol):
    """Open connections per client address over the whole server (for
    ``server.max_per_ip``)."""

    def total(self, peer: str) -> int:
        """Connections from ``peer`` on every shard."""

    def add(self, peer: str) -> bool:
        """One more here; False when the table had no room to count it."""

    def remove(self, peer: str) -> None:
        """One fewer here."""
