"""The line between the room engine and whatever carries records between engines.

A :class:`Broker` carries one
engine's publishes, presence announcements and history requests to the
other engines and hands theirs back through the engine's
:class:`BrokerListener` methods. The engine never knows which broker it
has: the shared-memory rings of one box (:mod:`shardchat.brokers.shm`) are
one; Redis across boxes is the next.

How a room gets its order is the broker's business, not the engine's. The
engine hands over a :class:`Publication` without a seq and hears back, once,
either :meth:`BrokerListener.on_published` (with the seq it got) or
:meth:`BrokerListener.on_publish_failed` ("not known to be published"). A
publication carries its idempotency key: a broker sequences one publication
per key within ``KEY_WINDOW`` and answers a retry with the original seq, so
that retrying after a failure is safe; every sequenced message reaches
every engine, the publisher's included, through
:meth:`BrokerListener.on_message`. On one box the room's owner shard assigns
the seq (and the broker forwards publishes to it, retries and deduplicates);
a broker that sequences in a store (a Redis script that increments and
appends at once) answers the same two calls from its replies.

Pure: only types and protocols.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import IntEnum
from typing import NamedTuple, Protocol

from shardchat.core.overload import Queue
from shardchat.core.roomlog import HeldMessage

__all__ = [
    "KEY_WINDOW",
    "Broker",
    "BrokerListener",
    "Holding",
    "PresenceAnswer",
    "Publication",
    "idempotency_key",
]

KEY_WINDOW = 600.0  # seconds a broker remembers a publish's idempotency key (PROTOCOL.md)


class Holding(IntEnum):
    """Who keeps a room's recent history in memory (``Broker.holding``)."""

    EVERY = 0  # every engine keeps `delivery.history` (no store behind the broker, or Redis)
    HERE = 1  # this engine keeps the box's copy (`delivery.history_memory`); a store the rest
    ELSEWHERE = 2  # another engine of the box does: this one keeps a tail and fetches the rest


class Publication(NamedTuple):
    """A client's publish, accepted by its engine and not sequenced yet."""

    msg_id: str  # unique over the server: the engine's prefix and a counter
    room: str
    sender: str
    content: str
    timestamp: int  # ms since the Unix epoch, when the engine accepted it
    publish_ns: int  # monotonic ns at publish, for the publish-to-delivery histogram
    key: str = ""  # idempotency key (see idempotency_key); "" when the client sent no key


class PresenceAnswer(NamedTuple):
    """A room's users, as the broker's holder of the room's presence answers."""

    total: int  # the room's users
    users: list[str]  # at most the asked limit
    truncated: bool  # users is shorter than total
    has: bool  # the asking user is present already
    # PROTOCOL.md, Extensions, "Presence info": listed users' connect-proxy info
    # (JSON, encoded); None when none of them has one.
    info: dict[str, str] | None = None


def idempotency_key(user: str, room: str, client_key: str | None) -> str:
    """PROTOCOL.md, Extensions: a publish's ``key`` is deduplicated per user and
    room, for ``KEY_WINDOW``; its ``id`` never is (a request id, echoed). Names
    never hold a newline, so the triple is one unambiguous string, and a retry
    can only ever be answered with a seq of its own room."""
    return "" if client_key is None else f"{user}\n{room}\n{client_key}"


class Broker(Protocol):
    """What an engine asks of its broker. Every call returns at once; answers come
    back through the engine's :class:`BrokerListener` methods, possibly from
    inside the call (a broker that sequences here answers at once)."""

    def publish(self, publication: Publication, now: float) -> None:
        """Have ``publication`` sequenced: exactly one ``on_published`` or
        ``on_publish_failed`` follows, and ``on_message`` on every engine."""

    def full(self, room: str) -> Queue | None:
        """The bounded queue a publish to ``room`` would wait in, when it is full
        (the engine then refuses the publish ``overloaded``); None: publish it."""

    def announce(self, room: str, user: str, joined: bool, info: str | None = None) -> None:
        """``user``'s first connection on this engine joined ``room`` (``joined``),
        or its last one left; or a later connection joined with ``info`` (the
        connect proxy's, JSON): the latest join's info is the user's. Whoever
        holds the room's presence applies it and, when the user became present or
        absent, every engine hears :meth:`BrokerListener.on_presence_event` once."""

    def presence(
        self,
        room: str,
        user: str,
        limit: int,
        then: Callable[[PresenceAnswer | None], None],
    ) -> PresenceAnswer | None:
        """The room's users (at most ``limit`` listed) and whether ``user`` is one.
        Returned at once where this engine holds them; otherwise None, and
        ``then`` is called once with the answer, ordered after every
        ``on_presence_event`` it reflects and before the later ones, or with
        None when no holder answered within ``delivery.publish_timeout``."""

    def snapshot(self, peer: int, pairs: list[tuple[str, str]]) -> None:
        """Tell ``peer`` (which just reset) every (room, user) present on this engine."""

    def fill(self, room: str, first: int, last: int) -> None:
        """Resend ``room``'s messages ``first..last`` to this engine (a gap, or a
        room whose history this engine no longer holds): ``on_replay`` for each
        message still held, ``on_replay_lost`` for what is gone, then
        ``on_replay_end``."""

    def latest_seq(self, room: str) -> int | None:
        """The room's latest seq as the broker knows it now; None when never used."""

    def serves_history(self, room: str) -> bool:
        """True when this engine's copy of the room's history is the one the broker
        fills from (on one box: the room's owner), so it must never be dropped."""

    def holding(self, room: str) -> Holding:
        """How much of the room's history this engine keeps in memory: what is
        not kept here is fetched through :meth:`fill` when a reader needs it."""

    def catch_up(self) -> None:
        """Deliver everything already available before returning, so that the
        engine answers a ``join`` or ``history`` from the latest state."""

    def open_room(self, room: str, then: Callable[[], None]) -> bool:
        """A local member is joining ``room``: deliver its messages and presence
        from now on. True when the broker does so already (one box: every ring
        is read anyway); otherwise ``then`` is called once the broker is ready
        (subscribed, the room's state and held history delivered: at the
        room's first join here, or while it reloads the state after losing its
        store for a while), or has given up trying (the join then goes on with
        what is known)."""

    def close_room(self, room: str) -> None:
        """The engine's last local member of ``room`` left: its traffic may stop."""

    def epoch_of(self, room: str) -> str | None:
        """The room's epoch when the broker keeps one per room (Redis); None: the
        engine's own epoch applies."""


class BrokerListener(Protocol):
    """What a broker tells its engine (implemented by :class:`RoomEngine`)."""

    def on_message(self, room: str, seq: int, msg_id: str, json: bytes, publish_ns: int) -> None:
        """A sequenced message, in the order the broker got it (gaps are possible:
        the engine fills them)."""

    def on_published(self, msg_id: str, room: str, seq: int) -> None:
        """A publication of this engine was sequenced (and is kept) as ``seq``."""

    def on_publish_failed(self, msg_id: str, room: str) -> None:
        """A publication of this engine could not be confirmed as sequenced."""

    def on_presence_event(self, room: str, user: str, joined: bool, count: int) -> None:
        """``user`` became present in ``room`` (``joined``) or absent; ``count``: the
        room's users now. Heard once per change by every engine, in one order."""

    def on_peer_reset(self, peer: int) -> None:
        """A peer engine (re)started: the broker dropped its users; tell it ours
        (:meth:`Broker.snapshot`)."""

    def on_replay(self, room: str, seq: int, json: bytes) -> None:
        """A message resent for a ``fill``."""

    def on_replay_lost(self, room: str, last: int) -> None:
        """Nothing up to ``last`` can be resent any more."""

    def on_replay_end(self, room: str, last: int) -> None:
        """One resent chunk ended at ``last``; the engine asks for more if needed."""

    def on_resync(self, latest: Callable[[str], int | None]) -> None:
        """The broker may have lost records it should have delivered, or answers to
        fills (a lapped reader, a restarted peer); ``latest(room)`` says where each
        affected room is now (0: unknown), None for a room not affected."""

    def on_room_state(self, room: str, epoch: str, seq: int) -> None:
        """The room's epoch is ``epoch`` and it reached at least ``seq`` (a broker
        that keeps a room's state in a store, after a reconnect or a new epoch):
        a log of another epoch starts again, a log behind is filled."""

    def held(self, room: str, first: int) -> list[HeldMessage]:
        """The engine's held messages of ``room`` from ``first`` on (to answer a
        peer's fill)."""

    def restore(self, room: str, seq: int, json: bytes | None) -> None:
        """At start-up: the broker still holds message ``seq`` of ``room`` (or, with
        ``json`` None, only knows the room reached ``seq``)."""
