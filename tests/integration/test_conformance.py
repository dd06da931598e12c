"""RFC 6455 and HTTP conformance through the real server, with raw frames and raw
requests (a client nobody on the team wrote): fragmentation, deep nesting,
slow-loris handshakes, duplicate and missing headers, versions, methods, bodies,
origins and the page's security headers. Each shows a well-behaved neighbour on
the same shard unharmed, and that no input made the server write a traceback.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from shardchat.testing.rawws import upgrade_request
from tests.support.helpers import (
    RawClient,
    Server,
    assert_no_traceback,
    check_neighbour,
    clients_on_shards,
    closing,
    connect_client,
    good_neighbour,
    raw_http,
    raw_on_shard,
    running_server,
    scaled,
)

ORIGIN = "https://chat.example"


@pytest.fixture(scope="module")
def srv() -> Iterator[Server]:
    with running_server(workers=2, settings=[f'server.origins=["{ORIGIN}"]']) as server:
        yield server


def upgrade(path: str = "/ws?user=h", *, extra: str = "", host: bool = True) -> bytes:
    return upgrade_request(path, "127.0.0.1" if host else None, extra)


def next_json(raw: RawClient) -> dict[str, object]:
    """The next text frame's JSON, skipping control frames (pongs, heartbeat pings)."""
    while True:
        opcode, payload = raw.recv_frame()
        if opcode == 0x1:
            data: dict[str, object] = json.loads(payload)
            return data
        assert opcode in (0x9, 0xA), (opcode, payload)


async def test_fragmented_text_is_reassembled(srv: Server) -> None:
    """RFC 6455 5.4: a join and a message sent in fragments, with a ping between them
    and a UTF-8 character split across two fragments, are one message each."""
    good, pub, task = await good_neighbour(srv.url, 0, "frag-n")
    (member,) = await clients_on_shards(srv.url, [0], prefix="fragm")
    raw = await raw_on_shard(srv, 0, "/ws?user=fragger")
    async with closing([member]):
        await member.join("frag")
        join = b'{"type": "join", "room": "frag"}'
        raw.send_frame(0x1, join[:7], fin=False)
        raw.send_frame(0x9, b"between")  # a control frame inside the message
        raw.send_frame(0x0, join[7:20], fin=False)
        raw.send_frame(0x0, join[20:], fin=True)
        opcode, payload = raw.recv_frame()
        assert (opcode, payload) == (0xA, b"between")
        assert next_json(raw)["type"] == "joined"
        content = "h\u00e9llo \u2603"
        message = {"type": "message", "room": "frag", "content": content, "id": "f1"}
        body = json.dumps(message, ensure_ascii=False)
        data = body.encode()
        cut = data.index("\u2603".encode()) + 1  # inside the snowman's three bytes
        raw.send_frame(0x1, data[:cut], fin=False)
        raw.send_frame(0x0, data[cut:], fin=True)
        while (frame := next_json(raw))["type"] != "ack":
            assert frame["type"] != "error", frame
        assert frame["id"] == "f1"
        got = await member.recv_type("message")
        assert got["content"] == content and got["sender"] == "fragger"
        raw.close()
    await check_neighbour(good, pub, task)
    assert_no_traceback(srv)


async def test_fragmented_message_over_max_frame_closes_1009(srv: Server) -> None:
    """The size limit holds for the whole reassembled message, not each fragment."""
    good, pub, task = await good_neighbour(srv.url, 1, "frag-big")
    raw = await raw_on_shard(srv, 1)
    piece = b" " * 40_000
    raw.send_frame(0x1, b'{"type": "ping", "x": "' + piece, fin=False)
    raw.send_frame(0x0, piece, fin=False)
    assert raw.close_code() == 1009
    raw.close()
    await check_neighbour(good, pub, task)


async def test_deeply_nested_ping_gets_an_error_frame(srv: Server) -> None:
    """A ping nested 300 deep (orjson decodes it, cannot encode the pong) is answered
    with error bad_request; the connection stays open and nothing is logged as a
    traceback."""
    good, pub, task = await good_neighbour(srv.url, 1, "deep")
    raw = await raw_on_shard(srv, 1)
    for _ in range(3):
        raw.send_frame(0x1, b'{"type": "ping", "id": "d", "x": ' + b"[" * 300 + b"]" * 300 + b"}")
        error = next_json(raw)
        assert (error["type"], error["code"], error["id"]) == ("error", "bad_request", "d")
    raw.send_json({"type": "ping", "id": "ok"})
    assert next_json(raw) == {"type": "pong", "id": "ok"}
    raw.close()
    await check_neighbour(good, pub, task)
    assert_no_traceback(srv)


def _slow_loris(port: int, stop: float) -> bool:
    """A handshake that sends one byte every 0.3 s; True when the server dropped it
    (before ``stop``) although bytes kept coming."""
    request = upgrade()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.settimeout(0.3)
        for byte in request[:-1]:
            if time.monotonic() > stop:
                return False
            try:
                sock.send(bytes([byte]))
                if sock.recv(1) == b"":
                    return True
            except TimeoutError:
                continue
            except OSError:
                return True
    return False


async def test_slow_loris_is_dropped_and_does_not_lock_out_clients() -> None:
    """Handshakes that trickle a byte at a time are dropped within the handshake
    deadline, counted from the connection's start; while they are open, real clients
    are still admitted under max_connections."""
    with running_server(workers=2, settings=["server.max_connections=6"]) as server:
        good, pub, task = await good_neighbour(server.url, 0, "loris")
        stop = time.monotonic() + scaled(30)
        loop = asyncio.get_running_loop()
        with ThreadPoolExecutor(12) as pool:
            loris = [loop.run_in_executor(pool, _slow_loris, server.port, stop) for _ in range(12)]
            pending = asyncio.gather(*loris)
            await asyncio.sleep(0.5)  # let them connect: 12 half-open handshakes, limit 6
            # 12 half-open handshakes and 2 neighbours, limit 6: a real client still gets in.
            client = await connect_client(server.url, user="real")
            await client.close()
            assert await pending == [True] * 12
        await check_neighbour(good, pub, task)


async def test_duplicate_headers_get_400_and_one_log_line(srv: Server) -> None:
    """Two Origin, Authorization or Host headers: HTTP 400 and one log line each."""
    good, pub, task = await good_neighbour(srv.url, 0, "dups")
    for extra in (
        f"Origin: {ORIGIN}\r\nOrigin: https://evil.example\r\n",
        "Authorization: Bearer a\r\nAuthorization: Bearer b\r\n",
        "Host: other\r\n",
    ):
        status, _, body = await asyncio.to_thread(raw_http, srv.port, upgrade(extra=extra))
        assert status == 400, body
        assert b"more than one" in body
    events = srv.log_events()
    refused = [e for e in events if e.get("event") == "http_refused"]
    reasons = sorted(e["reason"] for e in refused if "more than one" in e["reason"])
    assert reasons == [
        "more than one Authorization header",
        "more than one Host header",
        "more than one Origin header",
    ]
    await check_neighbour(good, pub, task)
    assert_no_traceback(srv)


async def test_http_conformance(srv: Server) -> None:
    """426 with Sec-WebSocket-Version: 13; 400 without Host; HEAD without a body;
    405 for other methods; a request with a body answered (413, 501)."""
    good, pub, task = await good_neighbour(srv.url, 1, "http")
    port = srv.port

    def call(request: bytes) -> tuple[int, dict[str, str], bytes]:
        return raw_http(port, request)

    status, headers, _ = await asyncio.to_thread(
        call, upgrade().replace(b"Version: 13", b"Version: 8")
    )
    assert status == 426 and headers["sec-websocket-version"] == "13"
    status, _, body = await asyncio.to_thread(call, upgrade(host=False))
    assert status == 400 and b"Host" in body
    get_status, get_headers, page = await asyncio.to_thread(
        call, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    status, headers, body = await asyncio.to_thread(call, b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (get_status, status, body) == (200, 200, b"")
    assert headers["content-length"] == get_headers["content-length"] == str(len(page))
    for method in ("POST", "DELETE", "PUT"):
        for path in ("/", "/ws"):
            status, headers, _ = await asyncio.to_thread(
                call, f"{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
            )
            assert status == 405 and "GET" in headers["allow"], (method, path)
    status, _, _ = await asyncio.to_thread(
        call, b"POST /ws HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
    )
    assert status == 413
    status, _, _ = await asyncio.to_thread(
        call, b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    )
    assert status == 501
    status, _, _ = await asyncio.to_thread(call, b"NONSENSE\r\n\r\n")
    assert status == 400
    await check_neighbour(good, pub, task)
    assert_no_traceback(srv)


async def test_origin_compares_case_insensitively(srv: Server) -> None:
    """RFC 6454: scheme and host are case-insensitive; another origin is still 403."""
    good, pub, task = await good_neighbour(srv.url, 0, "origin")
    status, _, _ = await asyncio.to_thread(
        raw_http, srv.port, upgrade(extra="Origin: HTTPS://Chat.Example\r\n")
    )
    assert status == 101
    status, _, _ = await asyncio.to_thread(
        raw_http, srv.port, upgrade(extra="Origin: https://chat.example.evil\r\n")
    )
    assert status == 403
    await check_neighbour(good, pub, task)


async def test_page_security_headers(srv: Server) -> None:
    """The page carries a CSP (its inline script and style by hash, scripts of its own
    origin: /shardchat.js), nosniff and a referrer policy; every answer carries the
    last two. /shardchat.js is served as JavaScript."""
    status, headers, _ = await asyncio.to_thread(
        raw_http, srv.port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    assert status == 200
    csp = headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'self' 'sha256-" in csp
    assert "frame-ancestors 'none'" in csp and "connect-src 'self'" in csp
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["referrer-policy"] == "no-referrer"
    status, headers, _ = await asyncio.to_thread(
        raw_http, srv.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    assert status == 200 and headers["x-content-type-options"] == "nosniff"
    status, headers, body = await asyncio.to_thread(
        raw_http, srv.port, b"GET /shardchat.js HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    assert status == 200 and headers["content-type"] == "text/javascript; charset=utf-8"
    assert headers["x-content-type-options"] == "nosniff" and b"export class ChatClient" in body
