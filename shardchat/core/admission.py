"""PROTOCOL.md's checks before a WebSocket upgrade, on plain values. Pure.

The connection adapter hands over the request as an :class:`Upgrade` (path,
query, a dict of headers, the peer's address); the engine adds what only it
knows (connections open over the server and from this address, draining, the
token verifier) and gets back either an :class:`Admitted` or a
:class:`Refusal` to answer with. The verifier (PyJWT, keys read from files
at start) and the source of guest names (random, ``HookRunner.guest_name``) are
handed in, so that this module imports neither PyJWT nor a random source.
The order of the checks is the order of PROTOCOL.md: draining (503), Origin
(403), ``user``/``room`` names (400), ``server.max_connections`` (503),
``server.max_per_ip`` (503), the token when ``auth.secret`` is set (401), the
``on_connect`` hook (403).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, NamedTuple
from urllib.parse import parse_qsl

from shardchat.core import wire
from shardchat.core.config import Config
from shardchat.core.errors import AuthError
from shardchat.core.interfaces import ConnectInfo, HookRunner

if TYPE_CHECKING:
    from shardchat.auth import Identity

Verify = Callable[[str], "Identity"]  # a token -> who it is; raises AuthError

__all__ = ["Admitted", "Refusal", "Upgrade", "Verify", "admit", "header", "token_of"]


class Upgrade(NamedTuple):
    """A WebSocket upgrade request, as plain values."""

    conn_id: int  # unique within the shard, for logs and hooks
    peer: str  # the client's IP address
    path: str  # the request target, query included
    query: str  # the query string, without "?"
    headers: Mapping[str, str]  # as sent (the names' case kept, for hooks)


class Admitted(NamedTuple):
    user: str
    allowed_rooms: frozenset[str] | None  # the token's `rooms` claim; None = any room
    rooms: tuple[str, ...]  # the rooms the query asks to join at once
    expires: float | None  # the token's exp (Unix seconds, leeway included); None: never
    info: str | None = None  # the connect proxy's ``info`` (JSON, encoded), shown in presence


class Refusal(NamedTuple):
    status: int  # HTTP status
    text: str  # the response body


def header(headers: Mapping[str, str], name: str) -> str | None:
    """A header's value, matched without regard to case (RFC 9110 5.1)."""
    name = name.lower()
    for key, value in headers.items():
        if key.lower() == name:
            return value
    return None


def token_of(params: list[tuple[str, str]], headers: Mapping[str, str]) -> str | None:
    """The request's token: ``?token=``, else ``Authorization: Bearer``."""
    token = next((v for k, v in params if k == "token"), None)
    scheme, _, credentials = (header(headers, "Authorization") or "").partition(" ")
    # RFC 7235 2.1: the auth scheme is case-insensitive.
    if token is None and scheme.lower() == "bearer":
        token = credentials.strip()
    return token or None


def admit(
    config: Config,
    hooks: HookRunner,
    shard_id: int,
    upgrade: Upgrade,
    *,
    draining: bool,
    connections: int,
    from_peer: int,
    verify: Verify | None,
    proxied: Identity | None = None,
) -> Admitted | Refusal:
    """Admit or refuse ``upgrade``.

    Args:
        connections: upgraded connections open over the whole server. Handshakes
            under way do not count: half-open ones (slow-loris) must not lock real
            clients out; the handshake deadline bounds them instead.
        from_peer: connections open over the whole server from ``upgrade.peer``.
        verify: the token verifier when ``auth`` is on, else None.
        proxied: who the connect proxy's backend said the client is; a token,
            when the request carries one and ``auth`` is on, wins over it.
    """
    server = config.server
    if draining:
        return Refusal(503, "server is shutting down\n")
    if server.origins:
        # Browsers always send Origin on a WebSocket upgrade; the allow-list guards
        # against other sites' pages (CSWSH). Clients that are not browsers send none.
        origin = header(upgrade.headers, "Origin")
        # RFC 6454 4: an origin's scheme and host compare case-insensitively.
        if origin is not None and origin.lower() not in {o.lower() for o in server.origins}:
            return Refusal(403, "origin not allowed\n")
    params = parse_qsl(upgrade.query, keep_blank_values=True)
    for key, value in params:
        if key in ("user", "room") and not wire.is_valid_name(value):
            return Refusal(400, f"{key} must be 1-64 characters of [A-Za-z0-9_.:-]\n")
    if connections >= server.max_connections:
        return Refusal(503, "server is full\n")
    if server.max_per_ip and from_peer >= server.max_per_ip:
        return Refusal(503, "too many connections from this address\n")
    allowed: frozenset[str] | None = None
    expires: float | None = None
    presence_info: str | None = None
    token = token_of(params, upgrade.headers) if verify is not None else None
    if verify is not None and (token or proxied is None):
        # A token, when sent, wins over the connect proxy's answer.
        if not token:
            return Refusal(401, "a token is required (?token= or Authorization: Bearer)\n")
        try:
            identity = verify(token)
        except AuthError as exc:
            return Refusal(401, f"{exc}\n")
        user = identity.user
        allowed = identity.rooms
        expires = identity.expires
    elif proxied is not None:
        # The connect proxy's answer (proxy.connect_url): the backend named the user.
        user = proxied.user
        allowed = proxied.rooms
        presence_info = proxied.info
    else:
        named = next((v for k, v in params if k == "user"), None)
        user = named or hooks.guest_name()
    rooms = tuple(v for k, v in params if k == "room")
    if hooks.has_connect:
        info = ConnectInfo(shard_id, upgrade.peer, user, upgrade.path, upgrade.headers, rooms)
        reason = hooks.on_connect(info)
        if reason is not None:
            return Refusal(403, f"{reason}\n")
    return Admitted(user, allowed, rooms, expires, presence_info)
