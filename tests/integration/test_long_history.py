"""A room's long history with the room store: `delivery.history` messages on disk,
the recent part in memory once per box. Paged back with `history` and `before`
from a shard that does not own the room, a `join` with `since` older than what
any shard holds in memory (recovered, with every message), and
`delivery.history_ttl` (an older message is never replayed)."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

from shardchat.brokers.sequencer import owner_of
from shardchat.storage.boxdir import META, store_path
from shardchat.storage.transactions import connect, store_rows
from tests.support.helpers import (
    FAST,
    Client,
    clients_on_shards,
    closing,
    room_owned_by,
    running_server,
)

WORKERS = 3
EPOCH = "long-epoch"


def _json(room: str, seq: int, stamp_ms: int) -> bytes:
    return json.dumps(
        {
            "type": "message", "room": room, "sender": "writer", "content": f"c{seq}",
            "seq": seq, "timestamp": stamp_ms, "id": f"w-{seq}",
        },
        separators=(",", ":"),
    ).encode()  # fmt: skip


def write_store(directory: Path, room: str, stamps: list[float]) -> None:
    """``room``'s messages 1..len(stamps) (each stamped in wall seconds) written
    straight into its owner's store file, as a server of WORKERS shards leaves it."""
    (directory / META).write_text(json.dumps({"epoch": EPOCH, "workers": WORKERS}))
    db = connect(store_path(directory, owner_of(room, WORKERS), WORKERS), "OFF")
    try:
        db.execute("BEGIN")
        store_rows(
            db,
            (
                (room, seq, at, "", _json(room, seq, int(at * 1000)))
                for seq, at in enumerate(stamps, start=1)
            ),
        )
        db.execute("COMMIT")
    finally:
        db.close()


async def history_page(client: Client, room: str, **query: Any) -> tuple[list[int], int]:
    """One `history` answer: its messages' seqs (contents checked) and history_end's seq."""
    await client.send(type="history", room=room, **query)
    seqs: list[int] = []
    while True:
        frame = await client.recv(30)
        if frame["type"] == "history_end":
            return seqs, frame["seq"]
        if frame["type"] == "message" and frame["room"] == room:
            assert frame["content"] == f"c{frame['seq']}", frame
            seqs.append(frame["seq"])


async def resume(client: Client, room: str, since: int) -> tuple[dict[str, Any], list[int]]:
    """A `join` with `since` and the old epoch: the `joined` and the replayed seqs."""
    joined = await client.join(room, since=since, epoch=EPOCH)
    seqs: list[int] = []
    while len(seqs) < joined["seq"] - since:
        frame = await client.recv(30)
        if frame["type"] == "message" and frame["room"] == room:
            seqs.append(frame["seq"])
    return joined, seqs


def test_100000_stored_messages_paged_back_from_a_shard_that_does_not_own_the_room(
    store_dir: Path,
) -> None:
    """Every seq once, in order, paged back with `before` from shard 1 (the room's
    owner is shard 0); a resume on shard 2 from 3,000 back (more than any shard
    keeps in memory) is recovered with every message; so is one on the owner.
    100,000 messages (what the store is sold to keep), 100 times what the owner
    keeps in memory (delivery.history_memory), 20 pages of 5,000."""
    count = 100_000
    room = room_owned_by(0, WORKERS, prefix="long")
    now = time.time()
    write_store(store_dir, room, [now] * count)
    settings = [*FAST, f"storage.dir={store_dir}", f"delivery.history={count}"]

    async def run(url: str) -> None:
        async with closing(await clients_on_shards(url, [1, 2, 0])) as (pager, late, owner):
            seen: list[int] = []
            before: int | None = None
            while True:
                query: dict[str, Any] = {"limit": 5000}
                if before is not None:
                    query["before"] = before
                seqs, end = await history_page(pager, room, **query)
                if not seqs:
                    assert end == 0
                    break
                assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), seqs[:3]
                assert end == seqs[-1]
                seen = seqs + seen
                before = seqs[0]
            assert seen == list(range(1, count + 1))
            for client in (late, owner):
                joined, replayed = await resume(client, room, count - 3000)
                assert joined["recovered"] is True and joined["seq"] == count, joined
                assert replayed == list(range(count - 2999, count + 1)), client.shard
            # The room goes on after the stored part, on every shard.
            await owner.send(type="message", room=room, content="next", id="n1")
            assert (await owner.recv_type("ack"))["seq"] == count + 1
            seqs, _ = await history_page(pager, room, limit=3, before=count)
            assert seqs == [count - 3, count - 2, count - 1]

    with running_server(WORKERS, settings) as server:
        asyncio.run(run(server.url))


def test_messages_older_than_the_ttl_are_never_replayed(store_dir: Path) -> None:
    """Stored messages stamped an hour ago, then recent ones, with
    `delivery.history_ttl` = 10 minutes: a resume from 0 and `history` on the
    owner and on another shard get the recent ones alone (not recovered)."""
    room = room_owned_by(0, WORKERS, prefix="ttl")
    now = time.time()
    old, recent = 300, 20
    write_store(store_dir, room, [now - 3600] * old + [now] * recent)
    settings = [*FAST, f"storage.dir={store_dir}", "delivery.history_ttl=600"]
    wanted = list(range(old + 1, old + recent + 1))

    async def run(url: str) -> None:
        async with closing(await clients_on_shards(url, [0, 1])) as clients:
            for client in clients:
                seqs, end = await history_page(client, room)
                assert seqs == wanted and end == old + recent, client.shard
                seqs, _ = await history_page(client, room, limit=50, before=old + 5)
                assert seqs == wanted[:4], client.shard
                joined = await client.join(room, since=0, epoch=EPOCH)
                assert joined["recovered"] is False and joined["seq"] == old + recent
                replayed: list[int] = []
                while len(replayed) < recent:
                    frame = await client.recv(30)
                    if frame["type"] == "message" and frame["room"] == room:
                        replayed.append(frame["seq"])
                assert replayed == wanted, client.shard
                # A resume after the expired part is whole: recovered.
                await client.send(type="leave", room=room)
                joined, seqs = await resume(client, room, old + 10)
                assert joined["recovered"] is True and seqs == wanted[10:], client.shard

    with running_server(WORKERS, settings) as server:
        asyncio.run(run(server.url))
