"""The server API across boxes: two real servers joined by a real redis-server.

A call on box A acts on connections on box B: a publish reaches B's members in
the room's one order, a disconnect closes B's connections; presence, rooms and
info gather every node's share. With Redis stopped, a publish is refused
``unavailable`` (503) and the WebSocket clients stay connected.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from websockets.exceptions import ConnectionClosed

from shardchat.testing.wait import await_until
from tests.support.api import KEY, call
from tests.support.helpers import (
    FAST,
    Server,
    clients_on_shards,
    closing,
    collect,
    connect_client,
    running_server,
)
from tests.support.redis_helpers import RedisServer, delete_prefix, redis_server


@pytest.fixture(scope="module")
def boxes(redis: RedisServer) -> Iterator[tuple[Server, Server]]:
    prefix = f"api{os.getpid()}:"
    settings = [
        "broker.kind=redis",
        f"redis.url={redis.url}",
        f"redis.prefix={prefix}",
        "presence.ttl=3",
        *FAST,
    ]
    env = {"SHARDCHAT_API_KEY": KEY}
    try:
        with (
            running_server(2, settings, env=env) as one,
            running_server(2, settings, env=env) as two,
        ):
            yield one, two
    finally:
        delete_prefix([redis], prefix)


async def test_a_publish_on_box_a_reaches_box_b_in_order(boxes: tuple[Server, Server]) -> None:
    a, b = boxes
    members = await clients_on_shards(b.url, [0, 1], prefix="member")
    writer = await connect_client(a.url, user="writer")
    async with closing([*members, writer]):
        for client in [*members, writer]:
            await client.join("across")
        for i in range(5):
            await writer.request("message", "ack", room="across", content=f"ws{i}")
            status, answer = call(a.port, "publish", {"room": "across", "content": f"api{i}"})
            assert status == 200 and answer["result"]["seq"] == 2 * i + 2
        expected = [c for i in range(5) for c in (f"ws{i}", f"api{i}")]
        for member in members:
            got = await collect(member, "across", 10, timeout=5)
            assert [m["content"] for m in got] == expected
            assert [m["seq"] for m in got] == list(range(1, 11))
        # Presence, rooms and info gather every node of both boxes.
        _, presence = call(a.port, "presence_stats", {"room": "across"})
        assert presence["result"] == {"room": "across", "users": 3, "connections": 3}
        _, rooms = call(b.port, "rooms", {"pattern": "across"})
        assert rooms["result"]["rooms"] == [{"room": "across", "users": 3, "connections": 3}]
        _, info = call(a.port, "info")
        assert len(info["result"]["shards"]) == 4 and info["result"]["broker"] == "redis"
        assert info["result"]["boxes"] == 2
        assert info["result"]["broker_up"] is True
        _, history = call(b.port, "history", {"room": "across"})
        assert [m["content"] for m in history["result"]["messages"]] == expected


async def test_a_disconnect_on_box_a_closes_the_users_connections_on_box_b(
    boxes: tuple[Server, Server],
) -> None:
    a, b = boxes
    on_b = [await connect_client(b.url, user="roamer") for _ in range(2)]
    on_a = await connect_client(a.url, user="roamer")
    other = await connect_client(b.url, user="stayer")
    async with closing([*on_b, on_a, other]):
        # A subscribe on box A joins the user's connections on both boxes.
        assert call(a.port, "subscribe", {"user": "roamer", "room": "roaming"})[0] == 200
        for conn in [*on_b, on_a]:
            assert (await conn.recv_type("joined"))["room"] == "roaming"
        _, stats = call(b.port, "presence_stats", {"room": "roaming"})
        assert stats["result"] == {"room": "roaming", "users": 1, "connections": 3}
        assert call(a.port, "disconnect", {"user": "roamer", "reason": "bye"})[0] == 200
        for conn in [*on_b, on_a]:
            with pytest.raises(ConnectionClosed):
                await conn.recv(5)
            assert (conn.ws.close_code, conn.ws.close_reason) == (4403, "bye")
        assert (await other.request("ping", "pong"))["type"] == "pong"


async def test_with_redis_stopped_a_publish_is_unavailable_and_clients_stay() -> None:
    with redis_server() as redis:
        settings = ["broker.kind=redis", f"redis.url={redis.url}", "redis.prefix=down:", *FAST]
        with running_server(2, settings, env={"SHARDCHAT_API_KEY": KEY}) as box:
            member = await connect_client(box.url, user="member")
            async with closing([member]):
                await member.join("down")
                assert call(box.port, "publish", {"room": "down", "content": "up"})[0] == 200
                redis.stop()
                answers: list[tuple[int, object]] = []

                def refused() -> bool:
                    answers.append(call(box.port, "publish", {"room": "down", "content": "x"}))
                    return answers[-1][0] == 503

                await await_until(refused, 10, "a publish refused while Redis is down")
                status, body = answers[-1]
                assert body == {
                    "error": {
                        "code": "unavailable",
                        "message": "room down: the message is not known to be published (its"
                        " broker did not confirm it); retrying with the same key is safe",
                    }
                }
                assert (await member.request("ping", "pong"))["type"] == "pong"
