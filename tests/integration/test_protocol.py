"""Every limit and error of PROTOCOL.md, on the real server.

Each test shows the exact close code or error code, and that a well-behaved
client on the same shard received all its messages meanwhile.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from shardchat.auth import make_token
from shardchat.testing.rawws import upgrade_request
from shardchat.testing.wait import await_until
from tests.support.helpers import (
    Client,
    Server,
    check_neighbour,
    clients_on_shards,
    closed_with,
    closing,
    connect_client,
    expect_error,
    good_neighbour,
    raw_on_shard,
    running_server,
    scaled,
)

LIMITS = ["limits.max_errors=5", "limits.max_frame=16384", "limits.max_content=1024"]


@pytest.fixture(scope="module")
def srv() -> Iterator[Server]:
    with running_server(workers=3, settings=LIMITS) as server:
        yield server


async def test_binary_frame_closes_1003(srv: Server) -> None:
    good, pub, task = await good_neighbour(srv.url, 1, "bin")
    raw = await raw_on_shard(srv, 1)
    raw.send_frame(0x2, b"\x00\x01")
    assert await closed_with(raw) == 1003
    await check_neighbour(good, pub, task)


async def test_invalid_utf8_closes_1007(srv: Server) -> None:
    good, pub, task = await good_neighbour(srv.url, 2, "utf8")
    raw = await raw_on_shard(srv, 2)
    raw.send_frame(0x1, b'{"type": "ping", "x": "\xff\xfe"}')
    assert await closed_with(raw) == 1007
    await check_neighbour(good, pub, task)


async def test_frame_over_max_frame_closes_1009(srv: Server) -> None:
    good, pub, task = await good_neighbour(srv.url, 0, "big")
    (bad,) = await clients_on_shards(srv.url, [0], prefix="big")
    await bad.ws.send(json.dumps({"type": "ping", "pad": "x" * 20000}))
    with pytest.raises(ConnectionClosed) as info:
        await bad.recv()
    assert info.value.rcvd is not None and info.value.rcvd.code == 1009
    await check_neighbour(good, pub, task)


@pytest.mark.parametrize(
    ("frame", "code", "request_id"),
    [
        (
            '{"type": "message", "room": "errs", "content": "' + "x" * 1025 + '", "id": "t1"}',
            "too_large",
            "t1",
        ),
        (
            '{"type": "message", "room": "errs", "content": "' + "é" * 513 + '", "id": "t2"}',
            "too_large",
            "t2",
        ),
        ('{"type": "join", "room": "errs"', "bad_json", None),
        ('{"type": "message", "room": "errs", "id": "m1"}', "bad_request", "m1"),
        ('{"type": "join", "room": "no spaces allowed", "id": "j1"}', "bad_request", "j1"),
        ('{"type": "join", "room": "' + "r" * 65 + '"}', "bad_request", None),
        ('{"room": "errs"}', "bad_request", None),
        ('{"type": "dance", "id": "d1"}', "unknown_type", "d1"),
        (
            '{"type": "message", "room": "elsewhere", "content": "hi", "id": "nm"}',
            "not_member",
            "nm",
        ),
        ('{"type": "leave", "room": "elsewhere"}', "not_member", None),
    ],
)
async def test_request_errors_keep_the_connection(
    srv: Server, frame: str, code: str, request_id: str | None
) -> None:
    """An error frame with the code (and the request's id); the connection stays usable."""
    good, pub, task = await good_neighbour(srv.url, 2, "errs")
    (bad,) = await clients_on_shards(srv.url, [2], prefix="errs")
    async with closing([bad]):
        await bad.join("errs")
        await bad.ws.send(frame)
        await expect_error(bad, code, request_id)
        pong = await bad.request("ping", "pong", id="still-here")
        assert pong["id"] == "still-here"
    await check_neighbour(good, pub, task)


async def test_max_errors_in_a_row_closes_1008(srv: Server) -> None:
    """max_errors (5) refused requests in a row close with 1008; a good one resets the count."""
    good, pub, task = await good_neighbour(srv.url, 0, "maxerr")
    (bad,) = await clients_on_shards(srv.url, [0], prefix="maxerr")
    for _ in range(4):
        await bad.ws.send("not json")
        await expect_error(bad, "bad_json")
    await bad.request("ping", "pong")  # resets the count
    for _ in range(4):
        await bad.ws.send("not json")
        await expect_error(bad, "bad_json")
    await bad.ws.send("not json")
    with pytest.raises(ConnectionClosed) as info:
        while True:
            await bad.recv()
    assert info.value.rcvd is not None and info.value.rcvd.code == 1008
    await check_neighbour(good, pub, task)


async def test_bad_names_at_connect_get_http_400(srv: Server) -> None:
    for query in ("user=has%20space", "user=" + "u" * 65, "room=bad!room", "user="):
        with pytest.raises(InvalidStatus) as info:
            await connect(f"{srv.url}?{query}")
        assert info.value.response.status_code == 400, query


async def test_rate_limit_refuses_only_the_excess() -> None:
    """Past the burst, messages get rate_limited with their id; the accepted ones are
    acked and delivered, and nothing else happens to the connection."""
    with running_server(workers=3, settings=["limits.rate=5", "limits.burst=10"]) as server:
        good, pub, task = await good_neighbour(server.url, 1, "rate", count=5)
        (sender,) = await clients_on_shards(server.url, [1], prefix="rl")
        async with closing([sender]):
            await sender.join("rate-other")
            for i in range(30):
                await sender.send(type="message", room="rate-other", content=f"r{i}", id=f"r{i}")
            acks, limited = [], []
            while len(acks) + len(limited) < 30:
                frame = await sender.recv()
                if frame["type"] == "ack":
                    acks.append(frame["id"])
                elif frame["type"] == "error":
                    assert frame["code"] == "rate_limited"
                    limited.append(frame["id"])
            assert 10 <= len(acks) <= 12 and len(limited) == 30 - len(acks)
            assert acks == [f"r{i}" for i in range(len(acks))]
            assert (await sender.request("ping", "pong", id="ok"))["id"] == "ok"
        await check_neighbour(good, pub, task, count=5)


async def test_origin_allow_list_403() -> None:
    # The test clients send no Origin header: allowed here (None), as for non-browsers.
    origins = 'server.origins=["https://chat.example"]'
    with running_server(workers=2, settings=[origins]) as server:
        good, pub, task = await good_neighbour(server.url, 0, "orig")
        for _ in range(6):  # every shard refuses
            with pytest.raises(InvalidStatus) as info:
                await connect(server.url, origin="https://evil.example")  # type: ignore[arg-type]
            assert info.value.response.status_code == 403
        ok = await connect(server.url, origin="https://chat.example")  # type: ignore[arg-type]
        await ok.close()
        await check_neighbour(good, pub, task)


def raw_upgrade_status(port: int, source: str) -> bytes:
    """The status line of an upgrade request sent from ``source``."""
    sock = socket.socket()
    try:
        sock.bind((source, 0))
        sock.connect(("127.0.0.1", port))
        sock.sendall(upgrade_request("/ws", "x"))
        return sock.recv(100).split(b"\r\n", 1)[0]
    finally:
        sock.close()


async def _connect_once_counted(url: str) -> Client:
    """Connect from 127.0.0.1 once the server has counted the last close from it:
    until then it is over max_per_ip and answers 503 (the close is an event on
    the server's side that the client cannot see, so a 503 is waited out)."""

    async def connected() -> Client | None:
        try:
            return await connect_client(url, user="ip")
        except InvalidStatus as exc:
            assert exc.response.status_code == 503
            return None

    return await await_until(connected, 10, "a closed connection uncounted")


async def test_max_connections_and_max_per_ip_503() -> None:
    """max_per_ip (3) holds for the whole server, whichever shards one address's
    connections land on; then max_connections (10): HTTP 503 before the upgrade, a
    neighbour unharmed."""
    settings = ["server.max_connections=10", "server.max_per_ip=3"]
    with running_server(workers=3, settings=settings) as server:
        # Two well-behaved connections from other addresses, one on shard 0 (placed
        # from addresses of its own: max_per_ip holds for every address).
        good, pub, task = await good_neighbour(
            server.url, 0, "full", source="127.0.0.3", spread=True
        )
        clients: list[Client] = []
        try:
            # Three from 127.0.0.1 on at least two shards (closed and retried until so).
            for _ in range(100):
                shards = {c.shard for c in clients}
                if len(clients) == 3 and len(shards) >= 2:
                    break
                if len(clients) == 3:
                    await clients.pop().close()
                clients.append(await _connect_once_counted(server.url))
            assert len({c.shard for c in clients}) >= 2
            # Per shard the address has at most 2 of its 3: every shard refuses a 4th.
            refused = [raw_upgrade_status(server.port, "127.0.0.1") for _ in range(12)]
            assert set(refused) == {b"HTTP/1.1 503 Service Unavailable"}
            # 3 + 2 = 5 of 10: five more from other addresses, then the server is full.
            for i in range(5):
                clients.append(await connect_client(server.url, user="more", source=f"127.0.1.{i}"))
            for _ in range(3):
                assert (
                    raw_upgrade_status(server.port, "127.0.0.4")
                    == b"HTTP/1.1 503 Service Unavailable"
                )
            await check_neighbour(good, pub, task)
        finally:
            for client in clients:
                await client.close()


async def test_room_full() -> None:
    with running_server(workers=3, settings=["limits.room_size=2"]) as server:
        good, pub, task = await good_neighbour(server.url, 2, "fine")
        a, b, c = await clients_on_shards(server.url, [0, 1, 2], prefix="full")
        async with closing([a, b, c]):
            await a.join("small")
            await b.join("small")
            # Presence crosses shards through the rings: wait until c's shard sees both.
            while (await c.request("presence", "presence", room="small"))["count"] < 2:
                pass
            await c.send(type="join", room="small", id="j")
            await expect_error(c, "room_full", "j")
            # The same user again (another connection) is no new member.
            again = await connect_client(server.url, user=a.user)
            async with closing([again]):
                assert (await again.join("small"))["count"] == 2
        await check_neighbour(good, pub, task)


async def test_slow_loris_handshake_is_dropped(srv: Server) -> None:
    """A client that never finishes its HTTP request is disconnected within seconds."""
    sock = socket.create_connection(("127.0.0.1", srv.port))
    sock.sendall(b"GET /ws HTTP/1.1\r\nHost: x\r\n")  # and nothing more
    sock.settimeout(scaled(10))
    started = time.monotonic()
    assert await asyncio.to_thread(sock.recv, 100) == b""
    assert time.monotonic() - started < scaled(8)
    sock.close()


def test_http_endpoints_and_404(srv: Server) -> None:
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(f"http://127.0.0.1:{srv.port}/nope", timeout=5)
    assert info.value.code == 404
    info.value.close()


async def test_history_replays_held_messages(srv: Server) -> None:
    (a,) = await clients_on_shards(srv.url, [1], prefix="hist")
    async with closing([a]):
        await a.join("hist")
        for i in range(5):
            await a.send(type="message", room="hist", content=f"h{i}", id=f"h{i}")
        for _ in range(5):
            await a.recv_type("ack")
        await a.send(type="history", room="hist", since=1, limit=2)
        got = [await a.recv_type("message") for _ in range(2)]
        await asyncio.sleep(0)
        frames = []
        while True:
            frame = await a.recv()
            frames.append(frame)
            if frame["type"] == "history_end":
                break
        history = [m for m in [*got, *frames] if m["type"] == "message" and m["seq"] in (2, 3)]
        assert [m["content"] for m in history][-2:] == ["h1", "h2"]
        assert frames[-1] == {"type": "history_end", "room": "hist", "seq": 3}


async def test_auth_tokens() -> None:
    """With auth.secret set: no token or a bad one is HTTP 401; the token's sub is the
    user; a rooms claim limits joins (unauthorized)."""
    secret = "s3cret-of-at-least-32-bytes-long!"
    with running_server(workers=2, settings=[f'auth.secret="{secret}"']) as server:
        query = "?token=" + make_token(secret, {"sub": "neighbour"})
        good, pub, task = await good_neighbour(server.url + query, 1, "authed")
        for suffix in (
            "?user=mallory",
            "?token=abc.def.ghi",
            "?token=" + make_token("wrong-secret-also-32-bytes-long!!", {"sub": "eve"}),
            "?token=" + make_token(secret, {"sub": "old", "exp": time.time() - 100}),
        ):
            with pytest.raises(InvalidStatus) as info:
                await connect(server.url + suffix)
            assert info.value.response.status_code == 401
        token = make_token(secret, {"sub": "ada", "rooms": ["math"], "exp": time.time() + 60})
        client = await connect_client(server.url + f"?token={token}&user=ignored")
        async with closing([client]):
            assert client.user == "ada"
            assert (await client.join("math"))["room"] == "math"
            await client.send(type="join", room="poetry", id="p")
            await expect_error(client, "unauthorized", "p")
        ws = await connect(
            server.url,
            additional_headers={"Authorization": f"Bearer {make_token(secret, {'sub': 'bob'})}"},
        )
        welcome = json.loads(await ws.recv())
        assert welcome["user"] == "bob"
        await ws.close()
        await check_neighbour(good, pub, task)


async def test_abrupt_eof_in_a_room_breaks_nothing(srv: Server) -> None:
    """Clients that vanish with a bare EOF (no close frame) while in a room: the others
    get their leave events and the server logs no error (a regression: presence events
    were once written to the half-closed transports)."""
    (watcher,) = await clients_on_shards(srv.url, [0], prefix="eofw")
    async with closing([watcher]):
        await watcher.join("eof-room")
        raws = [await raw_on_shard(srv, 0, f"/ws?user=vanish{i}&room=eof-room") for i in range(3)]
        while (await watcher.request("presence", "presence", room="eof-room"))["count"] < 4:
            pass
        for raw in raws:
            raw.sock.shutdown(socket.SHUT_WR)
        left = set()
        while len(left) < 3:
            frame = await watcher.recv()
            if frame["type"] == "leave":
                left.add(frame["sender"])
        for raw in raws:
            raw.close()
        assert left == {f"vanish{i}" for i in range(3)}
    assert not [e for e in srv.log_events() if e.get("level") == "error"]
