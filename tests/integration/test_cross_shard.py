"""Rooms that span shards: one order per room, forwarding, owner crashes, slow consumers."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import zlib
from typing import Any

from tests.support.helpers import (
    FAST,
    Client,
    RawClient,
    Server,
    clients_on_shards,
    closing,
    collect,
    connect_client,
    dropped_room,
    publish,
    room_owned_by,
    running_server,
)


async def test_six_senders_thirty_receivers_one_order() -> None:
    """6 senders on all shards publish 500 each: all 30 receivers see seq 1..3000 in
    order, with the same (sender, content) at each seq everywhere."""
    with running_server(workers=3, settings=FAST) as srv:
        room = "one-order"
        senders = await clients_on_shards(srv.url, [0, 1, 2, 0, 1, 2], prefix="snd")
        receivers = await clients_on_shards(srv.url, [0, 1, 2] * 10, prefix="rcv")
        assert {c.shard for c in senders} == {0, 1, 2} == {c.shard for c in receivers}
        async with closing([*senders, *receivers]):
            for client in (*senders, *receivers):
                await client.join(room)
            tasks = [asyncio.create_task(collect(r, room, 3000)) for r in receivers]
            ack_lists = await asyncio.gather(
                *(publish(s, room, 500, f"s{n}") for n, s in enumerate(senders))
            )
            results = await asyncio.gather(*tasks)
        ack_seqs = sorted(a["seq"] for acks in ack_lists for a in acks)
        assert ack_seqs == list(range(1, 3001))
        reference = [(m["seq"], m["sender"], m["content"]) for m in results[0]]
        assert [seq for seq, _, _ in reference] == list(range(1, 3001))
        for got in results[1:]:
            assert [(m["seq"], m["sender"], m["content"]) for m in got] == reference
        # Each sender's own messages keep the order it sent them in.
        for n, sender in enumerate(senders):
            mine = [c for _, s, c in reference if s == sender.user]
            assert mine == [f"s{n}:{i}" for i in range(500)]
        # The ack's seq is the seq its message got.
        by_content = {c: seq for seq, _, c in reference}
        for n, acks in enumerate(ack_lists):
            for ack in acks:
                assert by_content[f"s{n}:{ack['id'].split('-')[1]}"] == ack["seq"]


async def test_owner_killed_while_publishing_seq_continues() -> None:
    """kill -9 of the room's owner mid-publish: seq continues with no reset or repeat,
    and a client that rejoins with since gets exactly what it missed."""
    with running_server(workers=3, settings=FAST) as srv:
        room = room_owned_by(0)
        pub, watcher, resumer = await clients_on_shards(srv.url, [1, 2, 1], prefix="k")
        async with closing([pub, watcher, resumer]):
            for client in (pub, watcher, resumer):
                joined = await client.join(room)
            epoch = joined["epoch"]
            first = await publish(pub, room, 50, "before")
            seen = await collect(resumer, room, 50)
            last_seen = seen[-1]["seq"]
            await resumer.close()
            owner_pid = srv.shard_pids()[0]
            sending = asyncio.create_task(publish(pub, room, 200, "during"))
            # Mid-publish: the owner has sequenced the first "during" message.
            watched = await collect(watcher, room, 51)
            os.kill(owner_pid, signal.SIGKILL)
            during = await sending
            srv.wait_started(4)
            after = await publish(pub, room, 50, "after")
            seqs = [a["seq"] for a in first + during + after]
            assert sorted(seqs) == list(range(1, 301)), "no reset, no repeat, no gap"
            watched += await collect(watcher, room, 249)
            assert [m["seq"] for m in watched] == list(range(1, 301))
            back = await connect_client(srv.url, user="resumer")
            async with closing([back]):
                joined = await back.join(room, since=last_seen, epoch=epoch)
                assert joined["recovered"] is True and joined["epoch"] == epoch
                replayed = await collect(back, room, 300 - last_seen)
                assert [m["seq"] for m in replayed] == list(range(last_seen + 1, 301))
                assert [m["content"] for m in replayed] == [
                    m["content"] for m in watched[last_seen:]
                ]


async def test_restarted_owner_keeps_history_and_epoch() -> None:
    """After its owner restarts, a room's history and seq are still there for every shard."""
    with running_server(workers=3, settings=FAST) as srv:
        room = room_owned_by(1)
        (pub,) = await clients_on_shards(srv.url, [0], prefix="h")
        async with closing([pub]):
            joined = await pub.join(room)
            await publish(pub, room, 20, "x")
            os.kill(srv.shard_pids()[1], signal.SIGKILL)
            srv.wait_started(4)
            (on_owner,) = await clients_on_shards(srv.url, [1], prefix="o")
            async with closing([on_owner]):
                rejoined = await on_owner.join(room, since=5, epoch=joined["epoch"])
                assert rejoined["seq"] == 20 and rejoined["recovered"] is True
                got = await collect(on_owner, room, 15)
                assert [m["content"] for m in got] == [f"x:{i}" for i in range(5, 20)]
                acks = await publish(on_owner, room, 1, "y")
                assert acks[0]["seq"] == 21


def shard_rss(server: Server) -> int:
    """The shards' private memory (RssAnon): the rings are shared and excluded."""
    total = 0
    for pid in server.shard_pids().values():
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    total += int(line.split()[1]) * 1024
    return total


async def test_slow_consumer_is_closed_4429_and_others_get_everything() -> None:
    """A client that stops reading is closed with 4429; the other 29 receivers get every
    message, and the server's memory stays bounded."""
    settings = [*FAST, "limits.send_queue=65536"]
    with running_server(workers=3, settings=settings) as srv:
        room = "slow-room"
        receivers = await clients_on_shards(srv.url, [0, 1, 2] * 10, prefix="r")
        (pub,) = await clients_on_shards(srv.url, [0], prefix="p")
        # A tiny receive buffer, and it never reads until the end.
        slow = RawClient(srv.port, f"/ws?user=slow&room={room}", rcvbuf=4096)
        try:
            # Its join (at open) is answered before anything is published, so that
            # every message is queued for it: on a shard that holds no presence, a
            # join waits for the room's owner to answer.
            while json.loads((await asyncio.to_thread(slow.recv_frame))[1])["type"] != "joined":
                pass
            async with closing([*receivers[1:], pub]):
                for client in (*receivers[1:], pub):
                    await client.join(room)
                rss_before = shard_rss(srv)
                # Enough to fill the kernel's socket buffer too (tcp_wmem max, 4 MiB
                # here): send_queue counts only what waits in the server process.
                count = 1500
                progress = [0] * len(receivers[1:])
                moved = asyncio.Condition()

                async def follow(n: int, client: Client) -> list[dict[str, Any]]:
                    got: list[dict[str, Any]] = []
                    try:
                        while len(got) < count:
                            frame = await client.recv(60)
                            if frame["type"] == "message":
                                got.append(frame)
                                progress[n] = len(got)
                                async with moved:
                                    moved.notify_all()
                    finally:
                        async with moved:
                            moved.notify_all()  # a reader that failed wakes the publisher
                    return got

                tasks = [asyncio.create_task(follow(n, r)) for n, r in enumerate(receivers[1:])]
                body = "z" * 4000
                for i in range(count):
                    # Keep this test's own readers within 10 messages (40 KB) of the
                    # publisher, under the 64 KB send_queue even with no kernel buffer:
                    # however slow this machine, they must not be the slow consumers.
                    async with moved:
                        await moved.wait_for(
                            lambda i=i: min(progress) >= i - 10 or any(t.done() for t in tasks)
                        )
                    for task in tasks:
                        if task.done():
                            task.result()  # a reader failed: say why, do not hang
                    await pub.send(type="message", room=room, content=f"{i}:{body}")
                results = await asyncio.gather(*tasks)
                rss_after = shard_rss(srv)
                for got in results:
                    assert [m["seq"] for m in got] == list(range(1, count + 1))
                code = await asyncio.to_thread(slow.close_code)
                assert code == 4429
                # 6 MB went to 29 readers: the slow one holds at most its queue.
                assert rss_after - rss_before < 64 * 1024 * 1024
        finally:
            slow.close()
            await receivers[0].close()


async def test_every_shard_sequences_the_rooms_it_owns() -> None:
    """Rooms owned by each shard (crc32 % 3), published to from every shard: each room
    counts 1, 2, 3 and every member sees that order; acks match."""
    with running_server(workers=3, settings=FAST) as srv:
        rooms = [room_owned_by(s, prefix="own") for s in range(3)]
        assert [zlib.crc32(r.encode()) % 3 for r in rooms] == [0, 1, 2]
        clients = await clients_on_shards(srv.url, [0, 1, 2], prefix="c")
        async with closing(clients):
            for client in clients:
                for room in rooms:
                    await client.join(room)
            for client in clients:
                for room in rooms:
                    await client.send(type="message", room=room, content=client.user, id=room)
            for client in clients:
                acks: dict[str, int] = {}
                seen: dict[str, list[tuple[int, str]]] = {room: [] for room in rooms}
                while len(acks) < 3 or any(len(v) < 3 for v in seen.values()):
                    frame = await client.recv(10)
                    if frame["type"] == "ack":
                        acks[frame["id"]] = frame["seq"]
                    elif frame["type"] == "message":
                        seen[frame["room"]].append((frame["seq"], frame["content"]))
                for room in rooms:
                    assert [seq for seq, _ in seen[room]] == [1, 2, 3]
                    assert dict(seen[room])[acks[room]] == client.user


async def test_lapped_shard_fills_the_gap_from_the_owner() -> None:
    """A shard stopped while its peer's ring wraps several times is lapped: it asks
    the owner for what it missed, and its clients still get every message in order."""
    settings = [*FAST, "ring.bytes=65536", "limits.max_frame=8192"]
    with running_server(workers=3, settings=settings) as srv:
        room = room_owned_by(0)
        pub, receiver = await clients_on_shards(srv.url, [0, 1], prefix="lap")
        async with closing([pub, receiver]):
            for client in (pub, receiver):
                await client.join(room)
            stopped = srv.shard_pids()[1]
            os.kill(stopped, signal.SIGSTOP)
            try:
                acks = await publish(
                    pub, room, 300, "lap", body="x" * 1000
                )  # ~330 KB through a 64 KB ring
            finally:
                os.kill(stopped, signal.SIGCONT)
            assert [a["seq"] for a in acks] == list(range(1, 301))
            got = await collect(receiver, room, 300)
            assert [m["seq"] for m in got] == list(range(1, 301))
        events = [e for e in srv.log_events() if e.get("event") == "gap"]
        assert any(e["shard"] == 1 for e in events)


async def test_idle_room_dropped_then_fetched_back_from_its_owner() -> None:
    """A shard drops its copy of an idle room it neither owns nor has members of; a later
    join with since there gets the history back from the owner, recovered, in order."""
    async with dropped_room("idle") as d:
        rejoined = await d.late.join(d.room, since=5, epoch=d.epoch)
        assert rejoined["seq"] == 20 and rejoined["recovered"] is True
        got = await collect(d.late, d.room, 15)
        assert [m["content"] for m in got] == [f"x:{i}" for i in range(5, 20)]
        # Live messages follow the fetched history without a gap.
        await publish(d.publisher, d.room, 3, "y")
        more = await collect(d.late, d.room, 3)
        assert [m["seq"] for m in more] == [21, 22, 23]
        fetches = [e for e in d.server.log_events() if e.get("event") == "history_fetch"]
        assert fetches and fetches[0]["shard"] == 1
