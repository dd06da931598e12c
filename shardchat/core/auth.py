"""Signed tokens (JWT, HS256) for PROTOCOL.md's auth mode. Pure: the caller passes ``now``.

Only HS256 is accepted (the ``alg`` header is checked, so ``none`` and
algorithm confusion are refused). Claims used: ``sub`` (the user name, which
must be a valid protocol name), ``exp`` and ``nbf`` (seconds, 30 s leeway),
``iss`` and ``aud`` when configured, and an optional ``rooms`` list that
limits the rooms the user may join.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from dataclasses import dataclass

import orjson

from shardchat.core.errors import AuthError
from shardchat.core.wire import is_valid_name

__all__ = ["LEEWAY", "Identity", "make_token", "verify_token"]

LEEWAY = 30.0


@dataclass(frozen=True, slots=True)
class Identity:
    user: str
    rooms: frozenset[str] | None  # None: any room


def _b64decode(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def verify_token(
    token: str, secret: str, now: float, issuer: str = "", audience: str = ""
) -> Identity:
    """Check a token's signature and claims.

    Raises:
        AuthError: with the reason, for any token that is not valid now.
    """
    parts = token.split(".")
    if len(parts) != 3:
        raise AuthError("malformed token")
    try:
        header = orjson.loads(_b64decode(parts[0]))
        signature = _b64decode(parts[2])
        claims = orjson.loads(_b64decode(parts[1]))
    except (ValueError, orjson.JSONDecodeError):
        raise AuthError("malformed token") from None
    if not isinstance(header, dict) or header.get("alg") != "HS256":
        raise AuthError("token algorithm must be HS256")
    expected = hmac.new(secret.encode(), f"{parts[0]}.{parts[1]}".encode(), hashlib.sha256).digest()
    if not hmac.compare_digest(signature, expected):
        raise AuthError("bad token signature")
    if not isinstance(claims, dict):
        raise AuthError("malformed token claims")
    exp = claims.get("exp")
    if exp is not None and (not isinstance(exp, int | float) or now > exp + LEEWAY):
        raise AuthError("token expired")
    nbf = claims.get("nbf")
    if nbf is not None and (not isinstance(nbf, int | float) or now < nbf - LEEWAY):
        raise AuthError("token not valid yet")
    if issuer and claims.get("iss") != issuer:
        raise AuthError("wrong token issuer")
    if audience:
        aud = claims.get("aud")
        if aud != audience and not (isinstance(aud, list) and audience in aud):
            raise AuthError("wrong token audience")
    user = claims.get("sub")
    if not is_valid_name(user):
        raise AuthError("token sub must be 1-64 characters of [A-Za-z0-9_.:-]")
    assert isinstance(user, str)
    rooms = claims.get("rooms")
    if rooms is not None:
        if not isinstance(rooms, list) or not all(isinstance(r, str) for r in rooms):
            raise AuthError("token rooms must be a list of room names")
        return Identity(user, frozenset(rooms))
    return Identity(user, None)


def make_token(secret: str, claims: dict[str, object]) -> str:
    """Sign ``claims`` with HS256 (for tests, tools and the terminal client)."""
    header = _b64encode(orjson.dumps({"alg": "HS256", "typ": "JWT"}))
    body = _b64encode(orjson.dumps(claims))
    signature = hmac.new(secret.encode(), f"{header}.{body}".encode(), hashlib.sha256).digest()
    return f"{header}.{body}.{_b64encode(signature)}"
