"""Reliable delivery: acks, resends with backoff, 4409, and a client library that
resumes without loss across a shard crash."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from websockets.exceptions import ConnectionClosed

from shardchat.client.chatclient import ChatClient, Message
from shardchat.testing.rawws import OP_CLOSE, OP_TEXT, close_code
from shardchat.testing.wait import await_until
from tests.support.helpers import (
    FAST,
    SHARDCHAT,
    RawClient,
    Server,
    clients_on_shards,
    closing,
    connect_client,
    metric,
    room_of_three,
    room_owned_by,
    running_server,
    scaled,
    take_messages,
)


def resends(srv: Server) -> float:
    return metric(srv, "shardchat_resends_total")


async def test_one_ack_in_five_dropped_still_exactly_once_in_order() -> None:
    """Every fifth ack is dropped: the server resends what it did not hear acked, the
    client drops the duplicates, and the application sees each message once, in order."""
    settings = [*FAST, "delivery.ack_timeout=0.1", "delivery.ack_retries=10"]
    with running_server(workers=3, settings=settings) as srv:
        dropped: set[int] = set()

        acks: list[int] = []

        def drop(room: str, seq: int) -> bool:
            acks.append(seq)
            # The first ack of every fifth message is lost.
            if seq % 5 == 0 and seq not in dropped:
                dropped.add(seq)
                return True
            return False

        # ack_delay=0: one ack per loop turn, so one per message at this pace and the
        # ack of every fifth message can be dropped (delayed acks would cover
        # several messages with one seq).
        async with ChatClient(
            srv.url, user="lossy", rooms=["rel"], drop_ack=drop, ack_delay=0
        ) as client:
            publisher = await connect_client(srv.url, user="pub", rooms=["rel"])
            got: list[Message] = []
            stream = client.messages()
            async with closing([publisher]):
                for i in range(100):
                    await publisher.send(type="message", room="rel", content=f"r{i}")
                    got.append(await asyncio.wait_for(anext(stream), scaled(10)))
                    if (i + 1) % 5 == 0:
                        # This message's ack was dropped: the server resends it and the
                        # client acks it again.
                        await await_until(
                            lambda n=i + 1: acks.count(n) >= 2, 10, f"seq {i + 1} resent"
                        )
            assert [m.content for m in got] == [f"r{i}" for i in range(100)]
            assert [m.seq for m in got] == list(range(1, 101))
            assert client._queue.empty()  # no duplicate reached the application
        assert len(dropped) == 20 and resends(srv) >= 20


async def test_delayed_acks_lost_at_the_end_of_bursts_still_exactly_once() -> None:
    """The client's default, delayed and cumulative, acks: the ack that covers the
    end of each burst of 10 is lost, so the server resends the burst's tail; the
    application still sees every message once, in order."""
    settings = [*FAST, "delivery.ack_timeout=0.2", "delivery.ack_retries=10"]
    with running_server(workers=2, settings=settings) as srv:
        dropped: set[int] = set()
        acks: list[int] = []

        def drop(room: str, seq: int) -> bool:
            acks.append(seq)
            # seq 1 is a warm-up (its ack puts the client in reliable mode); then
            # bursts 2..11, 12..21, ...: the first ack of each burst's end is lost.
            if seq > 1 and seq % 10 == 1 and seq not in dropped:
                dropped.add(seq)
                return True
            return False

        async with ChatClient(srv.url, user="delayed", rooms=["burst"], drop_ack=drop) as client:
            publisher = await connect_client(srv.url, user="pub", rooms=["burst"])
            got: list[Message] = []
            stream = client.messages()
            async with closing([publisher]):
                await publisher.send(type="message", room="burst", content="warm-up")
                got.append(await asyncio.wait_for(anext(stream), scaled(10)))
                # Reliable mode is on once this ack has gone.
                await await_until(lambda: 1 in acks, 10, "the warm-up acked")
                for burst in range(10):
                    before = resends(srv)
                    for i in range(10):
                        await publisher.send(type="message", room="burst", content=f"b{burst}.{i}")
                    for _ in range(10):
                        got.append(await asyncio.wait_for(anext(stream), scaled(10)))
                    # The burst's end was acked once (lost); the server resends the
                    # tail, the client drops the copies and acks the end again.
                    end = got[-1].seq
                    await await_until(
                        lambda n=end: acks.count(n) >= 2, 10, f"seq {end} acked again"
                    )
                    assert resends(srv) > before
            assert [m.seq for m in got] == list(range(1, 102))
            assert [m.content for m in got[1:]] == [
                f"b{b}.{i}" for b in range(10) for i in range(10)
            ]
            assert client._queue.empty()  # no duplicate reached the application
        assert len(dropped) == 10


async def test_client_that_never_acks_gets_backoff_then_4409() -> None:
    settings = ["delivery.ack_timeout=0.3", "delivery.ack_retries=3"]
    with running_server(workers=1, settings=settings) as srv:
        raw = await asyncio.to_thread(RawClient, srv.port, "/ws?user=mute&room=quiet")
        publisher = await connect_client(srv.url, user="pub", rooms=["quiet"])
        try:
            raw.send_json({"type": "ack", "room": "quiet", "seq": 0})  # reliable mode on
            await publisher.send(type="message", room="quiet", content="only", id="x")
            await publisher.recv_type("ack")
            arrivals: list[float] = []
            frames: list[dict[str, object]] = []
            code = None
            while code is None:
                opcode, payload = await asyncio.to_thread(raw.recv_frame)
                if opcode == OP_CLOSE:
                    code = close_code(payload) or 1005  # 1005: a close without a code
                elif opcode == OP_TEXT:
                    frame = json.loads(payload)
                    if frame["type"] == "message":
                        arrivals.append(time.monotonic())
                        frames.append(frame)
            assert code == 4409
            assert len(frames) == 4  # the message, then ack_retries resends
            assert all(f == frames[0] for f in frames)  # same seq and id each time
            gaps = [b - a for a, b in itertools.pairwise(arrivals)]
            assert all(later > earlier for earlier, later in itertools.pairwise(gaps)), gaps
        finally:
            raw.close()
            await publisher.close()


async def test_client_library_survives_a_killed_shard() -> None:
    """kill -9 of the shard holding the client's connection while 2,000 messages are
    published from other shards: the application sees all 2,000, once, in order."""
    with running_server(workers=3, settings=[*FAST, "delivery.history=5000"]) as srv:
        async with ChatClient(srv.url, user="survivor", backoff=(0.05, 0.5)) as client:
            home, room, publisher = await room_of_three(srv.url, client, "sv")
            async with closing([publisher]):
                halfway = asyncio.Event()
                receiving = asyncio.create_task(
                    take_messages(client, 2000, timeout=120, progress=(200, halfway))
                )

                async def publish() -> None:
                    for i in range(2000):
                        await publisher.send(type="message", room=room, content=f"m{i}")
                        if i % 50 == 0:
                            await asyncio.sleep(0.005)

                publishing = asyncio.create_task(publish())
                # Mid-stream: the client has 200 of the 2,000.
                await asyncio.wait_for(halfway.wait(), scaled(60))
                os.kill(srv.shard_pids()[home], signal.SIGKILL)
                await publishing
                got = await receiving
        assert client.reconnects >= 1
        assert [m.content for m in got] == [f"m{i}" for i in range(2000)]
        assert [m.seq for m in got] == list(range(1, 2001))


def test_chat_command(server: Server) -> None:
    """`shardchat chat` prints the room and sends what is typed."""
    proc = subprocess.Popen(
        [SHARDCHAT, "chat", "--user", "typist", "--room", "tty", server.url],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = proc.communicate("hello from the terminal\n", timeout=scaled(20))
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "typist in tty" in out
    assert "[1] typist: hello from the terminal" in out


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_a_reader_behind_on_a_shard_that_does_not_own_the_room_gets_resends_first(
    kind: str, store_dir: Path
) -> None:
    """A reliable reader 200 messages behind, on a shard that keeps only a tail of
    a room another shard owns (with the store): its unacked messages are resent
    as the core protocol says, and 4409 comes only after ``ack_retries``."""
    room = room_owned_by(0, workers=2, prefix="rel")
    settings = [*FAST, f"storage.kind={kind}", f"storage.dir={store_dir}",
                "delivery.ack_timeout=0.2", "delivery.ack_retries=2"]  # fmt: skip

    async def run(url: str) -> tuple[int | None, int]:
        pub, reader = await clients_on_shards(url, [0, 1])
        async with closing([pub, reader]):
            await pub.join(room)
            await reader.join(room)
            await reader.send(type="ack", room=room, seq=0)  # reliable mode
            for i in range(200):
                await pub.send(type="message", room=room, content=f"m{i}", id=f"m{i}")
            acks = 0
            while acks < 200:
                if (await pub.recv(10))["type"] == "ack":
                    acks += 1
            seen = 0
            try:
                while True:
                    frame = await reader.recv(10)
                    if frame["type"] == "message":
                        seen += 1
            except ConnectionClosed as exc:
                return (exc.rcvd.code if exc.rcvd else None), seen

    with running_server(2, settings) as server:
        code, seen = asyncio.run(run(server.url))
    assert code == 4409
    assert seen > 200, f"closed {code} after {seen} messages, none resent"
