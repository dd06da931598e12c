"""Presence across shards: the same view everywhere, one join and one leave per user,
and a killed shard's users leave everywhere."""

from __future__ import annotations

import asyncio
import os
import signal
from typing import Any

from tests.support.helpers import (
    Client,
    Server,
    clients_on_shards,
    closing,
    connect_client,
    room_owned_by,
    running_server,
)


async def presence_of(client: Client, room: str) -> dict[str, Any]:
    return await client.request("presence", "presence", room=room)


async def wait_for_count(client: Client, room: str, count: int) -> dict[str, Any]:
    """Ask until the shard's view has ``count`` users (presence crosses the rings)."""
    for _ in range(2000):
        reply = await presence_of(client, room)
        if reply["count"] == count:
            return reply
    raise AssertionError(f"presence of {room} never reached {count}: {reply}")


async def events(client: Client, kinds: tuple[str, ...], until: int) -> list[dict[str, Any]]:
    """Presence events, those passed over by earlier requests first."""
    got = [f for f in client.dropped if f["type"] in kinds]
    client.dropped.clear()
    while len(got) < until:
        frame = await client.recv(10)
        if frame["type"] in kinds:
            got.append(frame)
    return got


async def test_presence_is_the_same_from_every_shard(server: Server) -> None:
    clients = await clients_on_shards(server.url, [0, 1, 2, 0, 1, 2], prefix="pv")
    async with closing(clients):
        for client in clients:
            await client.join("pview")
        views = [await wait_for_count(c, "pview", 6) for c in clients]
        users = {c.user for c in clients}
        for view in views:
            assert set(view["users"]) == users and "truncated" not in view
        joined = await clients[0].join("pview2")
        assert joined["count"] == 1 and joined["users"] == [clients[0].user]


async def test_presence_list_limit_truncates() -> None:
    with running_server(workers=2, settings=["presence.list_limit=3"]) as srv:
        clients = [await connect_client(srv.url, user=f"t{i}", rooms=["big"]) for i in range(5)]
        async with closing(clients):
            reply = await wait_for_count(clients[0], "big", 5)
            assert len(reply["users"]) == 3 and reply["truncated"] is True


async def test_two_connections_of_one_user_join_once_and_leave_once(server: Server) -> None:
    """A user present through connections on two shards: one join event on the first,
    one leave event on the last."""
    (watcher,) = await clients_on_shards(server.url, [0], prefix="watch")
    async with closing([watcher]):
        await watcher.join("twice")
        first = await clients_on_shards(server.url, [1], prefix="twin")
        twin_user = first[0].user
        await first[0].join("twice")
        second = None
        for _ in range(300):
            candidate = await connect_client(server.url, user=twin_user)
            if candidate.shard == 2:
                second = candidate
                break
            await candidate.close()
        assert second is not None
        await second.join("twice")
        await wait_for_count(watcher, "twice", 2)
        await first[0].close()
        await second.request("ping", "pong")
        await second.close()
        seen = await events(watcher, ("join", "leave"), 2)
        assert [(e["type"], e["sender"]) for e in seen] == [
            ("join", twin_user),
            ("leave", twin_user),
        ]
        await wait_for_count(watcher, "twice", 1)


async def test_killed_shard_users_leave_everywhere() -> None:
    """kill -9 of a shard: the other shards send leave events for exactly its users."""
    with running_server(workers=3) as srv:
        watchers = await clients_on_shards(srv.url, [0, 2], prefix="w")
        doomed = await clients_on_shards(srv.url, [1, 1, 1], prefix="doomed")
        async with closing([*watchers, *doomed]):
            for client in (*watchers, *doomed):
                await client.join("crash")
            for watcher in watchers:
                await wait_for_count(watcher, "crash", 5)
                await asyncio.sleep(0)
            os.kill(srv.shard_pids()[1], signal.SIGKILL)
            for watcher in watchers:
                left = await events(watcher, ("leave",), 3)
                assert {e["sender"] for e in left} == {c.user for c in doomed}
                assert all(e["room"] == "crash" for e in left)
                reply = await wait_for_count(watcher, "crash", 2)
                assert set(reply["users"]) == {w.user for w in watchers}
            srv.wait_started(4)
            (fresh,) = await clients_on_shards(srv.url, [1], prefix="fresh")
            async with closing([fresh]):
                # The restarted shard learns who is here from its peers' snapshots.
                reply = await wait_for_count(fresh, "crash", 2)
                assert set(reply["users"]) == {w.user for w in watchers}


async def test_no_presence_events_in_rooms_over_events_limit() -> None:
    with running_server(workers=2, settings=["presence.events_limit=2"]) as srv:
        a = await connect_client(srv.url, user="ea", rooms=["quiet"])
        b = await connect_client(srv.url, user="eb", rooms=["quiet"])
        async with closing([a, b]):
            await wait_for_count(a, "quiet", 2)
            c = await connect_client(srv.url, user="ec", rooms=["quiet"])
            await wait_for_count(a, "quiet", 3)
            await c.close()
            await wait_for_count(a, "quiet", 2)
            await a.send(type="ping", id="end")
            frames = []
            while True:
                frame = await a.recv()
                if frame["type"] == "pong":
                    break
                frames.append(frame)
            kinds = [(f["type"], f.get("sender")) for f in frames if f["type"] in ("join", "leave")]
            assert ("join", "ec") not in kinds and ("leave", "ec") not in kinds


async def test_owner_held_presence_is_exact_on_non_holders_and_survives_an_owner_kill() -> None:
    """4 shards: a room's presence is held by its owner (0) and its replica (1) only;
    members on shards 2 and 3 ask for it. Their joined.users and the events after it
    equal the presence reply, each event comes once and never about oneself, and
    after kill -9 of the owner its users leave everywhere."""
    workers = 4
    room = room_owned_by(0, workers, "held")
    with running_server(workers=workers) as srv:
        watcher, other = await clients_on_shards(srv.url, [2, 3], prefix="hw")
        doomed = await clients_on_shards(srv.url, [0, 0], prefix="hd")
        members = [watcher, other, *doomed]
        async with closing(members):
            beliefs: dict[str, set[str]] = {}
            for client in members:
                joined = await client.join(room)
                assert client.user in joined["users"] and joined["count"] == len(joined["users"])
                beliefs[client.user] = set(joined["users"])
            everyone = {c.user for c in members}
            for client in (watcher, other):
                reply = await presence_of(client, room)  # after the events before it
                seen = [f for f in client.dropped if f["type"] in ("join", "leave")]
                client.dropped.clear()
                senders = [f["sender"] for f in seen]
                assert len(senders) == len(set(senders)) and client.user not in senders
                assert all(f["type"] == "join" for f in seen)
                assert beliefs[client.user] | set(senders) == set(reply["users"]) == everyone
            os.kill(srv.shard_pids()[0], signal.SIGKILL)
            # The restarted owner learns from its replica what members were told,
            # and emits the dead shard's users' leaves.
            for client in (watcher, other):
                left = await events(client, ("leave",), 2)
                assert sorted(e["sender"] for e in left) == sorted(d.user for d in doomed)
            srv.wait_started(workers + 1)
            (fresh,) = await clients_on_shards(srv.url, [0], prefix="hf")
            async with closing([fresh]):
                joined = await fresh.join(room)
                assert set(joined["users"]) == {watcher.user, other.user, fresh.user}
                for client in (watcher, other):
                    (event,) = await events(client, ("join",), 1)
                    assert event["sender"] == fresh.user
                    reply = await presence_of(client, room)
                    assert set(reply["users"]) == {watcher.user, other.user, fresh.user}
