"""Webhooks: signed batches of connect, join, leave, disconnect, room_occupied and
room_vacated events, delivered at least once through a failing receiver, bounded
when the receiver never answers, and reported when a shard dies."""

from __future__ import annotations

import os
import signal

import standardwebhooks

from examples.backend import Backend
from shardchat.testing.wait import await_until, scaled
from tests.support.helpers import (
    FAST,
    assert_no_traceback,
    clients_on_shards,
    closing,
    connect_client,
    metric_sum,
    room_owned_by,
    running_server,
)
from tests.support.webhooks import SECRET, backend, hook_settings


def kinds(receiver: Backend, user: str) -> list[tuple[str, str | None]]:
    """``user``'s events in the order they arrived (one shard sends its events in
    the order they happened, one batch at a time)."""
    with receiver.lock:
        events = list(receiver.events.values())
    return [
        (e["type"], e.get("room"))
        for e in events
        if e["user"] == user and not e["type"].startswith("room_")
    ]


async def test_events_arrive_signed_and_verify_with_standardwebhooks() -> None:
    with backend() as receiver, running_server(2, hook_settings(receiver)) as srv:
        a, b = await clients_on_shards(srv.url, [0, 1], prefix="wh")
        room = room_owned_by(0, 2, "whroom")
        async with closing([a, b]):
            await a.join(room)
            await b.join(room)
            await b.request("leave", "left", room=room)
            await b.close()
            await await_until(
                lambda: ("disconnect", None) in kinds(receiver, b.user), 10, "b's disconnect"
            )
        await await_until(
            lambda: ("disconnect", None) in kinds(receiver, a.user), 10, "a's disconnect"
        )
        assert kinds(receiver, b.user) == [
            ("connect", None),
            ("join", room),
            ("leave", room),
            ("disconnect", None),
        ]
        assert kinds(receiver, a.user) == [
            ("connect", None),
            ("join", room),
            ("leave", room),
            ("disconnect", None),
        ]
        # Every batch verifies with the Standard Webhooks library itself.
        verifier = standardwebhooks.Webhook(SECRET)
        assert receiver.batches and receiver.bad_signatures == 0
        for headers, body in receiver.batches:
            assert isinstance(verifier.verify(body, headers), list)
        # The fields each event carries.
        leave = next(e for e in receiver.of_type("leave") if e["user"] == b.user)
        assert leave["shard"] == b.shard and leave["reason"] == "leave"
        assert isinstance(leave["conn"], int) and leave["box"] and leave["id"]
        gone = next(e for e in receiver.of_type("disconnect") if e["user"] == b.user)
        assert gone["code"] == 1000
        connect = next(e for e in receiver.of_type("connect") if e["user"] == a.user)
        assert connect["peer"] == "127.0.0.1" and connect["shard"] == a.shard
        assert_no_traceback(srv)


def occupancy(receiver: Backend, room: str) -> list[str]:
    """The room's occupancy events in the order they arrived (from one shard)."""
    with receiver.lock:
        events = list(receiver.events.values())
    return [e["type"] for e in events if e.get("room") == room and e["type"].startswith("room_")]


async def test_room_occupied_and_vacated_once_per_transition_at_the_owner() -> None:
    settings = hook_settings(receiver := Backend(SECRET).start())
    # Long enough for a leave and a join to come back within it, even on a busy box.
    settings[-1] = f"webhooks.vacated_grace={scaled(1.0)}"
    try:
        with running_server(3, settings) as srv:
            # The room's owner is shard 2; its members are on shards 0 and 1.
            room = room_owned_by(2, 3, "occ")
            a, b = await clients_on_shards(srv.url, [0, 1], prefix="oc")
            async with closing([a, b]):
                await a.join(room)
                await await_until(lambda: occupancy(receiver, room) == ["room_occupied"], 10, "occ")
                await b.join(room)
                await a.request("leave", "left", room=room)
                await b.request("leave", "left", room=room)
                await await_until(
                    lambda: len(occupancy(receiver, room)) == 2, 10, "the room vacated"
                )
                # Back at once (within the grace) after leaving: no event either way.
                await a.join(room)
                await a.request("leave", "left", room=room)
                await a.join(room)
                await await_until(lambda: len(occupancy(receiver, room)) == 3, 10, "occupied")
                await a.request("leave", "left", room=room)
                await await_until(lambda: len(occupancy(receiver, room)) == 4, 10, "vacated")
            assert occupancy(receiver, room) == ["room_occupied", "room_vacated"] * 2
            events = [e for e in receiver.events.values() if e["type"].startswith("room_")]
            assert {e["shard"] for e in events} == {2}  # told by the room's owner
            assert {e["user"] for e in events} == {a.user, b.user}
            assert_no_traceback(srv)
    finally:
        receiver.stop()


async def test_a_receiver_failing_for_3_s_gets_every_event_once() -> None:
    with (
        backend() as receiver,
        running_server(2, hook_settings(receiver, "webhooks.max_age=30")) as srv,
    ):
        receiver.fail_for(3.0)
        clients = [await connect_client(srv.url, user=f"r{i}", rooms=["retry"]) for i in range(4)]
        for client in clients:
            await client.recv_type("joined")
        for client in clients:
            await client.close()
        expected = {(kind, f"r{i}") for i in range(4) for kind in ("connect", "join", "leave")}
        expected |= {("disconnect", f"r{i}") for i in range(4)}

        def got() -> list[tuple[str, str]]:
            with receiver.lock:
                return [
                    (e["type"], e["user"])
                    for e in receiver.events.values()
                    if e["type"] not in ("room_occupied", "room_vacated")
                ]

        await await_until(lambda: set(got()) >= expected, 15, "every event after the failures")
        assert receiver.failed_posts >= 1  # it did fail, and the sender retried
        assert sorted(got()) == sorted(expected)  # each once: no event lost, none twice
        assert receiver.duplicates == 0
        assert metric_sum(srv, "shardchat_webhook_posts_failed_total") >= 1
        assert metric_sum(srv, "shardchat_webhook_events_dropped_total") == 0
        failing = [e for e in srv.log_events() if e.get("event") == "webhook_failing"]
        assert 1 <= len(failing) <= 2  # once per shard's burst, not once per retry
        assert_no_traceback(srv)


async def test_a_receiver_that_never_answers_costs_at_most_the_queue() -> None:
    with backend() as receiver:
        receiver.hang = True
        settings = hook_settings(
            receiver,
            *FAST,
            "webhooks.queue=50",
            "webhooks.timeout=0.3",
            "webhooks.max_age=1",
            "delivery.history=10",
            'webhooks.events=["connect","message"]',
        )
        with running_server(1, settings) as srv:
            client = await connect_client(srv.url, user="flood", rooms=["flood"])
            await client.recv_type("joined")
            content = "x" * 4000
            count = 600  # 2.4 MB of message events if they were all kept
            for i in range(count):
                await client.send(type="message", room="flood", content=content, id=str(i))
            acks = 0
            while acks < count:
                acks += (await client.recv())["type"] == "ack"
            # The queue held at most its bound all along (the peak, in events and bytes:
            # the shard's memory for webhooks); every event beyond was dropped, counted.
            assert metric_sum(srv, "shardchat_webhook_held_peak") == 50
            assert metric_sum(srv, "shardchat_webhook_held_bytes_peak") <= 50 * (len(content) + 400)
            await await_until(
                lambda: metric_sum(srv, "shardchat_webhook_events_dropped_total") >= count + 1 - 50,
                10,
                "the drops",
            )
            dropped = [e for e in srv.log_events() if e.get("event") == "webhook_events_dropped"]
            assert len(dropped) == 1  # logged once for the burst
            assert (await client.request("ping", "pong", id="alive"))["id"] == "alive"
            await client.close()
            assert_no_traceback(srv)


async def test_kill_9_of_a_shard_reports_its_users_leave_and_disconnect() -> None:
    with backend() as receiver, running_server(2, hook_settings(receiver)) as srv:
        room = room_owned_by(0, 2, "dead")  # held by shard 0, members on shard 1 only
        clients = await clients_on_shards(srv.url, [1, 1, 1, 0], prefix="kd")
        victims, survivor = clients[:3], clients[3]
        async with closing(clients):
            for client in victims:
                await client.join(room)
                await client.join("other")
            await survivor.join("other")
            await await_until(lambda: len(receiver.of_type("join")) == 7, 10, "the joins reported")
            os.kill(srv.shard_pids()[1], signal.SIGKILL)
            users = {c.user for c in victims}

            def reported() -> bool:
                gone = {e["user"] for e in receiver.of_type("disconnect")}
                left = {(e["user"], e["room"]) for e in receiver.of_type("leave")}
                return gone >= users and left >= {(u, r) for u in users for r in (room, "other")}

            await await_until(reported, 10, "the dead shard's users reported")
            for event in [e for e in receiver.of_type("disconnect") if e["user"] in users]:
                assert event["code"] == 1006 and event["reason"] == "shard died"
                assert event["shard"] == 1
            leaves = [e for e in receiver.of_type("leave") if e["user"] in users]
            assert len(leaves) == 6 and {e["reason"] for e in leaves} == {"shard_died"}
            # The room held by shard 0 lost its last member: vacated, once.
            await await_until(lambda: "room_vacated" in occupancy(receiver, room), 10, "vacated")
            assert occupancy(receiver, room) == ["room_occupied", "room_vacated"]
            assert not [
                e
                for e in receiver.events.values()
                if e["user"] == survivor.user and e["type"] in ("leave", "disconnect")
            ]
