"""Acked means kept: an owner killed in the turn that acks loses nothing
acked, a publish retried with its key after `unavailable` is delivered once, a
lapped reader fills every gap the owner can fill, replays are paced, and a slow
consumer finds its close 4429."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from typing import Any

from websockets.exceptions import WebSocketException

from shardchat.testing.rawws import OP_CLOSE, OP_TEXT, encode_frame, open_upgraded, read_frame
from shardchat.testing.wait import await_until
from tests.support.helpers import (
    FAST,
    Client,
    NotPlaced,
    RawClient,
    Server,
    clients_on_shards,
    closing,
    collect,
    connect_client,
    dropped_room,
    metric,
    publish,
    room_owned_by,
    running_server,
    scaled,
)


class StreamClient:
    """A WebSocket client on asyncio streams: a burst of frames goes out in one write,
    so that the server handles it in one loop turn."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.welcome: dict[str, Any] = {}

    @classmethod
    async def connect(cls, port: int, query: str) -> StreamClient:
        reader, writer = await asyncio.wait_for(open_upgraded(port, f"/ws?{query}"), scaled(10))
        client = cls(reader, writer)
        client.welcome = await client.recv()
        return client

    def send_all(self, objs: list[dict[str, Any]]) -> None:
        self.writer.write(b"".join(encode_frame(json.dumps(o).encode()) for o in objs))

    async def recv(self, timeout: float = 10) -> dict[str, Any]:
        while True:
            opcode, payload = await asyncio.wait_for(read_frame(self.reader), scaled(timeout))
            if opcode == OP_TEXT:
                data: dict[str, Any] = json.loads(payload)
                return data
            if opcode == OP_CLOSE:
                raise ConnectionError("closed")

    def close(self) -> None:
        self.writer.close()


async def history(client: Client, room: str) -> dict[int, str]:
    await client.send(type="history", room=room, since=0, limit=100000)
    got: dict[int, str] = {}
    while True:
        frame = await client.recv(30)
        if frame["type"] == "history_end":
            return got
        if frame["type"] == "message" and frame["room"] == room:
            got[frame["seq"]] = frame["content"]


async def test_owner_killed_in_the_acking_turn_loses_no_acked_message() -> None:
    """A burst of publishes arrives in one write on a room's owner, which is killed
    with SIGKILL the moment its first ack reaches the client: 21 times, the three
    shards in turn (each owns one room), so that restart backoff does not stretch
    the test. Every acked message is in every shard's history and in the live view
    of a watcher on every shard (those on a killed shard rejoin with ``since``, and
    every rejoin is recovered), and the shards agree on each room's seq."""
    settings = [*FAST, "delivery.history=10000"]
    kills, burst = 21, 100
    with running_server(workers=3, settings=settings) as srv:
        rooms = [room_owned_by(shard, prefix="kept") for shard in range(3)]
        views: list[dict[str, dict[int, str]]] = [{r: {} for r in rooms} for _ in range(3)]
        rejoins: list[bool] = []
        epochs: set[str] = set()
        stop = asyncio.Event()
        watchers = [
            asyncio.create_task(_watch(srv, shard, rooms, views[shard], rejoins, epochs, stop))
            for shard in range(3)
        ]
        await await_until(lambda: len(epochs) == 1, 30, "every watcher joined")
        acked: dict[str, dict[int, str]] = {r: {} for r in rooms}
        for k in range(kills):
            shard = k % 3
            room = rooms[shard]
            pub = await _stream_client_on(srv, shard, f"pub{k}")
            pub.send_all([{"type": "join", "room": room}])
            assert (await pub.recv())["type"] == "joined"
            pub.send_all(
                [
                    {"type": "message", "room": room, "content": f"{k}:{i}", "id": f"{k}:{i}"}
                    for i in range(burst)
                ]
            )
            first = True
            try:
                while True:
                    frame = await pub.recv()
                    if frame["type"] == "ack":
                        if first:
                            # On receipt of the first ack: the kill lands in (or right
                            # after) the loop turn that sent it.
                            os.kill(srv.shard_pids()[shard], signal.SIGKILL)
                            first = False
                        acked[room][frame["seq"]] = frame["id"]
            except (ConnectionError, asyncio.IncompleteReadError, TimeoutError):
                pass
            finally:
                pub.close()
            srv.wait_started(3 + k + 1)

        def seen_all() -> bool:
            return all(acked[r].keys() <= v[r].keys() for v in views for r in rooms)

        try:
            await await_until(seen_all, 60, "every acked message seen by every watcher")
        finally:
            stop.set()
            await asyncio.gather(*watchers)
        assert len(epochs) == 1, epochs
        assert rejoins and all(rejoins), rejoins
        for view in views:
            for room in rooms:
                assert {seq: view[room][seq] for seq in acked[room]} == acked[room]
        checkers = await clients_on_shards(srv.url, [0, 1, 2], prefix="check")
        async with closing(checkers):
            for room in rooms:
                for checker in checkers:
                    held = await history(checker, room)
                    assert {seq: held.get(seq) for seq in acked[room]} == acked[room]
                assert len({(await c.join(room))["seq"] for c in checkers}) == 1
        assert sum(len(a) for a in acked.values()) >= kills


async def _watch(
    srv: Server,
    shard: int,
    rooms: list[str],
    view: dict[str, dict[int, str]],
    rejoins: list[bool],
    epochs: set[str],
    stop: asyncio.Event,
) -> None:
    """A watcher on ``shard`` of every room; when its shard dies it reconnects there
    and rejoins each room with ``since`` (noting whether the rejoin was recovered)."""
    attempt = 0
    while not stop.is_set():
        attempt += 1
        try:
            (client,) = await clients_on_shards(srv.url, [shard], prefix=f"w{shard}-{attempt}-")
        except (OSError, NotPlaced, WebSocketException, TimeoutError):
            continue
        try:
            for room in rooms:
                since = max(view[room], default=0)
                if epochs:
                    (epoch,) = epochs
                    await client.send(type="join", room=room, since=since, epoch=epoch)
                else:
                    await client.send(type="join", room=room)
                while True:
                    frame = await client.recv(10)
                    if frame["type"] == "joined":
                        epochs.add(frame["epoch"])
                        if "recovered" in frame:
                            rejoins.append(frame["recovered"])
                        break
                    _record(view, frame)
            while not stop.is_set():
                try:
                    _record(view, await client.recv(0.5))
                except TimeoutError:
                    continue
        except (OSError, WebSocketException, TimeoutError):
            continue
        finally:
            await client.close()


def _record(view: dict[str, dict[int, str]], frame: dict[str, Any]) -> None:
    if frame["type"] == "message":
        seen = view[frame["room"]]
        # A replay after a rejoin may repeat; the content of one seq never changes.
        assert seen.setdefault(frame["seq"], frame["content"]) == frame["content"]


async def _stream_client_on(srv: Server, shard: int, user: str) -> StreamClient:
    for attempt in range(400):
        try:
            client = await StreamClient.connect(srv.port, f"user={user}-{attempt}")
        except (OSError, asyncio.IncompleteReadError):
            await asyncio.sleep(0.05)  # the shard is restarting
            continue
        if client.welcome["shard"] == shard:
            return client
        client.close()
    raise AssertionError(f"no connection landed on shard {shard}")


async def test_publish_retried_with_its_key_after_unavailable_is_delivered_once() -> None:
    """The owner is stopped: a forwarded publish gets ``unavailable`` (counted in
    shardchat_errors_total) and is sequenced anyway once the owner runs again. The
    same publish retried with the same key, on the same shard and on another one, is
    acked with the original seq, and the room's members receive it once."""
    settings = [*FAST, "delivery.publish_timeout=1"]
    with running_server(workers=3, settings=settings) as srv:
        room = room_owned_by(0, prefix="idem")
        sender, other, member = await clients_on_shards(srv.url, [1, 2, 1], prefix="idem")
        async with closing([sender, other, member]):
            for client in (sender, other, member):
                await client.join(room)
            owner = srv.shard_pids()[0]
            os.kill(owner, signal.SIGSTOP)
            try:
                await sender.send(type="message", room=room, content="once", id="m-1", key="m-1")
                error = await sender.recv_type("error", timeout=10)
                assert error["code"] == "unavailable" and error["id"] == "m-1"
            finally:
                os.kill(owner, signal.SIGCONT)
            assert metric(srv, "shardchat_errors_total", code="unavailable") >= 1
            # The retry, with the same key: the original seq, not a new message.
            await sender.send(type="message", room=room, content="once", id="m-1", key="m-1")
            ack = await sender.recv_type("ack", timeout=10)
            # The same user from another connection on another shard.
            again = await connect_client(srv.url, user=sender.user)
            async with closing([again]):
                await again.join(room)
                await again.send(type="message", room=room, content="once", id="m-1", key="m-1")
                ack2 = await again.recv_type("ack", timeout=10)
                assert ack2["seq"] == ack["seq"]
                # A marker after the retries: everything before it has arrived.
                await publish(again, room, 1, "marker")
            got = await collect(member, room, 2)
            assert [m["content"] for m in got] == ["once", "marker:0"]
            assert got[0]["seq"] == ack["seq"]


async def test_lapped_reader_fills_every_gap_under_load() -> None:
    """A 64 KiB ring under 2,000 msg/s; the shard of the live subscribers is stopped
    for 0.5 s (1,000 messages of over 200 bytes: the ring several times over), 10
    times, so that its reader of the owner's ring is lapped each time. The
    subscribers miss nothing: every seq arrives once, in order."""
    settings = [
        *FAST,
        "ring.bytes=65536",
        "limits.max_frame=8192",
        "delivery.history=20000",
        # The publisher is a member of every room and reads all 10,000 messages on
        # a raw stream that answers no ping: on a busy machine the test fell behind
        # reading them (4429) or outlived a heartbeat (4408) before its acks came.
        "limits.send_queue=67108864",
        "heartbeat.interval=600",
    ]
    with running_server(workers=2, settings=settings) as srv:
        rooms = [room_owned_by(0, workers=2, prefix=f"lapped{i}-") for i in range(4)]
        subs = await clients_on_shards(srv.url, [1, 1], prefix="sub")
        pub = await _stream_client_on(srv, 0, "lappub")
        views: list[dict[str, list[int]]] = [{r: [] for r in rooms} for _ in subs]
        done = asyncio.Event()

        async def read(n: int, client: Client) -> None:
            while not done.is_set():
                try:
                    frame = await client.recv(0.5)
                except TimeoutError:
                    continue
                if frame["type"] == "message":
                    views[n][frame["room"]].append(frame["seq"])

        async with closing(subs):
            for sub in subs:
                for room in rooms:
                    await sub.join(room)
            pub.send_all([{"type": "join", "room": room} for room in rooms])
            acks: dict[str, int] = {}

            async def read_acks() -> None:
                while True:
                    frame = await pub.recv(30)
                    if frame["type"] == "ack":
                        acks[frame["room"]] = max(acks.get(frame["room"], 0), frame["seq"])

            readers = [asyncio.create_task(read(n, s)) for n, s in enumerate(subs)]
            ack_reader = asyncio.create_task(read_acks())
            stopped = srv.shard_pids()[1]
            body = "x" * 200
            sent = 0
            loop = asyncio.get_running_loop()
            for cycle in range(10):
                # 2,000 msg/s: 20 every 10 ms, for 1 s; the subscribers' shard is
                # stopped for the middle half of it.
                start = loop.time()
                for tick in range(100):
                    if tick == 25:
                        os.kill(stopped, signal.SIGSTOP)
                    elif tick == 75:
                        os.kill(stopped, signal.SIGCONT)
                    pub.send_all(
                        [
                            {
                                "type": "message",
                                "room": rooms[i % 4],
                                "content": f"{sent + i}{body}",
                            }
                            for i in range(20)
                        ]
                    )
                    sent += 20
                    await asyncio.sleep(max(0.0, start + (tick + 1) * 0.01 - loop.time()))
                os.kill(stopped, signal.SIGCONT)
                del cycle
            expected = sent // 4
            await await_until(lambda: all(acks.get(r) == expected for r in rooms), 60, "every ack")
            await await_until(
                lambda: all(len(v[r]) >= expected for v in views for r in rooms),
                120,
                "every message in every reader's view",
            )
            done.set()
            ack_reader.cancel()
            await asyncio.gather(*readers)
            pub.close()
            for view in views:
                for room in rooms:
                    assert view[room] == list(range(1, expected + 1))
        laps = [e for e in srv.log_events() if e.get("event") == "ring_lapped"]
        lost = [e for e in srv.log_events() if e.get("event") == "gap_lost"]
        assert laps, "the reader was never lapped: the test did not test"
        assert not lost


async def test_history_on_a_shard_that_dropped_the_room_fetches_from_the_owner() -> None:
    """A shard drops its idle copy of a room; a ``history`` there (no join)
    gets the room's messages back from the owner, as a ``join`` with ``since`` does."""
    async with dropped_room("hist", tag="h") as dropped:
        room, late = dropped.room, dropped.late
        held = await history(late, room)
        assert held == {i + 1: f"h:{i}" for i in range(20)}
        await late.send(type="history", room=room, since=15)
        got = await collect(late, room, 5)
        assert [m["seq"] for m in got] == [16, 17, 18, 19, 20]
        end = await late.recv_type("history_end")
        assert end["seq"] == 20


async def test_large_replay_is_paced_not_cut() -> None:
    """A ``history`` and a rejoin with ``since`` that need far more than ``send_queue``
    bytes arrive whole, paced by the client's reading, instead of closing it 4429."""
    settings = [*FAST, "limits.send_queue=65536", "delivery.history=5000"]
    with running_server(workers=3, settings=settings) as srv:
        room = room_owned_by(0, prefix="big")
        (pub,) = await clients_on_shards(srv.url, [0], prefix="bpub")
        async with closing([pub]):
            joined = await pub.join(room)
            for start in range(0, 3000, 500):
                await publish(pub, room, 500, f"b{start}", body="y" * 1000)  # 3 MB in all
            reader = await connect_client(srv.url, user="reader")
            async with closing([reader]):
                held = await history(reader, room)
                assert sorted(held) == list(range(1, 3001))
                rejoined = await reader.join(room, since=0, epoch=joined["epoch"])
                assert rejoined["recovered"] is True
                got = await collect(reader, room, 3000)
                assert [m["seq"] for m in got] == list(range(1, 3001))
                # Live messages follow the replay, and the connection is still open.
                await publish(pub, room, 1, "after")
                (last,) = await collect(reader, room, 1)
                assert last["seq"] == 3001


async def test_slow_consumer_that_stops_reading_receives_close_4429() -> None:
    """A client stops reading; the server cuts it (4429) and drops what was queued for
    it, so the close frame is not stuck behind the queue. The client reads again
    only after the old abort deadline (5 s) and still finds the close 4429."""
    settings = [*FAST, "limits.send_queue=65536"]
    with running_server(workers=3, settings=settings) as srv:
        room = room_owned_by(0, prefix="slowc")
        (pub,) = await clients_on_shards(srv.url, [0], prefix="spub")
        slow = RawClient(srv.port, f"/ws?user=slowpoke&room={room}", rcvbuf=4096)
        try:
            async with closing([pub]):
                await pub.join(room)
                body = "z" * 4000
                sent = 0
                while not any(e.get("event") == "slow_consumer" for e in srv.log_events()):
                    await publish(pub, room, 50, f"s{sent}", body=body)
                    sent += 50
                    assert sent < 20000, "never cut"
                # Longer than CLOSE_TIMEOUT, the old abort: the client is still there.
                await asyncio.sleep(6)
                code = await asyncio.to_thread(slow.close_code)
                assert code == 4429
        finally:
            slow.close()
