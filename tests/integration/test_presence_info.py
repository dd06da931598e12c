"""Presence info: the connect proxy's ``info`` for a user, in ``presence``, ``joined``
and the server API's ``presence``, across shards; a bad info refused with 503."""

from __future__ import annotations

import json
from typing import Any

from websockets.asyncio.client import connect

from examples.backend import Backend
from shardchat.testing.wait import await_until
from tests.integration.test_proxy import backend, refused
from tests.support.api import KEY, call
from tests.support.helpers import (
    Client,
    assert_no_traceback,
    cleanup_server,
    running_server,
    scaled,
    start_servers,
)
from tests.support.redis_helpers import RedisServer

ADA = {"name": "Ada", "role": "admin"}
BOB = {"name": "Bob", "tags": ["x", 1]}


async def on_shard(url: str, user: str, shard: int, tries: int = 200) -> Client:
    """A connection of ``user`` (its session cookie) on ``shard`` (the kernel picks)."""
    for _ in range(tries):
        ws = await connect(
            url, additional_headers={"Cookie": f"session={user}"}, open_timeout=scaled(10)
        )
        client = Client(ws, json.loads(await ws.recv()))
        if client.shard == shard:
            return client
        await client.close()
    raise AssertionError(f"no connection of {user} landed on shard {shard}")


async def asked(client: Client, room: str) -> dict[str, Any]:
    return await client.request("presence", "presence", room=room)


async def test_info_is_shown_in_presence_from_a_third_shard_and_in_the_api() -> None:
    app: Backend
    with (
        backend() as app,
        running_server(
            3, [f"proxy.connect_url={app.url('/connect')}"], env={"SHARDCHAT_API_KEY": KEY}
        ) as srv,
    ):
        app.infos.update({"ada": ADA, "bob": BOB, "carl": None, "dave": None})
        ada = await on_shard(srv.url + "?room=lobby", "ada", 0)
        bob = await on_shard(srv.url + "?room=lobby", "bob", 1)
        carl = await on_shard(srv.url + "?room=lobby&room=plain", "carl", 2)
        assert {ada.shard, bob.shard, carl.shard} == {0, 1, 2}
        want = {"ada": ADA, "bob": BOB}

        async def shows(info: dict[str, Any], users: set[str]) -> bool:
            answer = await asked(carl, "lobby")
            return answer.get("info") == info and set(answer["users"]) == users

        await await_until(
            lambda: shows(want, {"ada", "bob", "carl"}), 5, "ada's and bob's info from shard 2"
        )
        # A late joiner sees it in its joined; nobody has info in "plain": no field.
        dave = await on_shard(srv.url + "?room=lobby&room=plain", "dave", 2)
        joined = [await dave.recv_type("joined") for _ in range(2)]
        by_room = {j["room"]: j for j in joined}
        assert by_room["lobby"]["info"] == want
        assert "info" not in by_room["plain"]
        plain = await asked(carl, "plain")
        assert set(plain) == {"type", "room", "count", "users"}
        assert sorted(plain["users"]) == ["carl", "dave"]

        # The server API's presence, gathered from every shard.
        status, answer = call(srv.port, "presence", {"room": "lobby"})
        assert status == 200 and answer["result"]["info"] == want
        status, answer = call(srv.port, "presence", {"room": "plain"})
        assert status == 200 and "info" not in answer["result"]

        # A later join of ada with other info: the latest join's wins.
        app.infos["ada"] = {"name": "Ada again"}
        ada2 = await on_shard(srv.url + "?room=lobby", "ada", 0)
        await ada2.recv_type("joined")
        newer = {"ada": {"name": "Ada again"}, "bob": BOB}
        everyone = {"ada", "bob", "carl", "dave"}
        await await_until(lambda: shows(newer, everyone), 5, "ada's latest info")
        status, answer = call(srv.port, "presence", {"room": "lobby"})
        assert answer["result"]["info"] == newer

        # Bob leaves: his info goes with him.
        await bob.close()
        await await_until(
            lambda: shows({"ada": {"name": "Ada again"}}, everyone - {"bob"}), 5, "bob gone"
        )

        # An info that is not an object, or over 1 KiB: refused, 503, a clear reason.
        app.infos["eve"] = ["not", "an", "object"]
        status, text = await refused(srv.url, Cookie="session=eve")
        assert status == 503 and "info that is not an object" in text
        app.infos["fay"] = {"big": "x" * 1100}
        status, text = await refused(srv.url, Cookie="session=fay")
        assert status == 503 and "info over 1024 bytes" in text
        # Nothing else was lost.
        answer = await asked(carl, "lobby")
        assert sorted(answer["users"]) == ["ada", "carl", "dave"]
        assert (await ada.request("ping", "pong", id="p"))["id"] == "p"
        for client in (ada, ada2, carl, dave):
            await client.close()
        assert_no_traceback(srv)


async def test_info_crosses_boxes_on_redis(redis: RedisServer, prefix: str) -> None:
    """Two boxes on one Redis: ada on one, bob on the other; carl, on another shard
    of bob's box, opens the room after them (its presence read from Redis) and sees
    both infos; the API's presence from ada's box shows them too."""
    app: Backend
    with backend() as app:
        settings = [
            "broker.kind=redis",
            f"redis.url={redis.url}",
            f"redis.prefix={prefix}",
            f"proxy.connect_url={app.url('/connect')}",
        ]
        env = {"SHARDCHAT_API_KEY": KEY}
        started = start_servers([(1, settings), (2, settings)], env)
        try:
            one, two = started
            app.infos.update({"ada": ADA, "bob": BOB, "carl": None})
            ada = await on_shard(one.url + "?room=lobby", "ada", 0)
            await ada.recv_type("joined")
            bob = await on_shard(two.url + "?room=lobby", "bob", 0)
            await bob.recv_type("joined")
            want = {"ada": ADA, "bob": BOB}

            async def shows(client: Client) -> bool:
                answer = await asked(client, "lobby")
                return answer.get("info") == want and len(answer["users"]) == 3

            carl = await on_shard(two.url + "?room=lobby", "carl", 1)
            await await_until(lambda: shows(carl), 5, "both infos on box two's other shard")
            await await_until(lambda: shows(ada), 5, "both infos on box one")

            def api_shows() -> bool:
                status, answer = call(one.port, "presence", {"room": "lobby"})
                return status == 200 and answer["result"].get("info") == want

            await await_until(api_shows, 5, "both infos in the API's presence")
            # Bob leaves: gone from the other box's answer, with his info.
            await bob.close()
            await await_until(lambda: _is(ada, {"ada": ADA}, ["ada", "carl"]), 5, "bob's info gone")
            for client in (ada, carl):
                await client.close()
            for box in started:
                assert_no_traceback(box)
        finally:
            for box in started:
                cleanup_server(box)


async def _is(client: Client, info: dict[str, Any], users: list[str]) -> bool:
    answer = await asked(client, "lobby")
    return answer.get("info") == info and sorted(answer["users"]) == users
