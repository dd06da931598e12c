"""A lapped shard's rooms: filled from the owner, or their missing ranges announced as
``gap``; joins there answered in bounded time. Real processes, clients on every shard
(``welcome.shard``)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import TypeVar

from shardchat.client.chatclient import ChatClient
from shardchat.testing.wait import await_until
from tests.support.helpers import (
    FAST,
    Client,
    Server,
    clients_on_shards,
    closing,
    room_owned_by,
    running_server,
    scaled,
)

T = TypeVar("T")

RATE = 2000  # messages per second into the room, from all publishers
SECONDS = 3.5  # of publishing
STOPS = ((1, 0.5), (2, 2.0))  # (shard, seconds into the run): SIGSTOP for 1 s each
BODY = "x" * 1000  # about 1 KB per message: a 64 KiB ring wraps 30 times a second
JOIN_ANSWERED = 5.0  # seconds a join on a lapped shard may take


@dataclass
class Seen:
    """What one member received of the room."""

    order: list[int] = field(default_factory=list)  # seqs of messages and gaps, as received
    gaps: list[tuple[int, int]] = field(default_factory=list)
    acks: dict[int, int] = field(default_factory=dict)  # message number -> seq
    refused: list[str] = field(default_factory=list)  # error codes of refused publishes


async def read(client: Client, room: str, seen: Seen) -> None:
    async for raw in client.ws:
        frame = json.loads(raw)
        kind = frame["type"]
        if kind == "message" and frame["room"] == room:
            seen.order.append(frame["seq"])
        elif kind == "gap" and frame["room"] == room:
            seen.gaps.append((frame["first"], frame["last"]))
            seen.order += range(frame["first"], frame["last"] + 1)
        elif kind == "ack":
            seen.acks[int(frame["id"])] = frame["seq"]
        elif kind == "error":
            seen.refused.append(frame["code"])


async def publish_at_rate(clients: list[Client], room: str, start: float) -> int:
    """``RATE`` messages a second for ``SECONDS``, spread over ``clients``; the count."""
    sent = 0
    while (elapsed := time.monotonic() - start) < SECONDS:
        while sent < elapsed * RATE:
            client = clients[sent % len(clients)]
            await client.send(type="message", room=room, content=f"{sent}:{BODY}", id=str(sent))
            sent += 1
        await asyncio.sleep(0.005)
    return sent


async def stop_in_turn(srv: Server, start: float, joiners: list[Client], room: str) -> list[float]:
    """SIGSTOP each listed shard for 1 s; right after each, a join on that shard
    (its rooms are being filled then). How long each join took."""
    pids = srv.shard_pids()
    took: list[float] = []
    for (shard, at), joiner in zip(STOPS, joiners, strict=True):
        await asyncio.sleep(max(0.0, start + at - time.monotonic()))
        os.kill(pids[shard], signal.SIGSTOP)
        try:
            await asyncio.sleep(1.0)
        finally:
            os.kill(pids[shard], signal.SIGCONT)
        asked = time.monotonic()
        await joiner.send(type="join", room=room, since=0)
        await joiner.recv_type("joined", JOIN_ANSWERED)
        took.append(time.monotonic() - asked)
        await joiner.send(type="leave", room=room)
    return took


async def test_a_lapped_shards_members_miss_nothing_unannounced() -> None:
    """64 KiB rings, about 2,000 msg/s of 1 KB into a room owned by shard 0 from
    members on every shard, and each other shard stopped for 1 s in turn: every
    member gets every seq, in order, or a ``gap`` frame for it that ``history`` on
    the owner can fill; a join on a shard just lapped is answered within 5 s."""
    settings = [*FAST, "ring.bytes=65536", "limits.max_frame=8192", "delivery.history=20000"]
    with running_server(workers=3, settings=settings) as srv:
        room = room_owned_by(0)
        members = await clients_on_shards(srv.url, [0, 1, 2], prefix="mem")
        joiners = await clients_on_shards(srv.url, [s for s, _ in STOPS], prefix="late")
        assert [c.shard for c in members] == [0, 1, 2]
        async with closing([*members, *joiners]):
            for client in members:
                await client.join(room)
            seen = [Seen() for _ in members]
            readers = [
                asyncio.create_task(read(c, room, s)) for c, s in zip(members, seen, strict=True)
            ]
            start = time.monotonic()
            stopping = asyncio.create_task(stop_in_turn(srv, start, joiners, room))
            sent = await publish_at_rate(members, room, start)
            took = await stopping
            # Every publish answered: acked with its seq, or refused at once.
            await await_until(
                lambda: sum(len(s.acks) + len(s.refused) for s in seen) >= sent,
                20,
                "every publish answered",
            )
            # Refused at the door past the forwards bound, never left to time out.
            assert all(code == "overloaded" for s in seen for code in s.refused)
            acked = sorted(seq for s in seen for seq in s.acks.values())
            last = acked[-1]
            assert acked == list(range(1, last + 1))
            await await_until(
                lambda: all(len(s.order) >= last for s in seen),
                20,
                lambda: f"missing per member: {[last - len(s.order) for s in seen]}",
            )
            for task in readers:
                task.cancel()
            for member, s in zip(members, seen, strict=True):
                # Every seq once, in order: its message, or a gap in its place.
                assert s.order == acked, (member.shard, s.gaps)
            # Each range announced is still held on the server: history on the shard
            # that announced it fills it.
            for member, s in zip(members, seen, strict=True):
                for first, gap_last in s.gaps:
                    assert await history(member, room, first, gap_last) == list(
                        range(first, gap_last + 1)
                    )
        assert all(t < scaled(JOIN_ANSWERED) for t in took), took
        # The run did lap the stopped shards' readers of the owner's ring.
        lapped = {e["shard"] for e in srv.log_events() if e.get("event") == "ring_lapped"}
        assert {1, 2} <= lapped


async def history(client: Client, room: str, first: int, last: int) -> list[int]:
    """The seqs ``history`` answers for ``first..last`` of ``room`` on ``client``'s shard."""
    await client.send(type="history", room=room, since=first - 1, limit=last - first + 1)
    got: list[int] = []
    while (frame := await client.recv())["type"] != "history_end":
        if frame["type"] == "message" and frame["room"] == room:
            got.append(frame["seq"])
    return got


LAPPING = 100  # messages of about 1.1 KB: a 64 KiB ring laps
GIVE_UP_SOON = [*FAST, "ring.bytes=65536", "limits.max_frame=8192", "delivery.gap_give_up=0.5"]


async def lap_and_give_up(
    srv: Server, alice: Client, room: str, count: int, gap_seen: Awaitable[T]
) -> T:
    """Shard 1 is stopped while ``alice`` (on the owner, shard 0) publishes ``count``
    messages into ``room`` (its reader of the owner's ring is lapped); then the
    owner is stopped while shard 1 reads on, so that its fill gets no answer and
    the range is given up (``delivery.gap_give_up``). The owner goes on once
    ``gap_seen`` (a member of shard 1 got the ``gap``); its value."""
    pids = srv.shard_pids()
    os.kill(pids[1], signal.SIGSTOP)
    try:
        for i in range(count):
            await alice.send(type="message", room=room, content=f"{i}:{BODY}")
        acks = [await alice.recv_type("ack") for _ in range(count)]
        assert sorted(a["seq"] for a in acks) == list(range(1, count + 1))
        os.kill(pids[0], signal.SIGSTOP)  # the fill gets no answer
        try:
            os.kill(pids[1], signal.SIGCONT)
            return await gap_seen
        finally:
            os.kill(pids[0], signal.SIGCONT)
    finally:
        os.kill(pids[1], signal.SIGCONT)


async def test_a_gap_is_fetched_back_by_history_on_the_shard_that_announced_it() -> None:
    """Bob's shard (1) is stopped while alice publishes more than a ring's worth
    into a room owned by shard 0; the owner is stopped in turn when shard 1 reads
    on, so its fill gets no answer and the range is given up
    (``delivery.gap_give_up``) as a ``gap``. The owner still holds it: ``history``
    on shard 1 fetches it from there, for bob alone; bob's stream goes on in
    order, once; a page without ``since`` has the range too."""
    count = LAPPING
    with running_server(workers=2, settings=GIVE_UP_SOON) as srv:
        room = room_owned_by(0)
        alice, bob = await clients_on_shards(srv.url, [0, 1], prefix="gap")
        assert (alice.shard, bob.shard) == (0, 1)
        async with closing([alice, bob]):
            await alice.join(room)
            await bob.join(room)
            gap = await lap_and_give_up(srv, alice, room, LAPPING, bob.recv_type("gap"))
            assert [f for f in bob.dropped if f["type"] == "message"] == []
            first, last = gap["first"], gap["last"]
            assert first == 1
            # After the gap, the rest in order (none, when the lap took them all).
            order = list(range(first, last + 1))
            await alice.send(type="message", room=room, content="after")
            while order[-1] <= count:
                frame = await bob.recv()
                if frame["type"] == "message" and frame["room"] == room:
                    order.append(frame["seq"])
            assert order == list(range(1, count + 2))
            assert await history(bob, room, first, last) == list(range(first, last + 1))
            # The log of shard 1 was not disturbed: nothing came again live.
            await alice.send(type="message", room=room, content="later")
            frame = await bob.recv_type("message")
            assert frame["seq"] == count + 2
            # Without `since`: the latest delivery.history, fetched and held alike.
            await bob.send(type="history", room=room)
            seqs = []
            while (frame := await bob.recv())["type"] != "history_end":
                seqs.append(frame["seq"])
            assert seqs == list(range(1, count + 3))


async def test_chat_client_gets_a_gaps_range_back_once_in_order() -> None:
    """The same gap, announced to a ChatClient on shard 1: it fetches the range
    with ``history`` and the application gets every message once, in order; none
    is counted as lost."""
    with running_server(workers=2, settings=GIVE_UP_SOON) as srv:
        room = room_owned_by(0)
        (alice,) = await clients_on_shards(srv.url, [0], prefix="gap")
        chat: ChatClient | None = None
        for attempt in range(100):
            candidate = ChatClient(srv.url, user=f"chat{attempt}", rooms=[room], timeout=10)
            await candidate.start()
            if candidate.shard == 1:
                chat = candidate
                break
            await candidate.close()
        assert chat is not None and chat.shard == 1
        async with closing([alice]):
            try:
                await alice.join(room)
                shown = chat

                async def gap_seen() -> bool:
                    return await await_until(lambda: shown.gaps >= 1, 10, "the gap")

                await lap_and_give_up(srv, alice, room, LAPPING, gap_seen())
                await alice.send(type="message", room=room, content="after")
                got: list[int] = []

                async def take() -> None:
                    async for message in shown.messages():
                        got.append(message.seq)
                        if len(got) == LAPPING + 1:
                            return

                await asyncio.wait_for(take(), scaled(10))
                assert got == list(range(1, LAPPING + 2))
                assert (chat.gaps, chat.lost) == (1, 0)
            finally:
                await chat.close()
