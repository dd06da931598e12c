"""Admission control: a publish past a bounded queue is refused at once with
``overloaded`` and a ``retry_after``, and nothing that was acked is lost.

The publishers are plain ``websockets`` clients speaking only the original
protocol (``id`` is a request id; no ``key``): the error they get is one they
can act on (its ``id``, a ``retry_after`` in seconds), and it does not count
towards ``limits.max_errors``.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect

from shardchat.client.chatclient import ChatClient, ChatError
from shardchat.testing.rawws import encode_frame
from tests.support.helpers import (
    FAST,
    Client,
    RawClient,
    Server,
    clients_on_shards,
    closing,
    metric,
    raw_on_shard,
    room_owned_by,
    running_server,
    scaled,
)
from tests.support.redis_helpers import redis_server

BURST = 60  # past limits.max_errors (20): a refusal is not a client's error


def overloaded_total(srv: Server, queue: str) -> float:
    """``shardchat_overloaded_total{queue=...}``, and it equals the error counter's share."""
    return metric(srv, "shardchat_overloaded_total", queue=queue)


async def ws_on_shard(srv: Server, shard: int, user: str) -> tuple[ClientConnection, int]:
    """A plain websockets connection that landed on ``shard`` (its ``welcome.shard``)."""
    for attempt in range(200):
        ws = await connect(f"{srv.url}?user={user}{attempt}", open_timeout=scaled(10))
        welcome = json.loads(await asyncio.wait_for(ws.recv(), scaled(5)))
        assert welcome["type"] == "welcome"
        if welcome["shard"] == shard:
            return ws, welcome["shard"]
        await ws.close()
    raise AssertionError(f"no connection landed on shard {shard}")


async def recv(ws: ClientConnection, timeout: float = 10) -> dict[str, Any]:
    frame: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), scaled(timeout)))
    return frame


async def join(ws: ClientConnection, room: str) -> None:
    await ws.send(json.dumps({"type": "join", "room": room}))
    while (await recv(ws))["type"] != "joined":
        pass


def publish_request(room: str, tag: str, i: int) -> dict[str, str]:
    """The original protocol's publish: ``id`` is a request id."""
    return {"type": "message", "room": room, "content": f"{tag}:{i}", "id": f"{tag}{i}"}


async def burst(ws: ClientConnection, room: str, tag: str, count: int) -> None:
    for i in range(count):
        await ws.send(json.dumps(publish_request(room, tag, i)))


async def answers(
    ws: ClientConnection, count: int, timeout: float = 10
) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """The next ``count`` answers (ack or error) by request id: (acks, errors)."""
    acks: dict[str, dict[str, Any]] = {}
    errors: dict[str, dict[str, Any]] = {}
    while len(acks) + len(errors) < count:
        frame = await recv(ws, timeout)
        if frame["type"] == "ack":
            acks[frame["id"]] = frame
        elif frame["type"] == "error":
            errors[frame["id"]] = frame
    return acks, errors


async def delivered_until(sub: Client, room: str, marker: str) -> list[dict[str, Any]]:
    """The room's messages ``sub`` receives up to and including ``marker``."""
    got: list[dict[str, Any]] = []
    while not got or got[-1]["content"] != marker:
        frame = await sub.recv(10)
        if frame["type"] == "message" and frame["room"] == room:
            got.append(frame)
    return got


def assert_overloaded(error: dict[str, Any]) -> None:
    assert error["code"] == "overloaded", error
    assert isinstance(error["retry_after"], int | float) and error["retry_after"] > 0, error
    assert "retry" in error["reason"], error


async def test_a_burst_past_the_forwards_in_flight_is_refused_at_once() -> None:
    """Two shards; the room's owner (shard 0) is stopped, so it sequences nothing.
    A raw client on shard 1 sends a burst of 60: the first ``overload.forwards``
    (10) wait for the owner, every other one is answered ``overloaded`` while the
    owner is still stopped (so at once, not after ``publish_timeout``), and the
    connection stays open past ``limits.max_errors``. Once the owner runs, the
    10 are acked, and a member on the owner's shard receives exactly those, in
    seq order, then a later message: accepted messages flow on."""
    settings = [*FAST, "overload.forwards=10"]
    with running_server(workers=2, settings=settings) as srv:
        room = room_owned_by(0, workers=2, prefix="over")
        (sub,) = await clients_on_shards(srv.url, [0], prefix="oversub")
        pub, shard = await ws_on_shard(srv, 1, "overpub")
        async with closing([sub]):
            try:
                assert sub.shard == 0 and shard == 1
                await sub.join(room)
                await join(pub, room)
                owner = srv.shard_pids()[0]
                os.kill(owner, signal.SIGSTOP)
                try:
                    await burst(pub, room, "b", BURST)
                    _, errors = await answers(pub, BURST - 10)
                finally:
                    os.kill(owner, signal.SIGCONT)
                assert sorted(errors) == sorted(f"b{i}" for i in range(10, BURST))
                for error in errors.values():
                    assert_overloaded(error)
                acks, late = await answers(pub, 10)
                assert not late and sorted(acks) == sorted(f"b{i}" for i in range(10))
                # Accepted messages flow on: a later publish is acked and delivered.
                await pub.send(
                    json.dumps({"type": "message", "room": room, "content": "end", "id": "end"})
                )
                more, refused = await answers(pub, 1)
                assert "end" in more and not refused
                got = await delivered_until(sub, room, "end")
                assert [m["content"] for m in got] == [f"b:{i}" for i in range(10)] + ["end"]
                assert [m["seq"] for m in got] == sorted(a["seq"] for a in acks.values()) + [
                    more["end"]["seq"]
                ]
                assert overloaded_total(srv, "forwards") == BURST - 10
            finally:
                await pub.close()


async def raw_answers(raw: RawClient, count: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """The next ``count`` answers (ack or error) a raw client reads, by request id."""
    acks: dict[str, Any] = {}
    errors: dict[str, Any] = {}
    while len(acks) + len(errors) < count:
        _, payload = await asyncio.to_thread(raw.recv_frame)
        frame = json.loads(payload)
        if frame["type"] in ("ack", "error"):
            (acks if frame["type"] == "ack" else errors)[frame["id"]] = frame
    return acks, errors


async def test_a_turn_past_its_outgoing_bytes_is_refused() -> None:
    """On the room's owner, a raw client writes 200 publishes at once (one
    ``sendall``): they make more room frames in one loop turn than
    ``overload.turn_bytes`` (4 KiB) allows, so the rest of that turn is refused
    ``overloaded``. Every acked message reaches the member on the other shard,
    once and in seq order, then a later one; no refused one does."""
    count = 200
    settings = [*FAST, "overload.turn_bytes=4096"]
    with running_server(workers=2, settings=settings) as srv:
        room = room_owned_by(0, workers=2, prefix="turn")
        (sub,) = await clients_on_shards(srv.url, [1], prefix="turnsub")
        raw = await raw_on_shard(srv, 0, f"/ws?user=turnpub&room={room}")
        async with closing([sub]):
            try:
                assert sub.shard == 1
                await sub.join(room)
                frames = [
                    encode_frame(json.dumps(publish_request(room, "t", i)).encode())
                    for i in range(count)
                ]
                await asyncio.to_thread(raw.sock.sendall, b"".join(frames))
                acks, errors = await raw_answers(raw, count)
                assert errors, "a burst past turn_bytes was not refused"
                for error in errors.values():
                    assert_overloaded(error)
                raw.send_json(publish_request(room, "end", 0))
                more, _ = await raw_answers(raw, 1)
                assert "end0" in more
                got = await delivered_until(sub, room, "end:0")
                accepted = sorted(acks.values(), key=lambda a: a["seq"])
                assert [m["content"] for m in got[:-1]] == [f"t:{a['id'][1:]}" for a in accepted]
                assert [m["seq"] for m in got] == [a["seq"] for a in accepted] + [
                    more["end0"]["seq"]
                ]
                assert overloaded_total(srv, "turn") == len(errors)
            finally:
                raw.close()


async def test_publishes_past_the_redis_pipeline_are_refused() -> None:
    """``broker.kind = "redis"``: Redis is stopped (SIGSTOP), so the pipeline in
    flight cannot return. A raw client sends 40: ``overload.pipeline`` (10) wait
    for or ride in the pipeline, the other 30 are answered ``overloaded`` while
    Redis is still stopped. Once it runs, the 10 are acked and a member on the
    other shard receives exactly them, in seq order, then a later message."""
    count = 40
    with redis_server() as redis:
        settings = [
            *FAST,
            "broker.kind=redis",
            f"redis.url={redis.url}",
            "redis.timeout=30",
            "overload.pipeline=10",
        ]
        with running_server(workers=2, settings=settings) as srv:
            room = "piped"
            (sub,) = await clients_on_shards(srv.url, [1], prefix="pipesub")
            pub, shard = await ws_on_shard(srv, 0, "pipepub")
            async with closing([sub]):
                try:
                    assert sub.shard == 1 and shard == 0
                    await sub.join(room)
                    await join(pub, room)
                    assert redis.proc is not None
                    redis.proc.send_signal(signal.SIGSTOP)
                    try:
                        await burst(pub, room, "p", count)
                        _, errors = await answers(pub, count - 10)
                    finally:
                        redis.proc.send_signal(signal.SIGCONT)
                    assert sorted(errors) == sorted(f"p{i}" for i in range(10, count))
                    for error in errors.values():
                        assert_overloaded(error)
                    acks, late = await answers(pub, 10)
                    assert not late and sorted(acks) == sorted(f"p{i}" for i in range(10))
                    await pub.send(json.dumps(publish_request(room, "end", 0)))
                    more, _ = await answers(pub, 1)
                    got = await delivered_until(sub, room, "end:0")
                    assert [m["content"] for m in got] == [f"p:{i}" for i in range(10)] + ["end:0"]
                    assert [m["seq"] for m in got] == sorted(a["seq"] for a in acks.values()) + [
                        more["end0"]["seq"]
                    ]
                    assert overloaded_total(srv, "pipeline") == count - 10
                finally:
                    await pub.close()


async def test_chatclient_raises_overloaded_with_retry_after() -> None:
    """ChatClient's ``send`` raises ChatError ``overloaded`` with the server's
    ``retry_after``, and a send after the owner caught up is acked."""
    settings = [*FAST, "overload.forwards=1"]
    with running_server(workers=2, settings=settings) as srv:
        room = room_owned_by(0, workers=2, prefix="cc")
        for attempt in range(200):
            client = ChatClient(srv.url, user=f"cc{attempt}", rooms=[room])
            await asyncio.wait_for(client.start(), scaled(10))
            if client.shard == 1:
                break
            await client.close()
        else:
            raise AssertionError("no ChatClient landed on shard 1")
        try:
            owner = srv.shard_pids()[0]
            os.kill(owner, signal.SIGSTOP)
            try:
                # Two tasks: they run, and write, in the order they were made.
                first = asyncio.ensure_future(client.send(room, "waits for the owner"))
                second = asyncio.ensure_future(client.send(room, "refused"))
                with pytest.raises(ChatError) as caught:
                    await asyncio.wait_for(second, scaled(10))
            finally:
                os.kill(owner, signal.SIGCONT)
            assert caught.value.code == "overloaded" and caught.value.retry_after == 1.0
            seq = await asyncio.wait_for(first, scaled(10))
            assert await asyncio.wait_for(client.send(room, "after"), scaled(10)) == seq + 1
        finally:
            await client.close()
