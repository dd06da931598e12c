"""The one error hierarchy of shardchat.

::

    ShardchatError
    ├── ConfigError        a setting is unknown, of the wrong type or out of range
    ├── ProtocolError      a client request PROTOCOL.md refuses (carries an ErrorCode)
    ├── AuthError          a token that is missing, malformed, expired or badly signed
    ├── HookError          the --app object cannot be loaded
    ├── BackendError       the application's backend (proxy, webhooks) did not answer
    ├── AnswerError        an HTTP answer not HTTP, too large or cut short (httpanswer.py)
    │   └── AnswerGone         the connection closed before any byte of an answer
    ├── RingError          the shared-memory ring refused an operation
    │   ├── MessageTooLarge    a record larger than the ring allows
    │   ├── RingLayoutError    a segment whose header is not a shardchat ring
    │   └── SeqTableError      a seq table too small, or a room name it cannot hold
    ├── SequenceError      a room's messages out of seq order (a bug, never a client's doing)
    ├── ShardError         a shard or the supervisor cannot run (e.g. port in use)
    ├── StorageError       the room store cannot be used (storage.dir locked or unwritable)
    ├── ApiError           a server API call refused (code, HTTP status, message)
    │   ├── ApiBadJson         400 bad_json: the body is not a JSON object
    │   ├── ApiBadRequest      400 bad_request: a missing or wrong field (named)
    │   ├── ApiUnauthorized    401 unauthorized: a missing or wrong API key
    │   ├── ApiNotFound        404 not_found: no such method (or the API is off)
    │   ├── ApiMethodNotAllowed 405 method_not_allowed: not a POST
    │   ├── ApiTooLarge        413 too_large: a body over limits.max_frame
    │   ├── ApiRoomFull        409 room_full: subscribe into a full room
    │   ├── ApiUnavailable     503 unavailable: the broker or a shard did not answer
    │   └── ApiOverloaded      503 overloaded: a bounded queue is full (retry_after)
    ├── ClientError        ChatClient cannot go on
    │   ├── Refused            the upgrade was refused for good (HTTP 4xx)
    │   ├── ChatError          a request was refused (an ``error`` frame)
    │   ├── Closed             a close a reconnect would not mend, or close()
    │   └── Unavailable        not reachable within the timeout / attempts
    └── Reject             raised by an on_message hook to refuse a message

Only ``cli.py`` turns these into exit codes; a shard that meets a
``RingError`` or ``ShardError`` while it boots exits with its boot-failure
code, and the supervisor stops instead of restarting it for ever.
"""

from __future__ import annotations

import enum

__all__ = [
    "API_ERRORS",
    "ApiBadJson",
    "ApiBadRequest",
    "ApiError",
    "ApiMethodNotAllowed",
    "ApiNotFound",
    "ApiOverloaded",
    "ApiRoomFull",
    "ApiTooLarge",
    "ApiUnauthorized",
    "ApiUnavailable",
    "AnswerError",
    "AnswerGone",
    "AuthError",
    "BackendError",
    "ErrorCode",
    "ChatError",
    "ClientError",
    "Closed",
    "ConfigError",
    "HookError",
    "MessageTooLarge",
    "ProtocolError",
    "Reject",
    "Refused",
    "RingError",
    "RingLayoutError",
    "SeqTableError",
    "SequenceError",
    "ShardError",
    "ShardchatError",
    "StorageError",
    "Unavailable",
]


class ErrorCode(enum.StrEnum):
    """Every ``code`` of an ``error`` frame (PROTOCOL.md, Errors, and its extensions).

    The one list: the decoder, the engine, the metrics (one counter per code)
    and the tests all use these members.
    """

    BAD_JSON = "bad_json"
    BAD_REQUEST = "bad_request"
    UNKNOWN_TYPE = "unknown_type"
    TOO_LARGE = "too_large"
    NOT_MEMBER = "not_member"
    RATE_LIMITED = "rate_limited"
    UNAUTHORIZED = "unauthorized"
    ROOM_FULL = "room_full"
    UNAVAILABLE = "unavailable"
    REJECTED = "rejected"
    OVERLOADED = "overloaded"  # a bounded queue is full: not sequenced, retry after retry_after

    @property
    def malformed(self) -> bool:
        """A broken client's error: ``limits.max_errors`` of them in a row close it
        with 1008. Refusals by policy (rate, room size, token, hook, an owner that
        does not answer) are not: the client did nothing wrong."""
        return self in _MALFORMED


_MALFORMED = frozenset(
    {
        ErrorCode.BAD_JSON,
        ErrorCode.BAD_REQUEST,
        ErrorCode.UNKNOWN_TYPE,
        ErrorCode.TOO_LARGE,
        ErrorCode.NOT_MEMBER,
    }
)


class ShardchatError(Exception):
    """Base class of every error shardchat raises on purpose."""


class ConfigError(ShardchatError):
    """A configuration value is wrong; the message names the key and what is allowed."""

    def __init__(self, key: str, value: object, allowed: str, source: str | None = None) -> None:
        self.key = key
        self.value = value
        self.allowed = allowed
        self.source = source  # where the user set it, when not a file or flag: an env variable
        where = key if source is None else f"{source} ({key})"
        super().__init__(f"config: {where} = {value!r}: {allowed}")


class ProtocolError(ShardchatError):
    """A client request that PROTOCOL.md refuses with an ``error`` frame.

    ``code`` is one of PROTOCOL.md's error codes; ``request_id`` is the
    client's ``id`` when the request carried a usable one, so the error can
    echo it; ``retry_after`` (seconds) goes in the frame when set (``overloaded``).
    """

    def __init__(
        self,
        code: ErrorCode,
        reason: str,
        request_id: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        self.code = code
        self.reason = reason
        self.request_id = request_id
        self.retry_after = retry_after
        super().__init__(f"{code}: {reason}")


class AuthError(ShardchatError):
    """A connection's token is not valid; the message is the reason (HTTP 401)."""


class HookError(ShardchatError):
    """The lifecycle hooks named by ``--app`` cannot be loaded."""


class BackendError(ShardchatError):
    """The application's backend (connect or publish proxy, webhook receiver) did not
    answer in time, or not in HTTP; the message is a short reason for logs and clients."""


class AnswerError(ShardchatError):
    """An HTTP answer that cannot be read: not HTTP, a body over its limit, or the
    stream cut short (:mod:`shardchat.httpanswer`); the message is a short reason."""


class AnswerGone(AnswerError):
    """The connection closed before any byte of an answer: a kept-alive connection
    the peer closed while idle, so the request may be sent again on a new one."""


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


class SeqTableError(RingError):
    """A seq table's buffer is too small, or a room name too long for a slot."""


class SequenceError(ShardchatError):
    """A message handed to a room's log does not follow its last seq."""


class ShardError(ShardchatError):
    """The server cannot run: the port is taken, a shard cannot boot, ..."""


class StorageError(ShardchatError):
    """The room store cannot be used: another server holds ``storage.dir``, or it
    cannot be created or written."""


# Every API error code and its class (each subclass of ApiError adds itself).
API_ERRORS: dict[str, type[ApiError]] = {}


class ApiError(ShardchatError):
    """A server API call refused: ``{"error": {"code": code, "message": message}}``
    with the HTTP ``status`` (docs/api.yaml). Raised by the server's checks and,
    with the same class per code, by the Python client (:mod:`shardchat.api`)."""

    code = "internal"
    status = 500

    def __init_subclass__(cls, code: str, status: int) -> None:
        cls.code, cls.status = code, status
        API_ERRORS[code] = cls  # in the order of definition: the API's error counters'

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        self.message = message
        self.retry_after = retry_after  # seconds, for overloaded
        super().__init__(f"{self.code}: {message}")


class ApiBadJson(ApiError, code="bad_json", status=400):
    """The body is not a JSON object."""


class ApiBadRequest(ApiError, code="bad_request", status=400):
    """A field is missing or wrong; the message names it."""


class ApiUnauthorized(ApiError, code="unauthorized", status=401):
    """The API key is missing or wrong."""


class ApiNotFound(ApiError, code="not_found", status=404):
    """No such method, or the API is off."""


class ApiMethodNotAllowed(ApiError, code="method_not_allowed", status=405):
    """Not a POST."""


class ApiTooLarge(ApiError, code="too_large", status=413):
    """A body over ``limits.max_frame``."""


class ApiRoomFull(ApiError, code="room_full", status=409):
    """A subscribe into a room that is full."""


class ApiUnavailable(ApiError, code="unavailable", status=503):
    """The broker or a shard did not answer."""


class ApiOverloaded(ApiError, code="overloaded", status=503):
    """A bounded queue is full; ``retry_after`` says when to try again."""


class ClientError(ShardchatError):
    """:class:`~shardchat.client.ChatClient` cannot go on; the subclass says why."""


class Refused(ClientError):
    """The server refused the WebSocket upgrade for good (an HTTP 4xx other than
    408/429: a bad user or room name 400, a missing or bad token 401, a refused
    origin or a hook's refusal 403). ``status`` is the HTTP status, ``reason``
    the server's text."""

    def __init__(self, status: int, reason: str) -> None:
        self.status = status
        self.reason = reason
        super().__init__(f"refused: HTTP {status}: {reason}")


class ChatError(ClientError):
    """The server refused a request with an ``error`` frame (a ``join`` refused as
    ``unauthorized`` or ``room_full``, a ``send`` refused as ``rate_limited`` ...);
    ``code`` is the protocol's error code, ``reason`` the server's text;
    ``retry_after`` the seconds to wait before sending again (``overloaded``)."""

    def __init__(self, code: str, reason: str, retry_after: float | None = None) -> None:
        self.code = code
        self.reason = reason
        self.retry_after = retry_after
        super().__init__(f"{code}: {reason}")


class Closed(ClientError):
    """The connection ended in a way a reconnect would not mend: the server
    closed it with a code that says the client broke the protocol (1002, 1003,
    1007, 1008, 1009, 1010), the server API disconnected the user for good (4403),
    or the client itself was closed (``code`` 1000)."""

    def __init__(self, code: int, reason: str) -> None:
        self.code = code
        self.reason = reason
        super().__init__(f"closed: {code}" + (f" {reason}" if reason else ""))


class Unavailable(ClientError):
    """The server could not be reached within the client's ``timeout`` or
    ``attempts`` (connection refused, HTTP 503, dropped connections ...);
    ``last`` describes the last failure."""

    def __init__(self, attempts: int, last: str) -> None:
        self.attempts = attempts
        self.last = last
        super().__init__(f"unavailable after {attempts} attempts: {last}")


class Reject(ShardchatError):
    """Raised by an ``on_message`` hook to refuse a message with a reason for the sender."""

    def __init__(self, reason: str = "rejected") -> None:
        super().__init__(reason)
        self.reason = reason
