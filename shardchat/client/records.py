"""The client's records and limits: a Message, a ClientEvent, the ack delay, the close codes."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ACK_DELAY", "PERMANENT_CLOSES", "TRANSIENT_STATUSES", "ClientEvent", "Message"]

ACK_DELAY = 0.05  # seconds between acks at most: 20 a second per connection in a busy room

# Close codes that say the client broke the protocol: reconnecting would do it again;
# and 4403: the server API disconnected this user and asks it not to come back
# (4400, disconnected with leave to reconnect, is retried like any other close).
PERMANENT_CLOSES = frozenset({1002, 1003, 1007, 1008, 1009, 1010, 4403})
# HTTP statuses at the upgrade that a later attempt may not get (4xx otherwise is final).
TRANSIENT_STATUSES = frozenset({408, 429})


@dataclass(frozen=True, slots=True)
class Message:
    room: str
    seq: int
    sender: str
    content: str
    timestamp: int
    id: str


@dataclass(frozen=True, slots=True)
class ClientEvent:
    """What happened to the connection or a room, for ``on_event``.

    ``kind`` is one of: ``connected`` (first connection), ``disconnected``
    (``detail`` says why; a retry follows in ``delay`` seconds),
    ``reconnected`` (``recovered`` is False when some messages could not be
    recovered), ``joined`` (``room``, ``users`` there now), and the presence
    events ``join`` / ``leave`` (``room``, ``user``).
    """

    kind: str
    room: str = ""
    user: str = ""
    users: tuple[str, ...] = ()
    detail: str = ""
    delay: float = 0.0
    recovered: bool | None = None
