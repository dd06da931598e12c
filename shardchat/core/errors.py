"""The one error hierarchy of shardchat.

::

    ShardchatError
    ├── ConfigError        a setting is unknown, of the wrong type or out of range
    ├── ProtocolError      a client frame breaks PROTOCOL.md (carries the error code)
    ├── AuthError          a token that is missing, malformed, expired or badly signed
    ├── HookError          the --app object cannot be loaded
    ├── RingError          the shared-memory ring refused an operation
    │   ├── MessageTooLarge    a record larger than the ring allows
    │   └── RingLayoutError    a segment whose header is not a shardchat ring
    ├── ShardError         a shard or the supervisor cannot run (e.g. port in use)
    └── hooks.Reject       raised by an on_message hook to refuse a message

Only ``cli.py`` turns these into exit codes.
"""

from __future__ import annotations

__all__ = [
    "AuthError",
    "ConfigError",
    "HookError",
    "MessageTooLarge",
    "ProtocolError",
    "RingError",
    "RingLayoutError",
    "ShardError",
    "ShardchatError",
]


class ShardchatError(Exception):
    """Base class of every error shardchat raises on purpose."""


class ConfigError(ShardchatError):
    """A configuration value is wrong; the message names the key and what is allowed."""

    def __init__(self, key: str, value: object, allowed: str) -> None:
        self.key = key
        self.value = value
        self.allowed = allowed
        super().__init__(f"config: {key} = {value!r}: {allowed}")


class ProtocolError(ShardchatError):
    """A client request that PROTOCOL.md refuses with an ``error`` frame.

    ``code`` is one of the error codes of PROTOCOL.md (``bad_json``,
    ``bad_request``, ...); ``request_id`` is the client's ``id`` when the
    request carried a usable one, so the error can echo it.
    """

    def __init__(self, code: str, reason: str, request_id: str | None = None) -> None:
        self.code = code
        self.reason = reason
        self.request_id = request_id
        super().__init__(f"{code}: {reason}")


class AuthError(ShardchatError):
    """A connection's token is not valid; the message is the reason (HTTP 401)."""


class HookError(ShardchatError):
    """The lifecycle hooks named by ``--app`` cannot be loaded."""


class RingError(ShardchatError):
    """The shared-memory ring refused an operation."""


class MessageTooLarge(RingError):
    """A record does not fit the ring's largest record (capacity / 8)."""

    def __init__(self, size: int, limit: int) -> None:
        self.size = size
        self.limit = limit
        super().__init__(f"record of {size} bytes exceeds the ring's limit of {limit} bytes")


class RingLayoutError(RingError):
    """A segment's header does not describe a ring this code can read."""


class ShardError(ShardchatError):
    """The server cannot run: the port is taken, a shard cannot boot, ..."""
