"""What the broker tells the engine, queued: applied by the engine, never nested.

A broker hears records, answers and acks while it runs (a ring read, a Redis
reply, the sequencing of a publish on the room's owner). It hands them to
the engine's :class:`Inbox`, its :class:`~shardchat.core.broker.BrokerListener`,
which only queues them; the engine applies the queue at its next input
(``RoomEngine.deliver()``, or the start of any other input), in the order
the broker gave them. So a broker call never runs engine code on its stack,
and an engine input never runs inside a broker call.

The answers a broker gives through a callback (``presence``, ``open_room``,
a gap fill's waiters) are queued the same way: :meth:`Inbox.later` makes the
callback.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

from shardchat.core.broker import BrokerListener
from shardchat.core.roomlog import HeldMessage

__all__ = ["Inbox"]


class Inbox:
    """A :class:`BrokerListener` that queues every call for ``target`` (the
    engine's handlers); :meth:`held`, a read, is answered at once."""

    __slots__ = (
        "_on_message",
        "_on_peer_reset",
        "_on_presence_event",
        "_on_publish_failed",
        "_on_published",
        "_on_replay",
        "_on_replay_end",
        "_on_replay_lost",
        "_on_resync",
        "_on_room_state",
        "_restore",
        "message_handler",
        "published_handler",
        "queue",
        "target",
    )

    def __init__(self, target: BrokerListener) -> None:
        self.target = target
        self.queue: deque[tuple[Callable[..., None], tuple[Any, ...]]] = deque()
        # Bound once: on_message runs once per message per shard.
        self._on_message = target.on_message
        self._on_published = target.on_published
        self._on_publish_failed = target.on_publish_failed
        self._on_presence_event = target.on_presence_event
        self._on_peer_reset = target.on_peer_reset
        self._on_replay = target.on_replay
        self._on_replay_lost = target.on_replay_lost
        self._on_replay_end = target.on_replay_end
        self._on_resync = target.on_resync
        self._on_room_state = target.on_room_state
        self._restore = target.restore
        # What the queue holds for a message and an ack, by identity: the engine's
        # loop (RoomEngine._apply_inbox) handles their common cases inline.
        self.message_handler: object = self._on_message
        self.published_handler: object = self._on_published

    def __bool__(self) -> bool:
        return bool(self.queue)

    def apply(self) -> None:
        """Run what was queued, in order, and what that queues in turn. Re-entered
        (a handler that catches the broker up applies what it delivered) it
        goes on with the same queue: each item runs once, in order."""
        queue = self.queue
        pop = queue.popleft
        while queue:
            fn, args = pop()
            fn(*args)

    def later(self, fn: Callable[..., None], *args: Any) -> Callable[..., None]:
        """A callback for the broker: called with ``more`` arguments, it queues
        ``fn(*args, *more)``."""
        append = self.queue.append

        def queued(*more: Any) -> None:
            append((fn, args + more))

        return queued

    # BrokerListener

    def on_message(self, room: str, seq: int, msg_id: str, json: bytes, publish_ns: int) -> None:
        self.queue.append((self._on_message, (room, seq, msg_id, json, publish_ns)))

    def on_published(self, msg_id: str, room: str, seq: int) -> None:
        self.queue.append((self._on_published, (msg_id, room, seq)))

    def on_publish_failed(self, msg_id: str, room: str) -> None:
        self.queue.append((self._on_publish_failed, (msg_id, room)))

    def on_presence_event(self, room: str, user: str, joined: bool, count: int) -> None:
        self.queue.append((self._on_presence_event, (room, user, joined, count)))

    def on_peer_reset(self, peer: int) -> None:
        self.queue.append((self._on_peer_reset, (peer,)))

    def on_replay(self, room: str, seq: int, json: bytes) -> None:
        self.queue.append((self._on_replay, (room, seq, json)))

    def on_replay_lost(self, room: str, last: int) -> None:
        self.queue.append((self._on_replay_lost, (room, last)))

    def on_replay_end(self, room: str, last: int) -> None:
        self.queue.append((self._on_replay_end, (room, last)))

    def on_resync(self, latest: Callable[[str], int | None]) -> None:
        self.queue.append((self._on_resync, (latest,)))

    def on_room_state(self, room: str, epoch: str, seq: int) -> None:
        self.queue.append((self._on_room_state, (room, epoch, seq)))

    def restore(self, room: str, seq: int, json: bytes | None) -> None:
        self.queue.append((self._restore, (room, seq, json)))

    def held(self, room: str, first: int) -> list[HeldMessage]:
        return self.target.held(room, first)
