"""Tokens through PyJWT, on the real server with the websockets client library:
HS256, RS256 and ES256 (PEM), a JWKS file with kids, iss/aud, strict base64, a
case-insensitive Bearer scheme, the rooms claim on every request naming a room,
and close 4401 when a token's exp passes. A neighbour on the same shard is unharmed.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from shardchat.auth import TokenVerifier, make_token
from shardchat.core.errors import AuthError
from tests.support.helpers import (
    Server,
    check_neighbour,
    closing,
    connect_client,
    expect_error,
    good_neighbour,
    running_server,
)

SECRET = "a-secret-of-at-least-thirty-two-bytes"


@pytest.fixture(scope="module")
def srv() -> Iterator[Server]:
    settings = [f'auth.secret="{SECRET}"', 'auth.issuer="shardchat-tests"', "auth.leeway=0"]
    with running_server(workers=2, settings=settings) as server:
        yield server


def token(claims: dict[str, Any], key: Any = SECRET, algorithm: str = "HS256", **kw: Any) -> str:
    return make_token(key, {"iss": "shardchat-tests", **claims}, algorithm, **kw)


async def status_of(url: str, **kwargs: Any) -> int:
    try:
        ws = await connect(url, **kwargs)
    except InvalidStatus as exc:
        return int(exc.response.status_code)
    await ws.close()
    return 101


async def test_rooms_claim_covers_every_request(srv: Server) -> None:
    """A token limited to ["allowed"] cannot read another room's history or presence,
    publish, ack or leave there: error unauthorized for each; its own room works."""
    query = "?token=" + token({"sub": "neighbour"})
    good, pub, task = await good_neighbour(srv.url, 0, "open", query=query)
    other = await connect_client(srv.url + "?token=" + token({"sub": "writer"}))
    limited = await connect_client(
        srv.url + "?token=" + token({"sub": "ada", "rooms": ["allowed"]})
    )
    async with closing([other, limited]):
        await other.join("secret")
        await other.send(type="message", room="secret", content="private", id="s")
        await other.recv_type("ack")
        for i, request in enumerate(
            [
                {"type": "history", "room": "secret"},
                {"type": "presence", "room": "secret"},
                {"type": "join", "room": "secret"},
                {"type": "message", "room": "secret", "content": "x"},
                {"type": "ack", "room": "secret", "seq": 1},
                {"type": "leave", "room": "secret"},
            ]
        ):
            await limited.send(**request, id=f"r{i}")
            await expect_error(limited, "unauthorized", f"r{i}")
        assert not [f for f in limited.dropped if f["type"] in ("message", "presence")]
        assert (await limited.join("allowed"))["room"] == "allowed"
        reply = await limited.request("presence", "presence", room="allowed")
        assert reply["users"] == ["ada"]
    await check_neighbour(good, pub, task)


async def test_token_checks(srv: Server) -> None:
    """Strict base64 ("!!" after the signature is refused), iss, a case-insensitive
    Bearer scheme, alg none refused; 401 before the upgrade."""
    query = "?token=" + token({"sub": "neighbour2"})
    good, pub, task = await good_neighbour(srv.url, 1, "checks", query=query)
    valid = token({"sub": "bob"})
    unsigned = jwt.encode({"sub": "eve", "iss": "shardchat-tests"}, None, algorithm="none")
    for bad in (
        valid + "!!",
        valid[:-2] + "!!" + valid[-2:],
        token({"sub": "eve", "iss": "someone-else"}),
        unsigned,
        token({"sub": "old", "exp": time.time() - 5}),  # leeway 0
        token({"sub": "bad name!"}),
    ):
        assert await status_of(srv.url + "?token=" + bad) == 401, bad
    for scheme in ("Bearer", "bearer", "BEARER"):
        ws = await connect(srv.url, additional_headers={"Authorization": f"{scheme} {valid}"})
        assert json.loads(await ws.recv())["user"] == "bob"
        await ws.close()
    await check_neighbour(good, pub, task)


async def test_expired_token_closes_4401(srv: Server) -> None:
    """A connection is closed with 4401 when its token's exp passes (leeway 0); one
    without exp on the same shard stays."""
    query = "?token=" + token({"sub": "stayer"})
    good, pub, task = await good_neighbour(srv.url, 0, "expiry", query=query)
    ws = await connect(srv.url + "?token=" + token({"sub": "brief", "exp": int(time.time()) + 2}))
    json.loads(await ws.recv())
    with pytest.raises(ConnectionClosed) as info:
        while True:
            await ws.recv()
    assert info.value.rcvd is not None
    assert (info.value.rcvd.code, info.value.rcvd.reason) == (4401, "token expired")
    await check_neighbour(good, pub, task)


def _keypair(kind: str) -> tuple[Any, bytes]:
    private: Any = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        if kind == "rsa"
        else ec.generate_private_key(ec.SECP256R1())
    )
    pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private, pem


@pytest.mark.parametrize(("kind", "alg"), [("rsa", "RS256"), ("ec", "ES256")])
async def test_public_key_file(tmp_path: Path, kind: str, alg: str) -> None:
    """auth.public_key_file: RS256 or ES256 tokens by the key's type; an HS256 token
    signed with the public key as its secret (algorithm confusion) is refused."""
    private, pem = _keypair(kind)
    path = tmp_path / "key.pem"
    path.write_bytes(pem)
    with running_server(workers=1, settings=[f'auth.public_key_file="{path}"']) as server:
        url = server.url + "?token="
        ws = await connect(url + make_token(private, {"sub": "ada"}, alg))
        assert json.loads(await ws.recv())["user"] == "ada"
        await ws.close()
        other, _ = _keypair(kind)
        assert await status_of(url + make_token(other, {"sub": "eve"}, alg)) == 401
        assert await status_of(url + _hs256_with(pem)) == 401


def _hs256_with(key: bytes) -> str:
    """An HS256 token whose secret is the public key's PEM (PyJWT refuses to make one)."""

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    signing = b64(b'{"alg":"HS256","typ":"JWT"}') + "." + b64(b'{"sub":"eve"}')
    return signing + "." + b64(hmac.new(key, signing.encode(), hashlib.sha256).digest())


async def test_jwks_file_picks_the_key_by_kid(tmp_path: Path) -> None:
    """auth.jwks_file: two keys; the token's kid picks one; an unknown kid is refused;
    iss/aud checked when set."""
    rsa_key, _ = _keypair("rsa")
    ec_key, _ = _keypair("ec")
    keys = []
    for kid, jwk in (
        ("r1", jwt.algorithms.RSAAlgorithm.to_jwk(rsa_key.public_key())),
        ("e1", jwt.algorithms.ECAlgorithm.to_jwk(ec_key.public_key())),
    ):
        keys.append({**json.loads(jwk), "kid": kid})
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": keys}))
    settings = [f'auth.jwks_file="{path}"', 'auth.audience="chat"']
    with running_server(workers=1, settings=settings) as server:
        url = server.url + "?token="
        for kid, private, alg in (("r1", rsa_key, "RS256"), ("e1", ec_key, "ES256")):
            ws = await connect(url + make_token(private, {"sub": kid, "aud": "chat"}, alg, kid))
            assert json.loads(await ws.recv())["user"] == kid
            await ws.close()
        claims = {"sub": "x", "aud": "chat"}
        assert await status_of(url + make_token(rsa_key, claims, "RS256", "nope")) == 401
        assert await status_of(url + make_token(rsa_key, claims, "RS256", "e1")) == 401
        no_aud = make_token(ec_key, {"sub": "x"}, "ES256", "e1")
        assert await status_of(url + no_aud) == 401


def test_verifier_leeway_and_reasons() -> None:
    """auth.leeway allows that much clock skew on exp and nbf; reasons are specific."""
    verifier = TokenVerifier.from_settings(secret=SECRET, leeway=30)
    assert verifier is not None
    now = time.time()
    identity = verifier.verify(make_token(SECRET, {"sub": "a", "exp": now - 10}))
    assert identity.expires == pytest.approx(now + 20, abs=1)
    with pytest.raises(AuthError, match="token expired"):
        verifier.verify(make_token(SECRET, {"sub": "a", "exp": now - 40}))
    with pytest.raises(AuthError, match="not valid yet"):
        verifier.verify(make_token(SECRET, {"sub": "a", "nbf": now + 40}))
    with pytest.raises(AuthError, match="no sub"):
        verifier.verify(make_token(SECRET, {"name": "a"}))
    with pytest.raises(AuthError, match="malformed"):
        verifier.verify("not-a-token")
    assert TokenVerifier.from_settings() is None
