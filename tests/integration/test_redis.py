"""Several boxes as one chat service through a real Redis.

Each box is a real ``shardchat start --workers 2`` with ``broker.kind =
"redis"``; the clients are real WebSocket clients over loopback. The tests that
share this module's Redis use a key prefix of their own; the ones that stop
or wipe Redis start their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import time
import urllib.request
from collections.abc import Iterator, Sequence

from shardchat.testing.wait import await_until
from tests.support.helpers import (
    SHARDCHAT,
    Client,
    Server,
    clients_on_shards,
    closing,
    connect_client,
    kill_server,
    running_server,
    scaled,
)
from tests.support.redis_helpers import RedisCluster, RedisServer


def box_settings(url: str, prefix: str, *extra: str) -> list[str]:
    return [
        "broker.kind=redis",
        f"redis.url={url}",
        f"redis.prefix={prefix}",
        "presence.ttl=3",
        "limits.rate=100000",
        "limits.burst=100000",
        *extra,
    ]


@contextlib.contextmanager
def two_boxes(settings: Sequence[str]) -> Iterator[tuple[Server, Server]]:
    with running_server(2, settings) as one, running_server(2, settings) as two:
        yield one, two


async def spread(boxes: Sequence[Server], count: int, prefix: str) -> list[Client]:
    """``count`` clients spread over every shard of every box, round robin."""
    wanted: list[tuple[Server, int]] = [(box, s) for box in boxes for s in range(box.workers)]
    per: dict[tuple[int, int], int] = {}
    for i in range(count):
        box, shard = wanted[i % len(wanted)]
        per[(boxes.index(box), shard)] = per.get((boxes.index(box), shard), 0) + 1
    clients: list[Client] = []
    for (b, shard), n in sorted(per.items()):
        for k in range(n):
            # A name of its own (box, shard, index): two senders with one name would
            # be one user, whose keys the broker rightly deduplicates.
            name = f"{prefix}{b}s{shard}n{k}x"
            (client,) = await clients_on_shards(boxes[b].url, [shard], prefix=name)
            clients.append(client)
    return clients


async def ordering(boxes: Sequence[Server], senders: int = 6, per_sender: int = 500) -> None:
    """Every receiver on every box gets every message once, in one order."""
    room = "ordered"
    pubs = await spread(boxes, senders, "pub")
    subs = await spread(boxes, 20, "sub")
    async with closing(pubs + subs):
        assert {(c.ws.remote_address[1], c.shard) for c in pubs} == {
            (b.port, s) for b in boxes for s in range(b.workers)
        }
        for client in subs + pubs:
            joined = await client.join(room)
        epoch = joined["epoch"]
        total = senders * per_sender

        async def send(pub: Client) -> None:
            for i in range(per_sender):
                await pub.send(type="message", room=room, content=f"{pub.user}-{i}", id=str(i))

        progress: dict[int, list[tuple[int, str, str]]] = {}

        async def receive(sub: Client) -> list[tuple[int, str, str]]:
            got = progress[id(sub)] = []
            while len(got) < total:
                try:
                    frame = await sub.recv(20)
                except TimeoutError:
                    raise AssertionError(
                        "receivers stalled: "
                        + ", ".join(
                            f"{c.user}@{c.ws.remote_address[1]}/{c.shard}:"
                            f"{len(progress.get(id(c), []))}"
                            for c in subs
                        )
                    ) from None
                if frame["type"] == "message":
                    got.append((frame["seq"], frame["sender"], frame["content"]))
            return got

        receivers = [asyncio.create_task(receive(s)) for s in subs]
        await asyncio.gather(*(send(p) for p in pubs))
        results = await asyncio.gather(*receivers)
        first = results[0]
        assert [seq for seq, _, _ in first] == list(range(1, total + 1))
        for got in results[1:]:
            assert got == first
        # Each sender's messages in the order it sent them.
        for pub in pubs:
            mine = [c for _, s, c in first if s == pub.user]
            assert mine == [f"{pub.user}-{i}" for i in range(per_sender)]
        late = await connect_client(boxes[0].url, user="late")
        async with closing([late]):
            joined = await late.join(room, since=total - 10, epoch=epoch)
            assert joined["recovered"] is True and joined["seq"] == total
            replay = [await late.recv_type("message") for _ in range(10)]
            assert [m["seq"] for m in replay] == list(range(total - 9, total + 1))
    for box in boxes:
        broker = box.status()["broker"]
        assert broker["healthy"] and broker["batch_size"] >= 1


async def test_two_boxes_one_order_per_room(redis: RedisServer, prefix: str) -> None:
    with two_boxes(box_settings(redis.url, prefix)) as boxes:
        await ordering(boxes)


async def test_a_key_is_deduplicated_across_boxes_and_an_id_never_is(
    redis: RedisServer, prefix: str
) -> None:
    """The same user retries a publish with its `key` on the other box: acked with
    the original seq, delivered once. Reused `id`s without a key are new messages,
    each acked in its own room."""
    with two_boxes(box_settings(redis.url, prefix)) as (one, two):
        first = await connect_client(one.url, user="keyed")
        again = await connect_client(two.url, user="keyed")
        watcher = await connect_client(two.url, user="watcher")
        async with closing([first, again, watcher]):
            for client in (first, again, watcher):
                await client.join("dedupe")
            await again.join("other")
            await first.send(type="message", room="dedupe", content="once", id="1", key="k")
            ack = await first.recv_type("ack")
            await again.send(type="message", room="dedupe", content="once", id="2", key="k")
            assert (await again.recv_type("ack"))["seq"] == ack["seq"]
            await again.send(type="message", room="other", content="new", id="1")
            assert (await again.recv_type("ack"))["room"] == "other"
            await again.send(type="message", room="dedupe", content="new", id="1")
            assert (await again.recv_type("ack"))["seq"] == ack["seq"] + 1
            got = [await watcher.recv_type("message") for _ in range(2)]
            assert [m["content"] for m in got] == ["once", "new"]


async def test_a_box_without_members_gets_none_of_a_rooms_traffic(
    redis: RedisServer, prefix: str
) -> None:
    with two_boxes(box_settings(redis.url, prefix)) as (one, two):
        talker = await connect_client(one.url, user="talker")
        here = await connect_client(one.url, user="here")
        there = await connect_client(two.url, user="there")
        async with closing([talker, here, there]):
            await talker.join("busy")
            await here.join("busy")
            epoch = (await talker.join("shared"))["epoch"]
            await there.join("shared")
            for i in range(200):
                await talker.send(type="message", room="busy", content=f"b{i}")
            for i in range(20):
                await talker.send(type="message", room="shared", content=f"s{i}")
            got = [await there.recv_type("message") for _ in range(20)]
            assert [m["content"] for m in got] == [f"s{i}" for i in range(20)]
            busy = [await here.recv_type("message") for _ in range(200)]
            assert busy[-1]["seq"] == 200
            status = two.status()["broker"]
            # Box two heard the 20 messages of the room it has a member of, and
            # not one of the other room's 200.
            assert status["messages_received"] == 20
            assert status["subscribed_rooms"] == 1
            shown = subprocess.run(
                [SHARDCHAT, "status", "--admin", f"http://127.0.0.1:{two.admin_port}"],
                capture_output=True, text=True, timeout=30,
            ).stdout  # fmt: skip
            assert f"broker redis {redis.url}  healthy (2 shards connected)" in shown
            assert "rooms subscribed 1" in shown
            # Each shard with a member of a room subscribes to it (who talks to Redis:
            # ARCHITECTURE.md, Many boxes).
            busy_shards = len({talker.shard, here.shard})
            assert one.status()["broker"]["messages_received"] == 200 * busy_shards + 20
            await there.request("leave", "left", room="shared")
            assert two.status()["broker"]["messages_received"] == 20
            await await_until(
                lambda: _gauge(two, "subscribed_rooms", 0), 5, "box two to unsubscribe"
            )
            for i in range(10):
                await talker.send(type="message", room="shared", content=f"t{i}")
            # The room's traffic goes on on box one, and no longer reaches box two.
            later: list[str] = []
            while len(later) < 10:
                frame = await talker.recv_type("message")
                if frame["room"] == "shared" and frame["content"].startswith("t"):
                    later.append(frame["content"])
            assert later == [f"t{i}" for i in range(10)]
            # Box two holds nothing of the room now: a resume there is served from
            # the room's stream in Redis.
            assert two.status()["broker"]["messages_received"] == 20
            back = await connect_client(two.url, user="back")
            async with closing([back]):
                joined = await back.join("shared", since=25, epoch=epoch)
                assert joined["recovered"] is True and joined["seq"] == 30
                replay = [await back.recv_type("message") for _ in range(5)]
                assert [m["content"] for m in replay] == [f"t{i}" for i in range(5, 10)]
                await back.send(type="history", room="shared", since=0, limit=3)
                history = [await back.recv_type("message") for _ in range(3)]
                assert [m["seq"] for m in history] == [1, 2, 3]
            metrics = (
                urllib.request.urlopen(f"http://127.0.0.1:{two.admin_port}/metrics", timeout=5)
                .read()
                .decode()
            )
            assert 'shardchat_redis_up{shard="0"} 1.0' in metrics
            assert "shardchat_redis_stream_reads_total" in metrics
            assert two.status()["broker"]["messages_received"] == 20


async def _gauge(box: Server, key: str, value: int) -> bool:
    return bool(box.status()["broker"][key] == value)


async def leave_of(client: Client, user: str, timeout: float) -> None:
    """Until ``user``'s leave event reaches ``client``, within ``timeout`` (scaled)."""
    deadline = time.monotonic() + scaled(timeout)
    while True:
        remaining = (deadline - time.monotonic()) / scaled(1)
        frame = await client.recv_type("leave", timeout=max(0.01, remaining))
        if frame["sender"] == user:
            return


async def test_a_killed_box_clients_resume_on_the_other_box(
    redis: RedisServer, prefix: str
) -> None:
    room = "lifeboat"
    with two_boxes(box_settings(redis.url, prefix)) as (doomed, other):
        publisher = await connect_client(other.url, user="publisher")
        watcher = await connect_client(other.url, user="watcher")
        ghost = await connect_client(doomed.url, user="ghost")
        movers = [await connect_client(doomed.url, user=f"mover{i}") for i in range(4)]
        clients = [publisher, watcher, ghost, *movers]
        try:
            for client in clients:
                joined = await client.join(room)
            epoch = joined["epoch"]

            async def everyone() -> bool:
                presence = await watcher.request("presence", "presence", room=room)
                return bool(presence["count"] == len(clients))

            await await_until(everyone, 5, "presence over both boxes")
            total = 400
            acked: list[int] = []

            async def publish() -> None:
                for i in range(total):
                    await publisher.send(type="message", room=room, content=f"m{i}", id=str(i))
                    await asyncio.sleep(0.002)

            async def acks() -> None:
                while len(acked) < total:
                    frame = await publisher.recv(20)
                    if frame["type"] == "ack":
                        acked.append(frame["seq"])

            async def follow(mover: Client) -> list[int]:
                seqs: list[int] = []
                try:
                    while True:
                        frame = await mover.recv(20)
                        if frame["type"] == "message":
                            seqs.append(frame["seq"])
                except Exception:
                    pass  # the box died under it
                # Reconnect to the other box and resume where it was.
                again = await connect_client(other.url, user=mover.user)
                clients.append(again)
                last = seqs[-1] if seqs else 0
                joined = await again.join(room, since=last, epoch=epoch)
                assert joined["recovered"] is True, joined
                while not seqs or seqs[-1] < total:
                    frame = await again.recv(20)
                    if frame["type"] == "message":
                        seqs.append(frame["seq"])
                return seqs

            sending = asyncio.create_task(publish())
            acking = asyncio.create_task(acks())
            following = [asyncio.create_task(follow(m)) for m in movers]
            await await_until(lambda: len(acked) >= total // 3, 20, "a third acked")
            kill_server(doomed)
            # The ghost's box is dead and nobody reconnects for it: it leaves
            # everywhere within presence.ttl (3 s here) + 1 s of the kill.
            ghost_left = asyncio.create_task(leave_of(watcher, "ghost", 3 + 1))
            assert len(acked) < total
            await sending
            await acking
            for task in following:
                assert await task == list(range(1, total + 1))  # every message once
            await ghost_left
            presence = await watcher.request("presence", "presence", room=room)
            assert "ghost" not in presence["users"]
            assert set(presence["users"]) == {"publisher", "watcher"} | {m.user for m in movers}
        finally:
            await asyncio.gather(*(c.ws.close() for c in clients), return_exceptions=True)


async def test_redis_outage_and_data_loss() -> None:
    """Redis stopped 5 s and started again (AOF): refused, never acked and lost, then
    the same epoch goes on. Restarted without its data: a new epoch."""
    server = RedisServer()
    room = "outage"
    try:
        server.start()
        settings = box_settings(server.url, "o:")
        with running_server(2, settings) as box:
            sender, receiver = await clients_on_shards(box.url, [0, 1], prefix="o")
            async with closing([sender, receiver]):
                joined = await sender.join(room)
                await receiver.join(room)
                epoch = joined["epoch"]
                acked: dict[str, int] = {}
                refused: list[str] = []
                for i in range(20):
                    ack = await sender.request(
                        "message", "ack", room=room, content=f"a{i}", id=f"a{i}"
                    )
                    acked[ack["id"]] = ack["seq"]
                first = [await receiver.recv_type("message") for _ in range(20)]
                assert [m["seq"] for m in first] == list(range(1, 21))
                server.stop()
                await await_until(lambda: _healthy(box, False), 10, "the box to see Redis down")
                # Every publish during the outage is refused with `unavailable`.
                stop_at = time.monotonic() + 5
                i = 0
                while time.monotonic() < stop_at:
                    await sender.send(type="message", room=room, content=f"g{i}", id=f"g{i}")
                    frame = await sender.recv_type("error", timeout=5)
                    assert frame["code"] == "unavailable" and frame["id"] == f"g{i}"
                    refused.append(frame["id"])
                    i += 1
                    await asyncio.sleep(0.1)
                assert len(refused) > 10
                # The connections stayed open, presence kept working.
                presence = await receiver.request("presence", "presence", room=room)
                assert presence["count"] == 2
                server.start()
                await await_until(lambda: _healthy(box, True), 15, "the box to reconnect")
                for i in range(20, 30):
                    ack = await sender.request(
                        "message", "ack", room=room, content=f"a{i}", id=f"a{i}"
                    )
                    acked[ack["id"]] = ack["seq"]
                assert list(acked.values()) == list(range(1, 31))  # seq went on
                got = [(m["seq"], m["content"]) for m in first]
                while len(got) < 30:
                    try:
                        frame = await receiver.recv_type("message")
                    except TimeoutError:
                        raise AssertionError(f"got only {got}\n{box.tail(30)}") from None
                    got.append((frame["seq"], frame["content"]))
                assert got == [(s, f"a{s - 1}") for s in range(1, 31)]  # nothing acked lost
                late = await connect_client(box.url, user="late")
                async with closing([late]):
                    again = await late.join(room, since=25, epoch=epoch)
                    logs = [
                        line for line in box.tail(400).splitlines()
                        if '"info"' not in line or "redis" in line
                    ]  # fmt: skip
                    assert again["epoch"] == epoch and again["recovered"] is True, (
                        again,
                        late.shard,
                        sender.shard,
                        "\n".join(logs[-30:]),
                    )
                    assert again["seq"] == 30
                assert box.status()["broker"]["reconnects"] >= 1

                # Now Redis loses everything: the room's epoch changes.
                server.stop()
                server.wipe()
                server.start()
                await await_until(lambda: _healthy(box, True), 15, "the box to reconnect")
                fresh = await connect_client(box.url, user="fresh")
                async with closing([fresh]):
                    joined = await fresh.join(room, since=30, epoch=epoch)
                    assert joined["epoch"] != epoch
                    assert joined["recovered"] is False
                    ack = await fresh.request("message", "ack", room=room, content="new", id="n")
                    assert ack["seq"] == 1
    finally:
        server.close()


async def _healthy(box: Server, up: bool) -> bool:
    return bool(box.status()["broker"]["healthy"] is up)


async def test_two_boxes_one_order_on_a_redis_cluster() -> None:
    cluster = RedisCluster(3)
    try:
        cluster.start()
        settings = box_settings(
            "redis://unused:1/0", "c:", "redis.cluster=" + repr(cluster.seeds).replace("'", '"')
        )
        with two_boxes(settings) as boxes:
            await ordering(boxes)
            # The room's keys share one slot: they live on one master.
            owners = [n for n in cluster.nodes if n.cli("--scan", "--pattern", "c:{ordered}*")]
            assert len(owners) == 1
            keys = owners[0].cli("--scan", "--pattern", "c:{ordered}*").split()
            assert {"c:{ordered}:seq", "c:{ordered}:s", "c:{ordered}:e"} <= set(keys)
    finally:
        cluster.close()
