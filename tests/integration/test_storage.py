"""The room store (storage.kind = "sqlite"): rooms' history, seq and epoch outlive
the server: a SIGTERM and a start, a kill -9 of every process in the middle of
publishing, a torn store file, a full disk; and one server per storage.dir."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from websockets.exceptions import ConnectionClosed, WebSocketException

from shardchat.testing.wait import await_until, scaled
from tests.support.helpers import (
    FAST,
    SHARDCHAT,
    Client,
    Server,
    cleanup_server,
    clients_on_shards,
    closing,
    connect_client,
    free_port,
    kill_server,
    publish,
    room_owned_by,
    start_server,
)


@contextlib.contextmanager
def stored_server(
    directory: Path, workers: int = 3, settings: tuple[str, ...] = ()
) -> Iterator[Server]:
    server = start_server(workers, [*FAST, f"storage.dir={directory}", *settings])
    try:
        yield server
    finally:
        cleanup_server(server)


def storage_command(directory: Path, *args: str) -> str:
    """``shardchat storage`` on ``directory``: its output (exit 0 asserted)."""
    result = subprocess.run(
        [SHARDCHAT, "storage", "--set", f"storage.dir={directory}", *args],
        capture_output=True, text=True, timeout=scaled(30),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout


async def replay(
    client: Client, room: str, since: int, epoch: str
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Rejoin ``room`` with ``since`` and ``epoch``: the ``joined`` and every message
    replayed (up to the room's seq)."""
    joined = await client.join(room, since=since, epoch=epoch)
    messages: list[dict[str, Any]] = []
    while len(messages) < joined["seq"] - since:
        frame = await client.recv(10)
        if frame["type"] == "message" and frame["room"] == room:
            messages.append(frame)
    return joined, messages


async def in_chunks(client: Client, room: str, count: int, tag: str) -> list[dict[str, Any]]:
    """``count`` messages ``{tag}:{i}``, 100 at a time (overload.forwards bounds the
    publishes in flight to a room's owner)."""
    acks: list[dict[str, Any]] = []
    for first in range(0, count, 100):
        n = min(100, count - first)
        for i in range(first, first + n):
            await client.send(type="message", room=room, content=f"{tag}:{i}", id=f"{tag}-{i}")
        while len(acks) < first + n:
            frame = await client.recv(30)
            assert frame["type"] != "error", frame
            if frame["type"] == "ack":
                acks.append(frame)
    return acks


def test_a_restart_keeps_every_rooms_epoch_seq_and_history(store_dir: Path) -> None:
    """1,000 messages over 3 shards (a publisher on each, each to a room another shard
    owns), SIGTERM, start: every room has its epoch and seq, and a rejoin with
    `since` is recovered with every message, from any shard."""

    async def before() -> dict[str, dict[str, Any]]:
        rooms = [room_owned_by((shard + 1) % 3, prefix="keep") for shard in range(3)]
        async with closing(await clients_on_shards(server.url, [0, 1, 2])) as clients:
            joins = [await c.join(room) for c, room in zip(clients, rooms, strict=True)]
            counts = [334, 333, 333]
            acks = await asyncio.gather(
                *(
                    in_chunks(c, room, n, f"s{c.shard}")
                    for c, room, n in zip(clients, rooms, counts, strict=True)
                )
            )
        state = {}
        for room, join, got, n in zip(rooms, joins, acks, counts, strict=True):
            assert sorted(a["seq"] for a in got) == list(range(1, n + 1))
            state[room] = {"epoch": join["epoch"], "seq": n}
        return state

    with stored_server(store_dir) as server:
        state = asyncio.run(before())
        assert server.stop() == 0
    assert sum(s["seq"] for s in state.values()) == 1000
    # What operators see, and a compaction while the server is stopped.
    shown = storage_command(store_dir, "--compact")
    assert "compacted:" in shown and "total:" in shown
    assert "3 rooms, 1,000 messages" in shown.splitlines()[-1]

    async def after() -> None:
        async with closing(await clients_on_shards(server.url, [2, 0, 1])) as clients:
            for client, (room, s) in zip(clients, state.items(), strict=True):
                joined, messages = await replay(client, room, 0, s["epoch"])
                assert joined["epoch"] == s["epoch"] and joined["seq"] == s["seq"]
                assert joined["recovered"] is True
                assert [m["seq"] for m in messages] == list(range(1, s["seq"] + 1))
                assert all(m["content"].endswith(f":{m['seq'] - 1}") for m in messages)
                # The sequence goes on where it was.
                await client.send(type="message", room=room, content="next", id="n")
                ack = await client.recv_type("ack")
                assert ack["seq"] == s["seq"] + 1

    with stored_server(store_dir) as server:
        asyncio.run(after())


class Publisher:
    """A client that publishes numbered messages to a room as fast as the server
    takes them (a window of 50 unacked) and keeps every ack, and every message of
    the room it receives (it is a member), until closed."""

    def __init__(self, client: Client, room: str) -> None:
        self.client = client
        self.room = room
        self.acked: dict[int, str] = {}  # seq -> content
        self.seen: dict[int, str] = {}  # seq -> content, as delivered

    async def run(self) -> None:
        client, sent, window = self.client, 0, 50
        pending: dict[str, str] = {}
        with contextlib.suppress(Exception):
            while True:
                while len(pending) < window:
                    content = f"{client.user}:{sent}"
                    pending[f"p{sent}"] = content
                    await client.send(
                        type="message", room=self.room, content=content, id=f"p{sent}"
                    )
                    sent += 1
                frame = await client.recv(30)
                if frame["type"] == "ack":
                    self.acked[frame["seq"]] = pending.pop(frame["id"])
                elif frame["type"] == "message" and frame["room"] == self.room:
                    self.seen[frame["seq"]] = frame["content"]


def test_kill_9_of_every_process_mid_publish_loses_nothing_acked(store_dir: Path) -> None:
    """Publishers on 3 shards, to rooms owned by other shards; kill -9 of the
    supervisor and every shard at once while they publish. The next start holds
    every acked message at its seq, under the same epoch, and every message a
    member saw (the killed run's rings still hold what its stores had not
    written yet: the start stores it before it sweeps them)."""

    async def before() -> tuple[str, list[Publisher]]:
        rooms = [room_owned_by((shard + 1) % 3, prefix="kill") for shard in range(3)]
        clients = await clients_on_shards(server.url, [0, 1, 2])
        joins = [await c.join(room) for c, room in zip(clients, rooms, strict=True)]
        publishers = [Publisher(c, room) for c, room in zip(clients, rooms, strict=True)]
        tasks = [asyncio.create_task(p.run()) for p in publishers]
        await await_until(
            lambda: sum(len(p.acked) for p in publishers) >= 600, 30, "600 publishes acked"
        )
        kill_server(server)  # in the middle: each publisher has 50 in flight
        await asyncio.gather(*tasks)
        for client in clients:
            await client.ws.close()
        return joins[0]["epoch"], publishers

    async def after() -> None:
        async with closing(await clients_on_shards(server.url, [0, 1, 2])) as clients:
            for client, publisher in zip(clients, publishers, strict=True):
                joined, messages = await replay(client, publisher.room, 0, epoch)
                assert joined["epoch"] == epoch and joined["recovered"] is True
                assert joined["seq"] >= max(publisher.acked)
                kept = {m["seq"]: m["content"] for m in messages}
                assert list(kept) == list(range(1, joined["seq"] + 1))
                missing = {s: c for s, c in publisher.acked.items() if kept.get(s) != c}
                assert not missing, f"acked and lost: {missing}"
                unseen = {s: c for s, c in publisher.seen.items() if kept.get(s) != c}
                assert not unseen, f"delivered and lost: {unseen}"

    with stored_server(store_dir) as server:
        epoch, publishers = asyncio.run(before())
        # Started before this server's shared memory is cleaned up after it.
        with stored_server(store_dir) as server:
            asyncio.run(after())


def test_a_torn_store_file_is_cut_and_the_rest_served(store_dir: Path) -> None:
    """kill -9 leaves the write-ahead log; cut in the middle of a record, the next
    start cuts the torn tail (logged, with how much), serves every message before
    it, under a new epoch (clients may have seen what was cut), and goes on."""
    # Acks that wait for their commit: one transaction per batch at least, and
    # no checkpoint (that is "batch"'s): the messages stay in the log.
    settings = ("storage.fsync=always",)

    async def before() -> str:
        async with closing([await connect_client(server.url, user="a")]) as (client,):
            joined = await client.join("torn")
            for batch in range(10):  # acked batch by batch: ten transactions at least
                await publish(client, "torn", 10, f"t{batch}")
        return str(joined["epoch"])

    with stored_server(store_dir, 1, settings) as server:
        epoch = asyncio.run(before())
        kill_server(server)
    wal = next(store_dir.glob("rooms-*.db-wal"))
    size = wal.stat().st_size
    assert size > 4096
    with open(wal, "r+b") as f:
        f.truncate(size - 1000)  # mid-frame: the last transaction is torn

    async def after() -> None:
        async with closing([await connect_client(server.url, user="b")]) as (client,):
            joined, messages = await replay(client, "torn", 0, epoch)
            assert joined["epoch"] != epoch and joined["recovered"] is False
            kept = joined["seq"]
            assert 0 < kept < 100
            assert [m["seq"] for m in messages] == list(range(1, kept + 1))
            sent = [f"t{batch}:{i}" for batch in range(10) for i in range(10)]
            assert [m["content"] for m in messages] == sent[:kept]
            await client.send(type="message", room="torn", content="after", id="after")
            assert (await client.recv_type("ack"))["seq"] == kept + 1

    with stored_server(store_dir, 1, settings) as server:
        cut = [e for e in server.log_events() if e.get("event") == "storage_tail_cut"]
        assert len(cut) == 1 and cut[0]["bytes"] > 0
        asyncio.run(after())


def test_a_second_server_on_the_same_storage_dir_refuses(store_dir: Path) -> None:
    with stored_server(store_dir, 1) as server:
        result = subprocess.run(
            [
                SHARDCHAT, "start", "--workers", "1", "--port", str(free_port()),
                "--set", f"server.admin_port={free_port()}",
                "--set", f"storage.dir={store_dir}",
            ],
            capture_output=True, text=True, timeout=scaled(20),
        )  # fmt: skip
        assert result.returncode == 1
        assert f"storage.dir {store_dir} is in use by another shardchat server" in result.stderr
        assert f"(pid {server.proc.pid})" in result.stderr
        assert "Traceback" not in result.stderr
        # The first one still serves.
        assert server.proc.poll() is None


@contextlib.contextmanager
def small_disk(size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted for the test (the tests run as root), unmounted
    after it."""
    point = Path(tempfile.mkdtemp(prefix="shardchat-disk-"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)], check=True)
    try:
        yield point
    finally:
        subprocess.run(["umount", "-l", str(point)], check=False)
        point.rmdir()


def test_a_full_disk_answers_unavailable_then_recovers(store_dir: Path) -> None:
    """On a disk with no room left, publishes get `unavailable` (nothing acked is
    lost); once room is made, the same publishes retried with their key are acked
    once, and everything is there after a restart."""
    with small_disk("2m") as disk:
        directory = disk / "store"

        async def fill() -> tuple[str, dict[int, str], list[int]]:
            async with closing([await connect_client(server.url, user="f")]) as (client,):
                joined = await client.join("full")
                filler = disk / "filler"
                fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
                with contextlib.suppress(OSError):
                    while True:  # every block of the disk
                        os.write(fd, b"\0" * 4096)
                os.close(fd)
                acked: dict[int, str] = {}
                refused: list[int] = []
                for i in range(3000):
                    body = "x" * 500
                    await client.send(
                        type="message", room="full", content=f"{i}{body}", id=f"f{i}", key=f"f{i}"
                    )
                    frame = await client.recv(10)
                    while frame["type"] not in ("ack", "error"):
                        frame = await client.recv(10)
                    if frame["type"] == "ack":
                        acked[frame["seq"]] = f"{i}{body}"
                    else:
                        assert frame["code"] == "unavailable", frame
                        refused.append(i)
                        if len(refused) >= 5:
                            break
                assert len(refused) == 5, "the disk never filled"
                filler.unlink()
                # Room again: the refused ones, retried with their key, are taken.
                for i in refused:

                    async def taken(i: int = i) -> bool:
                        await client.send(
                            type="message", room="full", content=f"{i}{'x' * 500}",
                            id=f"r{i}", key=f"f{i}",
                        )  # fmt: skip
                        frame = await client.recv(10)
                        while frame["type"] not in ("ack", "error"):
                            frame = await client.recv(10)
                        if frame["type"] == "ack":
                            acked[frame["seq"]] = f"{i}{'x' * 500}"
                        return frame["type"] == "ack"

                    await await_until(taken, 10, "the store resumed", poll=0.1)
                return str(joined["epoch"]), acked, refused

        with stored_server(directory, 1) as server:
            epoch, acked, refused = asyncio.run(fill())
            assert any(e.get("event") == "storage_full" for e in server.log_events())
            assert server.stop() == 0

        async def after() -> None:
            async with closing([await connect_client(server.url, user="g")]) as (client,):
                joined, messages = await replay(client, "full", 0, epoch)
                assert joined["epoch"] == epoch and joined["recovered"] is True
                kept = {m["seq"]: m["content"] for m in messages}
                assert all(kept.get(seq) == content for seq, content in acked.items())
                contents = [m["content"] for m in messages]
                assert len(contents) == len(set(contents))  # each once

        with stored_server(directory, 1) as server:
            asyncio.run(after())


def test_an_unreadable_store_file_is_set_aside_and_the_server_starts(store_dir: Path) -> None:
    """A store file that is not a database: the start sets it aside (logged), the
    rooms start again under a new epoch, the server serves; `shardchat cleanup`
    removes what was set aside."""

    async def publish_some() -> str:
        async with closing([await connect_client(server.url, user="a")]) as (client,):
            joined = await client.join("gone")
            await publish(client, "gone", 5, "g")
        return str(joined["epoch"])

    with stored_server(store_dir, 1) as server:
        epoch = asyncio.run(publish_some())
    (path,) = store_dir.glob("rooms-*.db")
    path.write_bytes(b"not a database at all" * 500)

    async def after() -> None:
        async with closing([await connect_client(server.url, user="b")]) as (client,):
            joined = await client.join("gone", since=5, epoch=epoch)
            assert joined["epoch"] != epoch and joined["seq"] == 0
            assert joined["recovered"] is False
            await client.send(type="message", room="gone", content="again", id="x")
            assert (await client.recv_type("ack"))["seq"] == 1

    with stored_server(store_dir, 1) as server:
        events = [e for e in server.log_events() if e.get("event") == "storage_file_unreadable"]
        assert len(events) == 1 and events[0]["file"] == path.name
        asyncio.run(after())
    # The file, and its -wal and -shm when the last run left them.
    aside = sorted(p.name for p in store_dir.glob("rooms-*.corrupt-*"))
    main = [n for n in aside if not n.endswith(("-wal", "-shm"))]
    assert len(main) == 1 and main[0].startswith(f"{path.name}.corrupt-"), aside
    result = subprocess.run(
        [SHARDCHAT, "cleanup", "--set", f"storage.dir={store_dir}"],
        capture_output=True, text=True, timeout=scaled(30),
    )  # fmt: skip
    assert result.returncode == 0 and "corrupt" in result.stdout
    assert not list(store_dir.glob("rooms-*.corrupt-*"))


def test_kill_9_of_the_owner_mid_publish_then_a_restart_loses_nothing_acked(
    store_dir: Path,
) -> None:
    """The room's owner killed with kill -9 while a client on another shard
    publishes to it: it restarts, stores again what its ring holds and its
    store lacks; after a full restart every acked message is at its seq."""
    room = room_owned_by(1, prefix="owner")

    async def before() -> tuple[str, Publisher]:
        (client,) = await clients_on_shards(server.url, [0])
        epoch = str((await client.join(room))["epoch"])
        publisher = Publisher(client, room)
        task = asyncio.create_task(publisher.run())
        await await_until(lambda: len(publisher.acked) >= 200, 30, "200 publishes acked")
        os.kill(server.shard_pids()[1], signal.SIGKILL)
        await asyncio.to_thread(server.wait_started, 4)  # the owner is back
        count = len(publisher.acked)
        await await_until(lambda: len(publisher.acked) >= count + 200, 30, "acks after the restart")
        await client.ws.close()
        await task
        return epoch, publisher

    with stored_server(store_dir) as server:
        epoch, publisher = asyncio.run(before())
        assert server.stop() == 0

    async def after() -> None:
        async with closing([await connect_client(server.url, user="z")]) as (client,):
            joined, messages = await replay(client, room, 0, epoch)
            assert joined["epoch"] == epoch and joined["recovered"] is True
            kept = {m["seq"]: m["content"] for m in messages}
            assert list(kept) == list(range(1, joined["seq"] + 1))
            missing = {s: c for s, c in publisher.acked.items() if kept.get(s) != c}
            assert not missing, f"acked and lost: {missing}"

    with stored_server(store_dir) as server:
        asyncio.run(after())


def test_a_forwarded_publish_retried_with_its_key_is_acked_once(store_dir: Path) -> None:
    """On another shard than the room's owner, a publish sent again with its key is
    acked with the original seq once the owner's store holds it (the owner's
    answer waits for its store; nothing else is written that turn)."""

    async def retry() -> None:
        room = room_owned_by(0, prefix="retry")
        (sender,) = await clients_on_shards(server.url, [1])
        async with closing([sender]):
            await sender.join(room)
            acks = []
            for request in ("a", "b"):
                await sender.send(type="message", room=room, content="once", id=request, key="k")
                acks.append(await sender.recv_type("ack"))
            assert acks[0]["seq"] == acks[1]["seq"] == 1
            joined = await sender.join(room)
            assert joined["seq"] == 1

    with stored_server(store_dir) as server:
        asyncio.run(retry())


class Resumer:
    """A member that rejoins with `since` and `epoch` on every connection it gets,
    as early as it can while the server restarts; every `joined` it was answered."""

    def __init__(self, port: int, room: str, since: int, epoch: str) -> None:
        self.url = f"ws://127.0.0.1:{port}/ws"
        self.room, self.since, self.epoch = room, since, epoch
        self.answers: list[dict[str, Any]] = []

    async def connect(self) -> Client:
        client = await connect_client(self.url, user="resumer")
        await client.send(type="join", room=self.room, since=self.since, epoch=self.epoch)
        self.answers.append(await client.recv_type("joined", 10))
        return client

    async def follow(self, client: Client, restarted: asyncio.Event) -> Client:
        """Reconnect whenever the connection ends (1001 from a draining shard), in a
        tight loop while nobody listens, until the restarted server has us."""
        deadline = asyncio.get_running_loop().time() + scaled(60)
        while asyncio.get_running_loop().time() < deadline:
            try:
                while not restarted.is_set():
                    with contextlib.suppress(TimeoutError):
                        await client.recv(0.05)
                return client
            except ConnectionClosed:
                pass
            while asyncio.get_running_loop().time() < deadline:
                try:
                    client = await self.connect()
                    break
                except (OSError, TimeoutError, WebSocketException):
                    # Refused (nobody listens yet), or cut in the upgrade by a draining shard.
                    await asyncio.sleep(0.002)
        raise AssertionError(f"no connection to the restarted server; joined: {self.answers}")


def test_a_resume_during_a_restart_is_recovered_and_history_stays_whole(
    store_dir: Path,
) -> None:
    """Clients on every shard rejoin with `since` as early as they can while the
    server restarts (SIGTERM, a start on the same port): every `joined` they get,
    from a draining shard or a starting one, is recovered with the room's seq and
    epoch; then `history` on each shard still has every message, older than
    `since` too, and the sequence goes on."""
    room = room_owned_by(2, prefix="early")
    count = 20

    async def before() -> str:
        async with closing(await clients_on_shards(server.url, [0, 1, 2])) as clients:
            epoch = str([await c.join(room) for c in clients][0]["epoch"])
            await publish(clients[1], room, count, "m")
            return epoch

    async def restart(epoch: str) -> None:
        nonlocal server
        old, port = server, server.port
        resumers = [Resumer(port, room, count, epoch) for _ in range(6)]
        # Members (on shards the kernel picks), resumed before the restart.
        connected = [await r.connect() for r in resumers]
        restarted = asyncio.Event()
        following = [
            asyncio.create_task(r.follow(c, restarted))
            for r, c in zip(resumers, connected, strict=True)
        ]

        def stop_and_start() -> Server:
            cleanup_server(old)
            return start_server(3, settings, port=port)

        server = await asyncio.to_thread(stop_and_start)
        restarted.set()
        resumed = await asyncio.gather(*following)
        # And a resume on each shard of the restarted server, once it has started.
        clients = [*resumed, *await clients_on_shards(server.url, [0, 1, 2], prefix="late")]
        async with closing(clients):
            for client in clients[len(resumed) :]:
                joined = await client.join(room, since=count, epoch=epoch)
                assert joined["recovered"] is True, (client.shard, joined)
            answers = [joined for r in resumers for joined in r.answers]
            assert len(answers) > len(resumers)  # each resumed after the restart too
            for joined in answers:
                assert joined["recovered"] is True, answers
                assert joined["seq"] == count and joined["epoch"] == epoch, answers
            for client in clients:
                await client.send(type="history", room=room)
                history = await collect_history(client, room)
                assert history == list(range(1, count + 1)), (client.shard, history)
            await clients[0].send(type="message", room=room, content="next", id="n")
            assert (await clients[0].recv_type("ack"))["seq"] == count + 1

    settings = [*FAST, f"storage.dir={store_dir}"]
    server = start_server(3, settings)
    try:
        epoch = asyncio.run(before())
        asyncio.run(restart(epoch))
    finally:
        cleanup_server(server)


async def collect_history(client: Client, room: str) -> list[int]:
    """The seqs of a `history` answer, up to its `history_end`."""
    seqs = []
    while True:
        frame = await client.recv(10)
        if frame["type"] == "history_end":
            return seqs
        if frame["type"] == "message" and frame["room"] == room:
            seqs.append(frame["seq"])


def stored_rows(directory: Path, room: str) -> dict[int, str]:
    """What the store files in ``directory`` hold of ``room``: seq -> content."""
    out: dict[int, str] = {}
    for path in directory.glob("rooms-*.db"):
        db = sqlite3.connect(path)
        try:
            for seq, body in db.execute("SELECT seq, json FROM messages WHERE room = ?", (room,)):
                out[seq] = json.loads(body)["content"]
        finally:
            db.close()
    return out


async def publish_acked(
    client: Client, room: str, count: int, tag: str, body: str = ""
) -> dict[int, str]:
    """``count`` publishes to ``room``, all sent, then every ack: seq -> content."""
    for i in range(count):
        await client.send(type="message", room=room, content=f"{tag}:{i}{body}", id=f"{tag}-{i}")
    acked: dict[int, str] = {}
    while len(acked) < count:
        frame = await client.recv(30)
        assert frame["type"] != "error", frame
        if frame["type"] == "ack":
            acked[frame["seq"]] = f"{tag}:{frame['id'].rsplit('-', 1)[1]}{body}"
    return acked


def test_an_owner_killed_right_after_its_acks_stores_them_from_its_ring(store_dir: Path) -> None:
    """fsync "batch" acks once a message is in its owner's ring: with the writer held
    back (storage.write_every = 30 s) the store holds none of the acked messages
    when the owner is killed with kill -9; restarted, the owner stores them from
    its ring, serves them, and a SIGTERM leaves every one at its seq."""
    room = room_owned_by(1, workers=2, prefix="held")
    settings = ("storage.write_every=30",)

    async def before() -> tuple[str, dict[int, str]]:
        local, remote = await clients_on_shards(server.url, [1, 0])
        epoch = str((await local.join(room))["epoch"])
        await remote.join(room)
        acked = await publish_acked(local, room, 50, "local")  # acked by the owner
        acked |= await publish_acked(remote, room, 50, "remote")  # forwarded, acked on shard 0
        assert stored_rows(store_dir, room) == {}, "the acks waited for the store"
        os.kill(server.shard_pids()[1], signal.SIGKILL)
        await asyncio.to_thread(server.wait_started, 3)  # the owner is back
        for client in (local, remote):
            await client.ws.close()
        async with closing([await connect_client(server.url, user="z")]) as (client,):
            joined, messages = await replay(client, room, 0, epoch)
            assert joined["epoch"] == epoch and joined["recovered"] is True
            assert {m["seq"]: m["content"] for m in messages} == acked
        return epoch, acked

    with stored_server(store_dir, 2, settings) as server:
        epoch, acked = asyncio.run(before())
        assert server.stop() == 0
    assert stored_rows(store_dir, room) == acked


def test_a_full_disk_at_shutdown_leaves_the_rings_for_the_next_start(store_dir: Path) -> None:
    """Acked (in the owner's ring) while the disk is already full and the writer
    has not tried yet: at SIGTERM the store cannot write them, the shard says so
    and the supervisor keeps the rings; with room again, the next start stores
    them from the rings, and every acked message is there."""
    with small_disk("2m") as disk:
        directory = disk / "store"

        async def fill() -> tuple[str, dict[int, str]]:
            async with closing([await connect_client(server.url, user="f")]) as (client,):
                epoch = str((await client.join("late"))["epoch"])
                fd = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
                with contextlib.suppress(OSError):
                    while True:  # every block of the disk
                        os.write(fd, b"\0" * 4096)
                os.close(fd)
                return epoch, await publish_acked(client, "late", 200, "late", "x" * 400)

        with stored_server(directory, 1, ("storage.write_every=30",)) as server:
            epoch, acked = asyncio.run(fill())
            assert server.stop() == 0
            events = [e.get("event") for e in server.log_events()]
            assert "storage_unstored_at_exit" in events and "storage_rings_kept" in events
            (disk / "filler").unlink()

            async def after() -> None:
                async with closing([await connect_client(server.url, user="g")]) as (client,):
                    # The failed writes left a torn log tail, which the start cuts
                    # and, as it cannot tell it from a power loss's, takes a new
                    # epoch for: the messages are all there all the same.
                    joined, messages = await replay(client, "late", 0, epoch)
                    assert joined["seq"] == max(acked)
                    assert {m["seq"]: m["content"] for m in messages} == acked

            # Started before the first server's shared memory is cleaned up after it.
            with stored_server(directory, 1) as server:
                rescued = [e for e in server.log_events() if e.get("event") == "storage_rescued"]
                assert rescued and rescued[0]["messages"] == len(acked)
                asyncio.run(after())
