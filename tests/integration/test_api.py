"""The server API over real HTTP on a real 3-shard server: every method, every
refusal with its exact status and body, and a WebSocket neighbour on the shard
that answered that saw nothing slow down or drop. Every answer is checked
against docs/api.yaml."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from openapi_spec_validator import validate
from websockets.exceptions import ConnectionClosed

from shardchat.api import (
    ApiBadRequest,
    ApiClient,
    ApiNotFound,
    ApiUnauthorized,
    AsyncApiClient,
)
from shardchat.client import ChatClient
from shardchat.core.errors import Closed
from shardchat.testing.wait import await_until
from tests.support.api import KEY, SPEC_PATH, Http, call, check_answer, on_shard, request
from tests.support.helpers import (
    FAST,
    Client,
    Server,
    assert_no_traceback,
    check_neighbour,
    closing,
    collect,
    connect_client,
    good_neighbour,
    room_owned_by,
    running_server,
    scaled,
)

ROOM_SIZE = 3


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    settings = [*FAST, f"limits.room_size={ROOM_SIZE}", "limits.max_frame=8192"]
    with running_server(3, settings, env={"SHARDCHAT_API_KEY": KEY}) as srv:
        yield srv


async def user_on_every_shard(server: Server, user: str, shards: int = 3) -> list[Client]:
    """Connections of one user until every shard holds one (the kernel picks)."""
    found: dict[int, Client] = {}
    spare: list[Client] = []
    for _ in range(200):
        client = await connect_client(server.url, user=user)
        if client.shard in found or client.shard >= shards:
            spare.append(client)
        else:
            found[client.shard] = client
        if len(found) == shards:
            break
    for client in spare:
        await client.close()
    assert sorted(found) == list(range(shards)), found.keys()
    return [found[i] for i in range(shards)]


def test_the_document_is_valid_openapi_3_1() -> None:
    spec = yaml.safe_load(SPEC_PATH.read_text())
    validate(spec)
    assert spec["openapi"].startswith("3.1")
    from shardchat.core.apicalls import METHODS

    assert sorted(p.removeprefix("/api/") for p in spec["paths"]) == sorted(METHODS)


async def test_publish_reaches_members_on_every_shard_in_order_with_websocket_publishes(
    server: Server,
) -> None:
    members = await user_on_every_shard(server, "reader")
    writer = await connect_client(server.url, user="writer")
    async with closing([*members, writer]):
        for client in [*members, writer]:
            await client.join("news")
        http = Http(server.port)  # one keep-alive connection for every call
        try:
            for i in range(5):
                await writer.request("message", "ack", room="news", content=f"ws{i}")
                status, answer = http.call("publish", {"room": "news", "content": f"api{i}"})
                assert status == 200 and answer["result"]["seq"] == 2 * i + 2
            status, history = http.call("history", {"room": "news"})
        finally:
            http.close()
        expected = [c for i in range(5) for c in (f"ws{i}", f"api{i}")]
        for member in members:
            got = await collect(member, "news", 10, timeout=5)
            assert [m["content"] for m in got] == expected
            assert [m["seq"] for m in got] == list(range(1, 11))
            assert {m["sender"] for m in got if m["content"].startswith("api")} == {"system"}
        # The API's history is what members received.
        assert status == 200
        assert [m["content"] for m in history["result"]["messages"]] == expected
        assert history["result"]["seq"] == 10
        assert history["result"]["epoch"] == answer["result"]["epoch"]


async def test_a_publish_key_is_deduplicated_per_sender_and_room(server: Server) -> None:
    body = {"room": "dedupe", "content": "once", "key": "k-1", "sender": "billing"}
    first = call(server.port, "publish", body)
    again = call(server.port, "publish", body)
    other = call(server.port, "publish", {**body, "sender": "shipping"})
    assert first == again and first[0] == 200
    assert other[1]["result"]["seq"] == first[1]["result"]["seq"] + 1
    # The WebSocket's `key` is the same mechanism: the user "billing" resending
    # with that key gets the API publish's seq.
    billing = await connect_client(server.url, user="billing")
    async with closing([billing]):
        await billing.join("dedupe")
        ack = await billing.request("message", "ack", room="dedupe", content="once", key="k-1")
        assert ack["seq"] == first[1]["result"]["seq"]
    _, history = call(server.port, "history", {"room": "dedupe"})
    assert [m["sender"] for m in history["result"]["messages"]] == ["billing", "shipping"]


async def test_subscribe_and_unsubscribe_move_every_connection_of_a_user(server: Server) -> None:
    conns = await user_on_every_shard(server, "mover")
    watcher = await connect_client(server.url, user="watcher")
    async with closing([*conns, watcher]):
        await watcher.join("moved")
        assert call(server.port, "subscribe", {"user": "mover", "room": "moved"}) == (
            200,
            {"result": {}},
        )
        for conn in conns:
            joined = await conn.recv_type("joined")
            assert joined["room"] == "moved" and "id" not in joined
        event = await watcher.recv_type("join")
        assert event["sender"] == "mover"
        _, presence = call(server.port, "presence", {"room": "moved"})
        assert presence["result"]["users"] == [
            {"user": "mover", "connections": 3},
            {"user": "watcher", "connections": 1},
        ]
        # What the WebSocket side says.
        ws_presence = await watcher.request("presence", "presence", room="moved")
        assert sorted(ws_presence["users"]) == ["mover", "watcher"]
        _, stats = call(server.port, "presence_stats", {"room": "moved"})
        assert stats["result"] == {"room": "moved", "users": 2, "connections": 4}
        assert call(server.port, "unsubscribe", {"user": "mover", "room": "moved"})[0] == 200
        for conn in conns:
            assert (await conn.recv_type("left"))["room"] == "moved"
        assert (await watcher.recv_type("leave"))["sender"] == "mover"


async def test_disconnect_closes_a_users_connections_on_every_shard(server: Server) -> None:
    conns = await user_on_every_shard(server, "banned")
    bystander = await connect_client(server.url, user="bystander")
    async with closing([*conns, bystander]):
        status, answer = call(server.port, "disconnect", {"user": "banned", "reason": "spam"})
        assert (status, answer) == (200, {"result": {}})
        for conn in conns:
            with pytest.raises(ConnectionClosed):
                await conn.recv(5)
            assert (conn.ws.close_code, conn.ws.close_reason) == (4403, "spam")
        # Nobody else was touched.
        assert (await bystander.request("ping", "pong"))["type"] == "pong"
    conns = await user_on_every_shard(server, "kicked", shards=2)
    async with closing(conns):
        call(server.port, "disconnect", {"user": "kicked", "reconnect": True})
        for conn in conns:
            with pytest.raises(ConnectionClosed):
                await conn.recv(5)
            assert conn.ws.close_code == 4400


async def test_chatclient_does_not_reconnect_after_4403_and_does_after_4400(
    server: Server,
) -> None:
    def connections(user: str) -> int:
        _, info = call(server.port, "presence_stats", {"room": f"room-{user}"})
        return int(info["result"]["connections"])

    stays = ChatClient(server.url, user="leaver", rooms=["room-leaver"], timeout=5)
    await asyncio.wait_for(stays.start(), scaled(5))
    try:
        call(server.port, "disconnect", {"user": "leaver", "reconnect": True})

        # It comes back: closed with 4400, then a second connection in the room.
        def log_of(event: str) -> list[dict[str, Any]]:
            return [
                e
                for e in server.log_events()
                if e.get("event") == event and e.get("user") == "leaver"
            ]

        await await_until(
            lambda: [e for e in log_of("conn_close") if e.get("code") == 4400], 10, "the 4400 close"
        )
        await await_until(
            lambda: len(log_of("conn_open")) == 2 and connections("leaver") == 1,
            10,
            "ChatClient to come back",
        )
    finally:
        await stays.close()
    gone = ChatClient(server.url, user="exile", rooms=["room-exile"], timeout=5)
    await asyncio.wait_for(gone.start(), scaled(5))
    try:
        call(server.port, "disconnect", {"user": "exile", "reason": "banned"})
        with pytest.raises(Closed) as caught:
            async with asyncio.timeout(scaled(5)):
                async for _ in gone.messages():
                    pass
        assert (caught.value.code, caught.value.reason) == (4403, "banned")
        assert connections("exile") == 0
    finally:
        await gone.close()


async def test_rooms_info_broadcast_and_batch(server: Server) -> None:
    members = await user_on_every_shard(server, "lister")
    async with closing(members):
        for i, member in enumerate(members):
            await member.join(f"list.{i}")
            await member.join("list.all")
        _, rooms = call(server.port, "rooms", {"pattern": "list.*"})
        assert rooms["result"] == {
            "rooms": [
                {"room": "list.0", "users": 1, "connections": 1},
                {"room": "list.1", "users": 1, "connections": 1},
                {"room": "list.2", "users": 1, "connections": 1},
                {"room": "list.all", "users": 1, "connections": 3},
            ],
            "cursor": None,
        }
        _, page = call(server.port, "rooms", {"pattern": "list.*", "limit": 3})
        assert page["result"]["cursor"] == "list.2"
        _, rest = call(server.port, "rooms", {"pattern": "list.*", "cursor": "list.2"})
        assert [r["room"] for r in rest["result"]["rooms"]] == ["list.all"]
        _, info = call(server.port, "info")
        shards = info["result"]["shards"]
        assert [s["shard"] for s in shards] == [0, 1, 2]
        assert all(s["connections"] >= 1 for s in shards)
        assert info["result"]["connections"] >= 3 and info["result"]["broker"] == "shm"
        assert info["result"]["boxes"] == 1
        _, sent = call(server.port, "broadcast", {"rooms": ["list.0", "list.1"], "content": "b"})
        assert [r["room"] for r in sent["result"]["replies"]] == ["list.0", "list.1"]
        assert all(r["result"]["seq"] == 1 for r in sent["result"]["replies"])
        for i in (0, 1):
            frame = await members[i].recv_type("message")
            assert (frame["room"], frame["content"]) == (f"list.{i}", "b")
        _, batch = call(
            server.port,
            "batch",
            {
                "commands": [
                    {"method": "publish", "params": {"room": "list.2", "content": "x"}},
                    {"method": "publish", "params": {"room": "bad room", "content": "x"}},
                    {"method": "presence_stats", "params": {"room": "list.all"}},
                ]
            },
        )
        replies = batch["result"]["replies"]
        assert replies[0]["result"]["seq"] == 1
        assert replies[1]["error"]["code"] == "bad_request"
        assert "commands[1].params.room" in replies[1]["error"]["message"]
        assert replies[2]["result"] == {"room": "list.all", "users": 1, "connections": 3}


def _head_refusals() -> list[tuple[str, bytes, int, dict[str, Any]]]:
    """Refusals of the request's head: answered, then the connection closes."""

    def err(code: str, message: str) -> dict[str, Any]:
        return {"error": {"code": code, "message": message}}

    unauthorized = err("unauthorized", "a valid API key is required (X-API-Key)")
    return [
        ("no key", request("info", b"{}", key=None), 401, unauthorized),
        ("wrong key", request("info", b"{}", key="x" * 23), 401, unauthorized),
        (
            "GET",
            request("info", b"", verb="GET"),
            405,
            err("method_not_allowed", "use POST"),
        ),
        (
            "over max_frame",
            request("publish", b"x" * 9000),
            413,
            err("too_large", "the body is over 8192 bytes"),
        ),
    ]


def _body_refusals() -> list[tuple[str, str, bytes, int, dict[str, Any]]]:
    """Refusals of the request's body: answered, and the connection goes on."""

    def err(code: str, message: str) -> dict[str, Any]:
        return {"error": {"code": code, "message": message}}

    return [
        ("unknown method", "nope", b"{}", 404, err("not_found", "no such method: 'nope'")),
        (
            "not JSON",
            "publish",
            b"{room",
            400,
            err(
                "bad_json",
                "malformed JSON: unexpected character, expected a string key:"
                " line 1 column 2 (char 1)",
            ),
        ),
        (
            "not an object",
            "publish",
            b"[1]",
            400,
            err("bad_request", "the body must be a JSON object"),
        ),
        (
            "missing field",
            "publish",
            b'{"room": "r"}',
            400,
            err("bad_request", "content is required"),
        ),
        (
            "wrong type",
            "history",
            b'{"room": "r", "limit": "ten"}',
            400,
            err("bad_request", "limit must be an integer from 0 to 1000"),
        ),
        (
            "unknown field",
            "publish",
            b'{"room": "r", "content": "c", "channel": "r"}',
            400,
            err("bad_request", "channel is not a field of this method"),
        ),
        (
            "bad room name",
            "publish",
            b'{"room": "no spaces", "content": "c"}',
            400,
            err("bad_request", "room must be 1-64 characters of [A-Za-z0-9_.:-]"),
        ),
        (
            "bad user name",
            "disconnect",
            b'{"user": "a/b"}',
            400,
            err("bad_request", "user must be 1-64 characters of [A-Za-z0-9_.:-]"),
        ),
    ]


async def test_every_refusal_is_exact_and_a_neighbour_on_that_shard_sees_nothing(
    server: Server,
) -> None:
    good, publisher, task = await good_neighbour(server.url, 1, "calm")
    # The room full of ROOM_SIZE users: a subscribe of one more is refused.
    full = [await connect_client(server.url, user=f"full{i}") for i in range(ROOM_SIZE)]
    outsider = await connect_client(server.url, user="outsider")
    async with closing([*full, outsider]):
        for client in full:
            await client.join("crowded")
        for name, raw, status, body in _head_refusals():
            http = on_shard(server.port, 1)
            try:
                http.send(raw)
                got_status, headers, got = http.answer()
                assert (got_status, json.loads(got)) == (status, body), name
                check_answer("info", got_status, json.loads(got))
                assert headers["connection"] == "close" and headers["content-type"] == (
                    "application/json"
                )
                if status == 405:
                    assert headers["allow"] == "POST"
                assert http.closed(), name
            finally:
                http.close()
        http = on_shard(server.port, 1)
        try:
            for name, method, raw, status, body in _body_refusals():
                assert http.call(method, raw=raw) == (status, body), name
            assert http.call("subscribe", {"user": "outsider", "room": "crowded"}) == (
                409,
                {"error": {"code": "room_full", "message": "room crowded has 3 users"}},
            )
            # The same connection still serves.
            assert http.call("presence_stats", {"room": "crowded"})[1]["result"]["users"] == 3
        finally:
            http.close()
    await check_neighbour(good, publisher, task)
    refused = [e for e in server.log_events() if e.get("event") == "api_refused"]
    codes = {e["code"] for e in refused}
    assert codes >= {"unauthorized", "method_not_allowed", "too_large", "not_found"}
    assert codes >= {"bad_json", "bad_request", "room_full"}
    assert_no_traceback(server)


def test_keep_alive_and_pipelined_requests_are_answered_in_order(server: Server) -> None:
    http = Http(server.port)
    try:
        http.send(
            request("publish", b'{"room": "pipe", "content": "1"}')
            + request("publish", b'{"room": "pipe", "content": "2"}')
            + request("nope", b"")
            + request("history", b'{"room": "pipe"}')
        )
        answers = [http.answer() for _ in range(4)]
        for method, (status, _, body) in zip(
            ["publish", "publish", "nope", "history"], answers, strict=True
        ):
            check_answer(method, status, json.loads(body))
        assert [a[0] for a in answers] == [200, 200, 404, 200]
        assert [json.loads(a[2])["result"]["seq"] for a in answers[:2]] == [1, 2]
        messages = json.loads(answers[3][2])["result"]["messages"]
        assert [m["content"] for m in messages] == ["1", "2"]
        assert "connection" not in answers[3][1]  # still open
        # A flood past what is held while one is answered (64 KiB): reading pauses,
        # resumes, and every request is answered, in order.
        flood = 1500
        http.send(b"".join(request("publish", b'{"room": "pipe", "content": "f"}')
                           for _ in range(flood)))  # fmt: skip
        seqs = [json.loads(http.answer()[2])["result"]["seq"] for _ in range(flood)]
        assert seqs == list(range(3, 3 + flood))
    finally:
        http.close()


def test_pipelined_publishes_are_answered_in_order_when_they_finish_out_of_order(
    server: Server,
) -> None:
    # On shard 1, a publish to shard 0's room waits for the owner's ring; one to
    # shard 1's own room is acked at the end of the turn: its answer waits.
    far, near = room_owned_by(0, 3, "far"), room_owned_by(1, 3, "near")
    http = on_shard(server.port, 1)
    try:
        rounds = 50
        http.send(
            b"".join(
                request("publish", json.dumps({"room": room, "content": str(i)}).encode())
                for i in range(rounds)
                for room in (far, near)
            )
        )
        answers = [json.loads(http.answer()[2])["result"]["seq"] for _ in range(2 * rounds)]
        assert answers == [i // 2 + 1 for i in range(2 * rounds)]
    finally:
        http.close()


def test_the_python_client_raises_the_class_of_each_code(server: Server) -> None:
    url = f"http://127.0.0.1:{server.port}"
    with ApiClient(url, KEY) as api:
        assert api.publish("pyclient", "a")["seq"] == 1
        assert api.publish("pyclient", "b", key="k")["seq"] == 2
        assert api.history("pyclient", limit=1)["messages"][0]["content"] == "b"
        with pytest.raises(ApiBadRequest, match="room must be"):
            api.publish("no spaces", "x")
        with pytest.raises(ApiNotFound):
            api.call("nope")
        replies = api.batch(
            [("publish", {"room": "pyclient", "content": "c"}), ("publish", {"room": "x"})]
        )
        assert replies[0] == {"seq": 3, "epoch": replies[0]["epoch"]}
        assert isinstance(replies[1], ApiBadRequest)
        assert replies[1].message == "commands[1].params.content is required"
        with pytest.raises(ApiBadRequest, match=r"commands\[0\].method"):
            api.batch([("nope", {})])
    with ApiClient(url, "y" * 20) as api, pytest.raises(ApiUnauthorized):
        api.info()


async def test_the_asyncio_client(server: Server) -> None:
    async with AsyncApiClient(f"http://127.0.0.1:{server.port}", KEY) as api:
        first = await api.publish("aio", "a")
        results = [await api.publish("aio", str(i)) for i in range(3)]
        assert [r["seq"] for r in results] == [2, 3, 4] and first["seq"] == 1
        assert (await api.presence_stats("aio"))["users"] == 0
        with pytest.raises(ApiBadRequest):
            await api.subscribe("x y", "aio")


def test_api_metrics(server: Server) -> None:
    call(server.port, "publish", {"room": "metered", "content": "m"})
    call(server.port, "publish", {"room": "metered"})
    url = f"http://127.0.0.1:{server.admin_port}/metrics"
    text = urllib.request.urlopen(url, timeout=scaled(5)).read().decode()
    lines = dict(
        line.rsplit(" ", 1) for line in text.splitlines() if line.startswith("shardchat_api_")
    )
    assert float(lines['shardchat_api_calls_total{method="publish",outcome="ok"}']) >= 1
    assert float(lines['shardchat_api_calls_total{method="publish",outcome="refused"}']) >= 1
    assert float(lines['shardchat_api_refused_total{code="bad_request"}']) >= 1
    assert float(lines["shardchat_api_latency_seconds_count"]) >= 2


def test_off_without_a_key_and_only_on_its_own_port_with_one() -> None:
    with running_server(2, ["storage.kind=memory"]) as off:
        status, body = call(off.port, "info")
        assert (status, body["error"]) == (
            404,
            {"code": "not_found", "message": "the server API is off (api.key is not set)"},
        )
    from tests.support.helpers import free_port

    port = free_port()
    # One forward in flight per shard at most: a broadcast to another shard's rooms
    # meets the bound (admission control, as for the WebSocket's publishes).
    settings = [
        "api.host=127.0.0.1",
        f"api.port={port}",
        "overload.forwards=1",
        "heartbeat.idle_timeout=1",
        "heartbeat.interval=0.5",
        "heartbeat.timeout=0.5",
    ]
    with running_server(2, settings, env={"SHARDCHAT_API_KEY": KEY}) as own:
        assert call(port, "publish", {"room": "own", "content": "x"})[0] == 200
        status, body = call(own.port, "publish", {"room": "own", "content": "x"})
        assert (status, body["error"]["code"]) == (404, "not_found")
        assert "its own port" in body["error"]["message"]
        rooms = [room_owned_by(s, 2, f"busy{s}-{i}-") for s in (0, 1) for i in range(10)]
        status, body = call(port, "broadcast", {"rooms": rooms, "content": "x"})
        replies = body["result"]["replies"]
        refused = [r["error"] for r in replies if "error" in r]
        assert status == 200 and len(refused) >= 9, replies
        assert {e["code"] for e in refused} == {"overloaded"}
        assert all(e["retry_after"] == 1.0 for e in refused)
        assert all(r["result"]["seq"] == 1 for r in replies if "result" in r)
        # A keep-alive connection left idle past heartbeat.idle_timeout is closed.
        idle = Http(port)
        try:
            assert idle.call("info")[0] == 200
            idle.sock.settimeout(scaled(5))
            assert idle.closed()
        finally:
            idle.close()


def test_the_command_line(server: Server) -> None:
    import os
    import subprocess

    from tests.support.helpers import SHARDCHAT

    env = {**os.environ, "SHARDCHAT_API_KEY": KEY}
    args = [SHARDCHAT, "api", "--port", str(server.port)]
    done = subprocess.run(
        [*args, "publish", "room=cli", "content=deploy at 5", "key=d5"],
        capture_output=True, text=True, env=env, timeout=scaled(20),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["seq"] == 1
    done = subprocess.run(
        [*args, "history", "room=cli", "limit=1"],
        capture_output=True, text=True, env=env, timeout=scaled(20),
    )  # fmt: skip
    assert json.loads(done.stdout)["messages"][0]["content"] == "deploy at 5"
    done = subprocess.run(
        [*args, "publish", "room=no spaces", "content=x"],
        capture_output=True, text=True, env=env, timeout=scaled(20),
    )  # fmt: skip
    assert done.returncode == 1
    assert "bad_request: room must be 1-64 characters" in done.stderr


def test_a_client_that_expects_100_continue_gets_it_before_sending_the_body(
    server: Server,
) -> None:
    http = Http(server.port)
    try:
        body = json.dumps({"room": "big", "content": "c" * 2000}).encode()
        # The head alone, with the Content-Length of the body to come.
        head = (
            f"POST /api/publish HTTP/1.1\r\nHost: x\r\nX-API-Key: {KEY}\r\n"
            f"Expect: 100-continue\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        http.send(head)
        status, _, _ = http.answer()
        assert status == 100
        http.send(body)
        status, _, answer = http.answer()
        assert status == 200 and json.loads(answer)["result"]["seq"] == 1
    finally:
        http.close()


def test_a_request_h11_cannot_parse_is_answered_400_and_closed(server: Server) -> None:
    for raw in (
        b"POST /api/publish HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
        b"POST /api/publish HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
        b"POST /api/publish HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
    ):
        http = Http(server.port)
        try:
            http.send(raw)
            status, headers, body = http.answer()
            assert (status, json.loads(body)) == (
                400,
                {"error": {"code": "bad_request", "message": "not valid HTTP/1.1"}},
            ), raw
            assert headers["connection"] == "close" and http.closed()
        finally:
            http.close()
    assert_no_traceback(server)
