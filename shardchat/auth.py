"""Signed tokens (JWT) for PROTOCOL.md's auth mode, verified by PyJWT.

One :class:`TokenVerifier` per shard, built from ``[auth]``: an HS256
``secret``, a PEM public key file (RS256 for an RSA key, ES256/ES384/ES512 for
an EC key by its curve), or a JWKS file (each key's ``alg``, else what its
``kty``/``crv`` imply; the token's ``kid`` picks the key). Each key accepts
exactly one algorithm, so ``none`` and algorithm confusion (an RSA public key
used as an HMAC secret) are refused. PyJWT decodes base64url strictly: a
signature with bytes appended is a bad token, not a lenient match.

Claims: ``sub`` (required; the user name, a valid protocol name), ``exp`` and
``nbf`` (with ``auth.leeway`` seconds of clock skew), ``iss`` and ``aud`` when
configured, and an optional ``rooms`` list of the rooms the user may name in
any request. ``exp`` also ends an open connection (close 4401, the hub).

Not in the pure core: it reads key files, and PyJWT imports urllib for its
JWKS client (which shardchat does not use: JWKS come from a file).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from shardchat.core.config import AuthConfig
from shardchat.core.errors import AuthError, ConfigError
from shardchat.core.wire import is_valid_name

__all__ = ["Identity", "TokenVerifier", "make_token", "verifier_from_config"]

_EC_ALGORITHMS = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
_REASONS: tuple[tuple[type[jwt.PyJWTError], str], ...] = (
    (jwt.ExpiredSignatureError, "token expired"),
    (jwt.ImmatureSignatureError, "token not valid yet"),
    (jwt.InvalidIssuerError, "wrong token issuer"),
    (jwt.InvalidAudienceError, "wrong token audience"),
    (jwt.InvalidSignatureError, "bad token signature"),
    (jwt.InvalidAlgorithmError, "token algorithm not accepted"),
    (jwt.MissingRequiredClaimError, "token has no sub claim"),
)


@dataclass(frozen=True, slots=True)
class Identity:
    user: str
    rooms: frozenset[str] | None  # None: any room
    expires: float | None = None  # the token's exp (Unix seconds); None: never
    info: str | None = None  # the connect proxy's ``info`` (a JSON object, encoded)


@dataclass(frozen=True, slots=True)
class _Key:
    kid: str | None
    key: Any  # a secret (str) or a cryptography public key
    algorithm: str


class TokenVerifier:
    """Checks tokens against the configured keys and claims."""

    def __init__(
        self, keys: list[_Key], *, issuer: str = "", audience: str = "", leeway: float = 30.0
    ) -> None:
        if not keys:
            raise AuthError("no verification key")
        self.keys = keys
        self.issuer = issuer
        self.audience = audience
        self.leeway = leeway

    @classmethod
    def from_settings(
        cls,
        *,
        secret: str = "",
        public_key_file: str = "",
        jwks_file: str = "",
        issuer: str = "",
        audience: str = "",
        leeway: float = 30.0,
    ) -> TokenVerifier | None:
        """The verifier of ``[auth]``, or None when auth is off.

        Raises:
            AuthError: a key file that cannot be read or holds no usable key.
        """
        keys: list[_Key] = []
        if secret:
            keys.append(_Key(None, secret, "HS256"))
        if public_key_file:
            keys.append(_pem_key(public_key_file))
        if jwks_file:
            keys += _jwks_keys(jwks_file)
        if not keys:
            return None
        return cls(keys, issuer=issuer, audience=audience, leeway=leeway)

    def verify(self, token: str) -> Identity:
        """Check a token's signature and claims against the wall clock.

        Raises:
            AuthError: with the reason, for any token that is not valid now.
        """
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise AuthError("malformed token") from None
        key = self._key_for(header)
        try:
            claims = jwt.decode(
                token,
                key.key,
                algorithms=[key.algorithm],
                issuer=self.issuer or None,
                audience=self.audience or None,
                leeway=self.leeway,
                options={"require": ["sub"], "verify_aud": bool(self.audience)},
            )
        except jwt.PyJWTError as exc:
            raise AuthError(_reason(exc)) from None
        user = claims.get("sub")
        if not is_valid_name(user):
            raise AuthError("token sub must be 1-64 characters of [A-Za-z0-9_.:-]")
        assert isinstance(user, str)
        exp = claims.get("exp")
        expires = float(exp) + self.leeway if isinstance(exp, int | float) else None
        rooms = claims.get("rooms")
        if rooms is None:
            return Identity(user, None, expires)
        if not isinstance(rooms, list) or not all(isinstance(r, str) for r in rooms):
            raise AuthError("token rooms must be a list of room names")
        return Identity(user, frozenset(rooms), expires)

    def _key_for(self, header: dict[str, Any]) -> _Key:
        kid = header.get("kid")
        if kid is not None:
            for key in self.keys:
                if key.kid == kid:
                    return key
            if any(key.kid is not None for key in self.keys):
                raise AuthError("token kid names no known key")
        alg = header.get("alg")
        for key in self.keys:
            if key.algorithm == alg:
                return key
        accepted = ", ".join(sorted({key.algorithm for key in self.keys}))
        raise AuthError(f"token algorithm must be {accepted}")


def verifier_from_config(auth: AuthConfig) -> TokenVerifier | None:
    """``[auth]``'s verifier, or None when auth is off.

    Raises:
        ConfigError: a key file that does not hold a usable key.
    """
    try:
        return TokenVerifier.from_settings(
            secret=auth.secret,
            public_key_file=auth.public_key_file,
            jwks_file=auth.jwks_file,
            issuer=auth.issuer,
            audience=auth.audience,
            leeway=auth.leeway,
        )
    except AuthError as exc:
        key = "auth.jwks_file" if auth.jwks_file else "auth.public_key_file"
        raise ConfigError(key, getattr(auth, key.partition(".")[2]), str(exc)) from None


def _reason(exc: jwt.PyJWTError) -> str:
    for kind, reason in _REASONS:
        if isinstance(exc, kind):
            return reason
    return "malformed token"


def _read(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise AuthError(f"cannot read {path}: {exc.strerror}") from None


def _pem_key(path: str) -> _Key:
    try:
        public = load_pem_public_key(_read(path))
    except ValueError:
        raise AuthError(f"{path} holds no PEM public key") from None
    if isinstance(public, rsa.RSAPublicKey):
        return _Key(None, public, "RS256")
    if isinstance(public, ec.EllipticCurvePublicKey) and public.curve.name in _EC_ALGORITHMS:
        return _Key(None, public, _EC_ALGORITHMS[public.curve.name])
    raise AuthError(f"{path}: only RSA and EC (P-256, P-384, P-521) public keys are supported")


def _jwks_keys(path: str) -> list[_Key]:
    try:
        keyset = jwt.PyJWKSet.from_json(_read(path).decode())
    except (jwt.PyJWTError, ValueError, UnicodeDecodeError) as exc:
        raise AuthError(f"{path} is not a usable JWKS: {exc}") from None
    return [_Key(k.key_id, k.key, k.algorithm_name) for k in keyset.keys]


def make_token(
    key: Any, claims: dict[str, object], algorithm: str = "HS256", kid: str | None = None
) -> str:
    """Sign ``claims`` (for tests, tools and the terminal client): ``key`` is the
    HS256 secret, or a private key for RS256/ES256."""
    headers = {"kid": kid} if kid is not None else None
    return jwt.encode(claims, key, algorithm=algorithm, headers=headers)
