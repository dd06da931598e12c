"""History paging (docs/PROTOCOL.md, Extensions): `history` with `limit` alone returns
the latest messages, with `before` the ones before a seq; on every shard, for a room
whose history spans restarts of two shards, and for a shard that had dropped the room."""

from __future__ import annotations

import os
import signal
from typing import Any

from tests.support.helpers import (
    FAST,
    Client,
    clients_on_shards,
    closing,
    dropped_room,
    publish,
    room_owned_by,
    running_server,
)


async def page(client: Client, room: str, **query: Any) -> tuple[list[int], list[str], int]:
    """A `history` request: the seqs and contents sent, and history_end's seq."""
    await client.send(type="history", room=room, **query)
    seqs: list[int] = []
    contents: list[str] = []
    while True:
        frame = await client.recv(20)
        if frame["type"] == "message" and frame["room"] == room:
            seqs.append(frame["seq"])
            contents.append(frame["content"])
        elif frame["type"] == "history_end":
            assert frame["room"] == room
            return seqs, contents, frame["seq"]


async def test_latest_and_before_across_two_shard_restarts() -> None:
    with running_server(workers=3, settings=FAST) as srv:
        room = room_owned_by(0, prefix="paged")
        contents = [f"a:{i}" for i in range(10)] + [f"b:{i}" for i in range(10)]
        contents += [f"c:{i}" for i in range(10)]
        (pub,) = await clients_on_shards(srv.url, [1], prefix="pa")
        async with closing([pub]):
            await pub.join(room)
            await publish(pub, room, 10, "a")
        # The room's owner is killed: the restarted shard rebuilds the room from the rings.
        os.kill(srv.shard_pids()[0], signal.SIGKILL)
        srv.wait_started(4)
        (pub,) = await clients_on_shards(srv.url, [2], prefix="pb")
        async with closing([pub]):
            await pub.join(room)
            await publish(pub, room, 10, "b")
        # Then another shard, which held a copy.
        os.kill(srv.shard_pids()[1], signal.SIGKILL)
        srv.wait_started(5)
        (pub,) = await clients_on_shards(srv.url, [0], prefix="pc")
        async with closing([pub]):
            await pub.join(room)
            await publish(pub, room, 10, "c")
        readers = await clients_on_shards(srv.url, [0, 1, 2], prefix="reader")
        async with closing(readers):
            for reader in readers:
                # A member, and one that only asks: both get the same pages.
                if reader.shard != 2:
                    await reader.join(room)
                seqs, got, end = await page(reader, room, limit=12)
                assert seqs == list(range(19, 31)) and got == contents[18:], reader.shard
                assert end == 30
                seqs, got, end = await page(reader, room, limit=12, before=19)
                assert seqs == list(range(7, 19)) and got == contents[6:18], reader.shard
                assert end == 18
                seqs, got, _ = await page(reader, room, limit=12, before=7)
                assert seqs == list(range(1, 7)) and got == contents[:6]
                assert await page(reader, room, limit=12, before=1) == ([], [], 0)
                # `since` keeps its meaning: the oldest `limit` after it.
                seqs, _, end = await page(reader, room, since=4, limit=3)
                assert seqs == [5, 6, 7] and end == 7
                seqs, _, _ = await page(reader, room, since=4, before=8)
                assert seqs == [5, 6, 7]
                seqs, _, _ = await page(reader, room)
                assert seqs == list(range(1, 31))


async def test_latest_from_a_shard_that_dropped_the_room() -> None:
    """A shard that dropped its idle copy of the room fetches it back from the owner
    before a join without `since` (or a `history`) is answered: a late joiner there
    sees the latest messages."""
    async with dropped_room("dropped") as dropped:
        room, late = dropped.room, dropped.late
        joined = await late.join(room)
        assert joined["seq"] == 20
        seqs, got, end = await page(late, room, limit=5)
        assert seqs == list(range(16, 21))
        assert got == [f"x:{i}" for i in range(15, 20)] and end == 20
        seqs, _, _ = await page(late, room, limit=5, before=16)
        assert seqs == list(range(11, 16))
