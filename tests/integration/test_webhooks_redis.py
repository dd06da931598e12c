"""Webhooks across boxes on a real Redis: room_occupied/room_vacated once over the
service, and a killed box's users' leave and disconnect reported once, by a
survivor, within presence.ttl + 1 s."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

from examples.backend import Backend
from shardchat.testing.wait import await_until
from tests.support.helpers import (
    Server,
    cleanup_server,
    clients_on_shards,
    closing,
    connect_client,
    kill_server,
    scaled,
    start_servers,
)
from tests.support.redis_helpers import RedisServer
from tests.support.webhooks import backend, hook_settings

TTL = 1.0


def settings(redis: RedisServer, prefix: str, receiver: Backend) -> list[str]:
    return [
        "broker.kind=redis",
        f"redis.url={redis.url}",
        f"redis.prefix={prefix}",
        f"presence.ttl={TTL}",
        *hook_settings(receiver),
    ]


@contextlib.contextmanager
def boxes(*settings: tuple[int, list[str]]) -> Iterator[list[Server]]:
    """Boxes started side by side (a Redis box takes a second or two to start)."""
    started = start_servers(settings)
    try:
        yield started
    finally:
        for box in started:
            cleanup_server(box)


def of(receiver: Backend, kind: str, users: set[str]) -> list[tuple[str, str | None]]:
    return sorted((e["user"], e.get("room")) for e in receiver.of_type(kind) if e["user"] in users)


async def test_occupancy_is_decided_in_redis_once_over_the_boxes(
    redis: RedisServer, prefix: str
) -> None:
    with (
        backend() as receiver,
        boxes((1, settings(redis, prefix, receiver)), (1, settings(redis, prefix, receiver))) as (
            one,
            two,
        ),
    ):
        a = await connect_client(one.url, user="a")
        b = await connect_client(two.url, user="b")
        async with closing([a, b]):

            def rooms() -> list[str]:
                with receiver.lock:
                    events = sorted(receiver.events.values(), key=lambda e: e["time"])
                return [e["type"] for e in events if e["type"].startswith("room_")]

            await a.join("x")
            await await_until(lambda: rooms() == ["room_occupied"], 10, "occupied")
            await b.join("x")
            await a.request("leave", "left", room="x")
            # b stays: a's leave did not empty the room anywhere.
            await b.request("leave", "left", room="x")
            await await_until(lambda: len(rooms()) == 2, 10, "vacated")
            await b.join("x")  # a new occupation, from the other box
            await await_until(lambda: len(rooms()) == 3, 10, "occupied again")
            await b.request("leave", "left", room="x")
            await await_until(lambda: len(rooms()) == 4, 10, "vacated again")
            assert rooms() == ["room_occupied", "room_vacated"] * 2
            events = [e for e in receiver.events.values() if e["type"].startswith("room_")]
            users = [e["user"] for e in sorted(events, key=lambda e: e["time"])]
            assert users[0] == "a" and users[2] == "b"  # who filled it, each time


async def test_a_killed_box_is_reported_once_by_a_survivor(redis: RedisServer, prefix: str) -> None:
    with (
        backend() as receiver,
        boxes((1, settings(redis, prefix, receiver)), (2, settings(redis, prefix, receiver))) as (
            doomed,
            survivor,
        ),
    ):
        # Both survivor shards hold the room: they race to report, one wins each.
        watchers = await clients_on_shards(survivor.url, [0, 1], prefix="w")
        ghosts = [await connect_client(doomed.url, user=f"ghost{i}") for i in range(2)]
        async with closing([*watchers, *ghosts]):
            for client in [*watchers, *ghosts]:
                await client.join("shared")
            for ghost in ghosts:
                await ghost.join("ghosts")
            await watchers[0].join("ghosts")
            users = {g.user for g in ghosts}
            await await_until(
                lambda: len(of(receiver, "join", users)) == 4, 10, "the ghosts' joins"
            )
            killed = time.time()
            kill_server(doomed)
            expected_leaves = sorted((u, r) for u in users for r in ("ghosts", "shared"))

            def reported() -> bool:
                return of(receiver, "leave", users) == expected_leaves and of(
                    receiver, "disconnect", users
                ) == sorted((u, None) for u in users)

            await await_until(reported, TTL + 5, "the dead box's users reported")
            # Reported (the survivor's event time) within presence.ttl + 1 s of the kill.
            deaths = [
                e
                for e in receiver.events.values()
                if e["user"] in users and e["type"] in ("leave", "disconnect")
            ]
            took = max(e["time"] / 1000 for e in deaths) - killed
            assert took < scaled(TTL + 1), took
            # Once: no second report came, by id nor by content.
            assert receiver.duplicates == 0
            await_end = time.monotonic() + scaled(0.5)
            while time.monotonic() < await_end:
                assert of(receiver, "leave", users) == expected_leaves
                assert len(of(receiver, "disconnect", users)) == 2
                time.sleep(0.05)
            for event in receiver.of_type("disconnect"):
                if event["user"] in users:
                    assert event["code"] == 1006 and event["reason"] == "box died"
                    assert event["reported_by"] != event["box"]
            for event in receiver.of_type("leave"):
                if event["user"] in users:
                    assert event["reason"] == "box_died"
