"""A `message`'s `id` is a request id: reusing one never loses a message.

Clients written elsewhere number their requests per connection ("1", "2", ...)
and start again after a reconnect. Only the optional `key` asks the server to
deduplicate (PROTOCOL.md, Extensions, Idempotent publishes).
"""

from __future__ import annotations

from tests.support.helpers import (
    Server,
    clients_on_shards,
    closing,
    collect,
    connect_client,
    room_owned_by,
)


async def test_a_second_connection_reusing_id_1_in_another_room_is_delivered(
    server: Server,
) -> None:
    room_a = room_owned_by(0, prefix="ids-a")
    room_b = room_owned_by(1, prefix="ids-b")
    (first,) = await clients_on_shards(server.url, [0], prefix="ids-ada-a")
    user = first.user
    async with closing([first]):
        await first.join(room_a)
        await first.send(type="message", room=room_a, content="first in A", id="1")
        ack = await first.recv_type("ack")
        assert ack == {"type": "ack", "room": room_a, "seq": 1, "id": "1"}
        # A second connection of the same user (a new tab, or the program restarted),
        # on shard 1, and bob on shard 2.
        for _ in range(400):  # the kernel picks the shard
            second = await connect_client(server.url, user=user)
            if second.shard == 1:
                break
            await second.close()
        else:
            raise AssertionError("no second connection landed on shard 1")
        (bob,) = await clients_on_shards(server.url, [2], prefix="ids-bob")
        async with closing([second, bob]):
            assert len({first.shard, second.shard, bob.shard}) == 3
            await second.join(room_b)
            await bob.join(room_b)
            await second.send(type="message", room=room_b, content="hello B", id="1")
            ack = await second.recv_type("ack")
            assert ack["room"] == room_b and ack["id"] == "1"
            (got,) = await collect(bob, room_b, 1)
            assert (got["content"], got["sender"], got["seq"]) == ("hello B", user, ack["seq"])
            # The same id again, in the first room: a new message, seq 2.
            await first.send(type="message", room=room_a, content="again in A", id="1")
            ack = await first.recv_type("ack")
            assert (ack["room"], ack["seq"], ack["id"]) == (room_a, 2, "1")


async def test_ids_numbered_per_connection_lose_nothing_over_reconnects(server: Server) -> None:
    """A client that numbers its requests from 1 on every connection: every message of
    every connection reaches a member, in order, and each ack answers its own request."""
    room = room_owned_by(2, prefix="ids-count")
    (watcher,) = await clients_on_shards(server.url, [1], prefix="ids-watch")
    async with closing([watcher]):
        await watcher.join(room)
        sent: list[str] = []
        for run in range(3):
            client = await connect_client(server.url, user="ids-counter")
            async with closing([client]):
                await client.join(room)
                for n in range(1, 4):
                    content = f"run {run} message {n}"
                    await client.send(type="message", room=room, content=content, id=str(n))
                    ack = await client.recv_type("ack")
                    assert (ack["room"], ack["id"]) == (room, str(n))
                    sent.append(content)
        got = await collect(watcher, room, len(sent))
        assert [m["content"] for m in got] == sent
        assert [m["seq"] for m in got] == list(range(1, len(sent) + 1))


async def test_a_key_is_deduplicated_per_room(server: Server) -> None:
    """The same `key` in the same room is one message (acked with its seq); in
    another room it is a new one."""
    rooms = [room_owned_by(0, prefix="ids-key"), room_owned_by(2, prefix="ids-key")]
    sender, member = await clients_on_shards(server.url, [1, 0], prefix="ids-key-u")
    async with closing([sender, member]):
        for room in rooms:
            await sender.join(room)
            await member.join(room)
        acks = []
        for room, request_id in [(rooms[0], "a"), (rooms[0], "b"), (rooms[1], "c")]:
            await sender.send(type="message", room=room, content="x", id=request_id, key="k1")
            acks.append(await sender.recv_type("ack"))
        assert [(a["room"], a["seq"], a["id"]) for a in acks] == [
            (rooms[0], 1, "a"),
            (rooms[0], 1, "b"),
            (rooms[1], 1, "c"),
        ]
        await sender.send(type="message", room=rooms[0], content="marker")
        got = await collect(member, rooms[0], 2)
        assert [m["content"] for m in got] == ["x", "marker"]


async def test_a_bad_key_is_refused_and_nothing_is_sequenced(server: Server) -> None:
    room = room_owned_by(1, prefix="ids-bad")
    (client,) = await clients_on_shards(server.url, [0], prefix="ids-bad-u")
    async with closing([client]):
        await client.join(room)
        await client.send(type="message", room=room, content="x", id="q", key="")
        error = await client.recv_type("error")
        assert (error["code"], error["id"]) == ("bad_request", "q")
        assert "key" in error["reason"]
        await client.send(type="message", room=room, content="fine", id="r")
        ack = await client.recv_type("ack")
        assert (ack["seq"], ack["id"]) == (1, "r")
