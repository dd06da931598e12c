"""ChatClient fails clearly and recovers by itself: permanent refusals raise at once with
the server's reason, transient failures are retried within the bounds it was given, a
resent publish keeps its id, and closing (or cancelling) closes with 1000."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
from collections.abc import AsyncIterator
from typing import Any

import pytest
from websockets.asyncio.server import ServerConnection, serve

from shardchat.auth import make_token
from shardchat.client.chatclient import (
    ChatClient,
    ChatError,
    ClientEvent,
    Closed,
    Refused,
    Unavailable,
)
from shardchat.testing.wait import await_until
from tests.support.helpers import (
    cleanup_server,
    closing,
    connect_client,
    free_port,
    room_of_three,
    running_server,
    scaled,
    scrape,
    start_server,
    take_messages,
)


async def test_bad_user_name_raises_refused_with_the_reason(server: Any) -> None:
    client = ChatClient(server.url, user="not a name!", rooms=["lobby"])
    with pytest.raises(Refused) as caught:
        await asyncio.wait_for(client.start(), scaled(2))
    assert caught.value.status == 400
    assert "user must be 1-64 characters" in caught.value.reason
    assert "HTTP 400" in str(caught.value)


async def test_nothing_listening_raises_unavailable_within_the_timeout() -> None:
    client = ChatClient(f"ws://127.0.0.1:{free_port()}/ws", user="ada", timeout=1)
    with pytest.raises(Unavailable) as caught:
        await asyncio.wait_for(client.start(), 1 + scaled(1))
    assert caught.value.attempts >= 2  # it did retry
    assert "refused" in caught.value.last.lower() or "errno" in caught.value.last.lower()


async def test_attempts_bound_the_retries() -> None:
    client = ChatClient(f"ws://127.0.0.1:{free_port()}/ws", user="ada", attempts=3)
    with pytest.raises(Unavailable) as caught:
        await asyncio.wait_for(client.start(), scaled(10))
    assert caught.value.attempts == 3


async def test_bad_room_name_raises_chat_error(server: Any) -> None:
    client = ChatClient(server.url, user="ada", rooms=["no spaces"])
    with pytest.raises(ChatError) as caught:
        await asyncio.wait_for(client.start(), scaled(5))
    assert caught.value.code == "bad_request"
    assert "room" in caught.value.reason


async def test_missing_token_and_refused_join_by_the_rooms_claim() -> None:
    secret = "s3cret-for-tests-of-at-least-32-bytes"
    with running_server(workers=2, settings=[f"auth.secret={secret}"]) as srv:
        with pytest.raises(Refused) as refused:
            await asyncio.wait_for(ChatClient(srv.url, user="ada").start(), scaled(5))
        assert refused.value.status == 401 and "token" in refused.value.reason
        token = make_token(secret, {"sub": "ada", "rooms": ["open"]})
        with pytest.raises(ChatError) as caught:
            await asyncio.wait_for(
                ChatClient(srv.url, token=token, rooms=["open", "secret"]).start(), scaled(5)
            )
        assert caught.value.code == "unauthorized" and "secret" in caught.value.reason
        # A join refused later raises from join() and leaves the client usable.
        async with ChatClient(srv.url, token=token, rooms=["open"]) as client:
            with pytest.raises(ChatError):
                await asyncio.wait_for(client.join("secret"), scaled(5))
            assert "secret" not in client.rooms
            assert await asyncio.wait_for(client.send("open", "still here"), scaled(5)) == 1


async def test_room_full_raises_chat_error() -> None:
    with running_server(workers=1, settings=["limits.room_size=1"]) as srv:
        async with ChatClient(srv.url, user="first", rooms=["tiny"]):
            with pytest.raises(ChatError) as caught:
                await asyncio.wait_for(
                    ChatClient(srv.url, user="second", rooms=["tiny"]).start(), scaled(5)
                )
        assert caught.value.code == "room_full"


async def test_503_is_retried_until_a_place_is_free() -> None:
    """A full server (HTTP 503) is transient: the client says so and keeps trying."""
    with running_server(workers=1, settings=["server.max_connections=1"]) as srv:
        filler = await connect_client(srv.url, user="filler")
        events: list[ClientEvent] = []
        client = ChatClient(
            srv.url, user="patient", rooms=["r"], backoff=(0.05, 0.2), on_event=events.append
        )
        starting = asyncio.create_task(client.start())
        try:
            await await_until(
                lambda: any(e.kind == "disconnected" and "HTTP 503" in e.detail for e in events),
                10,
                "a disconnect on HTTP 503",
            )
            assert not starting.done()
            await filler.close()
            await asyncio.wait_for(starting, scaled(10))
            assert await asyncio.wait_for(client.send("r", "in at last"), scaled(5)) == 1
        finally:
            await client.close()


async def test_close_and_cancel_send_1000() -> None:
    with running_server(workers=1) as srv:
        async with ChatClient(srv.url, user="polite", rooms=["r"]):
            pass

        async def forever() -> None:
            async with ChatClient(srv.url, user="cancelled", rooms=["r"]) as chat:
                async for _ in chat.messages():
                    pass

        task = asyncio.create_task(forever())
        await asyncio.sleep(0)
        await await_until(
            lambda: scrape(srv).get("shardchat_connections", {}).get((("shard", "0"),)) == 1,
            10,
            "the cancelled client connected",
        )
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        srv.wait_for_log(lambda ev: sum(e.get("event") == "conn_close" for e in ev) >= 2)
        closed = scrape(srv)["shardchat_connections_closed_total"]
        assert closed[(("code", "1000"),)] == 2
        assert closed.get((("code", "1011"),), 0) == 0


async def test_a_closed_client_ends_its_stream_and_refuses_calls(server: Any) -> None:
    client = ChatClient(server.url, user="done", rooms=["r"])
    await client.start()
    stream = client.messages()
    await client.close()
    assert [m async for m in stream] == []
    with pytest.raises(Closed):
        await client.send("r", "too late")


@contextlib.asynccontextmanager
async def fake_server(
    handler: Any,
) -> AsyncIterator[int]:
    port = free_port()
    async with serve(handler, "127.0.0.1", port):
        yield port


async def test_a_resent_publish_keeps_its_id() -> None:
    """The first connection takes the publish and drops without an ack; after the
    reconnect the client sends it again with the same id and key (the server deduplicates
    by user, room and key); the second connection acks it."""
    publishes: list[dict[str, Any]] = []

    async def handler(ws: ServerConnection) -> None:
        await ws.send(json.dumps({"type": "welcome", "user": "ada", "shard": 0}))
        async for raw in ws:
            frame = json.loads(raw)
            if frame["type"] == "join":
                joined = {"type": "joined", "room": frame["room"], "seq": 0, "epoch": "e"}
                await ws.send(json.dumps({**joined, "count": 1, "users": ["ada"]}))
            elif frame["type"] == "message":
                publishes.append(frame)
                if len(publishes) == 1:
                    ws.transport.abort()  # lost with its ack
                    return
                await ws.send(json.dumps({"type": "ack", "id": frame["id"], "room": "r", "seq": 1}))

    async with fake_server(handler) as port:
        url = f"ws://127.0.0.1:{port}/ws"
        async with ChatClient(url, user="ada", rooms=["r"], backoff=(0.05, 0.1)) as client:
            assert await asyncio.wait_for(client.send("r", "once"), scaled(10)) == 1
            second = await asyncio.wait_for(client.send("r", "twice"), scaled(10))
    assert second == 1
    assert [p["content"] for p in publishes] == ["once", "once", "twice"]
    assert publishes[0]["id"] == publishes[1]["id"] != publishes[2]["id"]
    # Ids are unique to a client, not a counter every client repeats.
    other = ChatClient(url, user="ada")
    assert other._id_prefix != client._id_prefix


async def test_a_protocol_breaking_close_is_permanent() -> None:
    async def handler(ws: ServerConnection) -> None:
        await ws.send(json.dumps({"type": "welcome", "user": "ada", "shard": 0}))
        await ws.close(1008, "too many errors")

    async with fake_server(handler) as port:
        client = ChatClient(f"ws://127.0.0.1:{port}/ws", user="ada", rooms=["r"])
        with pytest.raises(Closed) as caught:
            await asyncio.wait_for(client.start(), scaled(5))
        assert caught.value.code == 1008 and caught.value.reason == "too many errors"
        # Once connected, the same close ends the stream with the error.
        client = ChatClient(f"ws://127.0.0.1:{port}/ws", user="ada")
        await asyncio.wait_for(client.start(), scaled(5))
        with pytest.raises(Closed):
            await take_messages(client, 1, timeout=5)
        await client.close()


async def test_full_restart_reconnects_and_reports_what_was_lost() -> None:
    """A full restart (1001 shutdown, a new epoch) is transient: the client comes back
    by itself, says the old messages could not be recovered, and takes the new ones."""
    srv = start_server(workers=2)
    port = srv.port
    try:
        events: list[ClientEvent] = []
        async with ChatClient(
            srv.url, user="ada", rooms=["r"], backoff=(0.05, 0.3), on_event=events.append
        ) as client:
            await client.send("r", "before")
            assert [m.content for m in await take_messages(client, 1, timeout=5)] == ["before"]
            # Off the loop: the client answers the shards' 1001 close while the server
            # stops (a blocked loop left every shard to wait out its close timeout, 5 s).
            await asyncio.to_thread(srv.stop)
            cleanup_server(srv)
            srv = start_server(workers=2, port=port)
            await await_until(
                lambda: any(e.kind == "reconnected" for e in events), 20, "a reconnect"
            )
            kinds = [e.kind for e in events]
            assert "disconnected" in kinds and "reconnected" in kinds
            assert any("1001" in e.detail for e in events if e.kind == "disconnected")
            assert await asyncio.wait_for(client.send("r", "after"), scaled(5)) == 1
            got = await take_messages(client, 1, timeout=5)
            assert [(m.seq, m.content) for m in got] == [(1, "after")]
    finally:
        cleanup_server(srv)


async def test_killing_the_shard_mid_stream_loses_nothing_both_ways() -> None:
    """kill -9 of the client's shard while it both publishes and receives: every one
    of its publishes is sequenced once and it sees every message once, in order."""
    fast = ["limits.rate=100000", "limits.burst=100000"]
    with running_server(workers=3, settings=fast) as srv:
        async with ChatClient(srv.url, user="streamer", backoff=(0.05, 0.5)) as client:
            home, room, watcher = await room_of_three(srv.url, client, "ks")
            async with closing([watcher]):
                receiving = asyncio.create_task(take_messages(client, 300, timeout=60))

                async def publish() -> None:
                    for i in range(300):
                        await client.send(room, f"m{i}")
                        if i == 100:
                            os.kill(srv.shard_pids()[home], signal.SIGKILL)

                await asyncio.wait_for(publish(), scaled(60))
                got = await receiving
                seen: list[str] = []
                while len(seen) < 300:
                    frame = await watcher.recv_type("message", timeout=20)
                    seen.append(frame["content"])
        assert client.reconnects >= 1
        assert [m.content for m in got] == [f"m{i}" for i in range(300)]
        assert [m.seq for m in got] == list(range(1, 301))
        assert seen == [f"m{i}" for i in range(300)]


async def test_a_gap_is_fetched_with_history_and_delivered_once_in_order() -> None:
    """The server announces ``gap`` 3..6 between live messages 2 and 7; the client
    asks ``history`` for the range and gets 3, 4 and 6 (5 is gone), with 7 sent
    again among them: the application gets 1..4, 6..9 once, in seq order, and
    the client counts one gap and one lost message."""
    asked: list[dict[str, Any]] = []

    def message(seq: int) -> str:
        return json.dumps(
            {
                "type": "message",
                "room": "r",
                "seq": seq,
                "sender": "bob",
                "content": f"m{seq}",
                "timestamp": 0,
                "id": f"i{seq}",
            }
        )

    async def handler(ws: ServerConnection) -> None:
        await ws.send(json.dumps({"type": "welcome", "user": "ada", "shard": 1}))
        async for raw in ws:
            frame = json.loads(raw)
            if frame["type"] == "join":
                joined = {"type": "joined", "room": "r", "seq": 0, "epoch": "e"}
                await ws.send(json.dumps({**joined, "count": 1, "users": ["ada"]}))
                for seq in (1, 2):
                    await ws.send(message(seq))
                await ws.send(json.dumps({"type": "gap", "room": "r", "first": 3, "last": 6}))
                for seq in (7, 8):
                    await ws.send(message(seq))
            elif frame["type"] == "history":
                asked.append(frame)
                for seq in (3, 4, 6, 7):
                    await ws.send(message(seq))
                await ws.send(json.dumps({"type": "history_end", "room": "r", "seq": 7}))
                await ws.send(message(9))

    async with fake_server(handler) as port:
        url = f"ws://127.0.0.1:{port}/ws"
        async with ChatClient(url, user="ada", rooms=["r"]) as client:
            got = await take_messages(client, 7, timeout=5)
            assert [m.seq for m in got] == [1, 2, 3, 4, 6, 7, 8]
            assert [m.content for m in got][2:4] == ["m3", "m4"]
            (more,) = await take_messages(client, 1, timeout=5)
            assert more.seq == 9
    assert [(a["room"], a["since"], a["limit"]) for a in asked] == [("r", 2, 4)]
    assert (client.gaps, client.lost) == (1, 1)
