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

from shardchat.storage.boxdir import store_path
from shardchat.storage.transactions import group_rows, span_messages
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
            spans = db.execute("SELECT rows FROM spans WHERE room = ?", (room,))
            for (blob,) in spans:
                for seq, body in span_messages(blob):
                    out[seq] = json.loads(body)["content"]
            for (blob,) in db.execute("SELECT rows FROM groups"):  # not folded yet
                for r, seq, _, _, body in group_rows(blob):
                    if r == room:
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


async def publish_seen(
    client: Client, room: str, count: int, tag: str, body: str = ""
) -> tuple[dict[int, str], dict[int, str]]:
    """``count`` publishes to ``room`` by a member, all sent, then each seen as a
    ``message`` or refused: (seen, acked), seq -> content."""
    for i in range(count):
        await client.send(type="message", room=room, content=f"{tag}:{i}{body}", id=f"{tag}-{i}")
    seen: dict[int, str] = {}
    acked: dict[int, str] = {}
    refused = 0
    while len(seen) + refused < count:
        frame = await client.recv(30)
        if frame["type"] == "error":
            refused += 1
        elif frame["type"] == "ack":
            acked[frame["seq"]] = f"{tag}:{frame['id'].rsplit('-', 1)[1]}{body}"
        elif frame["type"] == "message" and frame["content"].startswith(f"{tag}:"):
            seen[frame["seq"]] = frame["content"]
    return seen, acked


def test_an_owner_killed_before_its_writer_stores_what_members_saw_from_its_ring(
    store_dir: Path,
) -> None:
    """Members see a message at its turn's commit, before it is stored: with the
    writer held back (storage.write_every = 30 s) the store holds none of them,
    and none is acked, when the owner is killed with kill -9; restarted, the
    owner stores them from its ring, serves them at their seqs, and a SIGTERM
    leaves every one stored."""
    room = room_owned_by(1, workers=2, prefix="held")
    settings = ("storage.write_every=30",)

    async def before() -> tuple[str, dict[int, str]]:
        local, remote = await clients_on_shards(server.url, [1, 0])
        epoch = str((await local.join(room))["epoch"])
        await remote.join(room)
        seen, acked = await publish_seen(local, room, 50, "local")  # sequenced by the owner
        more, acked_remote = await publish_seen(remote, room, 50, "remote")  # forwarded
        seen |= more
        assert not acked and not acked_remote, "an ack left before the store had it"
        assert stored_rows(store_dir, room) == {}
        os.kill(server.shard_pids()[1], signal.SIGKILL)
        await asyncio.to_thread(server.wait_started, 3)  # the owner is back
        for client in (local, remote):
            await client.ws.close()
        async with closing([await connect_client(server.url, user="z")]) as (client,):
            joined, messages = await replay(client, room, 0, epoch)
            assert joined["epoch"] == epoch and joined["recovered"] is True
            assert {m["seq"]: m["content"] for m in messages} == seen
        return epoch, seen

    with stored_server(store_dir, 2, settings) as server:
        epoch, seen = asyncio.run(before())
        assert server.stop() == 0
    assert stored_rows(store_dir, room) == seen


def test_a_full_disk_at_shutdown_leaves_the_rings_for_the_next_start(store_dir: Path) -> None:
    """Seen by members (in the owner's ring) while the disk is already full and
    the writer has not tried yet: at SIGTERM the store cannot write them, the
    shard says so and the supervisor keeps the rings; with room again, the next
    start stores them from the rings, keeps the epoch (the torn log tail the
    failed writes left is cut, and the rings held all it lost), and every
    message members saw is there."""
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
                seen, acked = await publish_seen(client, "late", 200, "late", "x" * 400)
                assert not acked, "an ack left before the store had it"
                return epoch, seen

        with stored_server(directory, 1, ("storage.write_every=30",)) as server:
            epoch, seen = asyncio.run(fill())
            assert server.stop() == 0
            events = [e.get("event") for e in server.log_events()]
            assert "storage_unstored_at_exit" in events and "storage_rings_kept" in events
            (disk / "filler").unlink()

            async def after() -> None:
                async with closing([await connect_client(server.url, user="g")]) as (client,):
                    joined, messages = await replay(client, "late", 0, epoch)
                    assert joined["epoch"] == epoch and joined["recovered"] is True
                    assert joined["seq"] == max(seen)
                    assert {m["seq"]: m["content"] for m in messages} == seen

            # Started before the first server's shared memory is cleaned up after it.
            with stored_server(directory, 1) as server:
                rescued = [e for e in server.log_events() if e.get("event") == "storage_rescued"]
                assert rescued and rescued[0]["messages"] == len(seen)
                asyncio.run(after())


LAP = ("ring.bytes=65536", "limits.max_frame=8192")  # 21 messages of LAP_BODY lap the ring
LAP_BODY = "x" * 3000


@contextlib.contextmanager
def writer_held(directory: Path, shard: int, workers: int) -> Iterator[None]:
    """The store of ``shard`` locked by another connection: its writer waits."""
    lock = sqlite3.connect(store_path(directory, shard, workers), isolation_level=None)
    lock.execute("BEGIN IMMEDIATE")
    try:
        yield
    finally:
        lock.execute("ROLLBACK")
        lock.close()


def test_no_ack_leaves_before_its_message_is_stored_while_the_ring_laps(
    store_dir: Path,
) -> None:
    """With the owner's writer held up, its publishers' messages are seen but not
    acked, and more of them lap its ring: after kill -9 of the owner every acked
    message is stored, and the restarted owner gives no seq twice."""
    room = room_owned_by(1, workers=2, prefix="lap")

    async def before() -> tuple[dict[int, str], dict[int, str], int]:
        (owner,) = await clients_on_shards(server.url, [1])
        async with closing([owner]):
            await owner.join(room)
            with writer_held(store_dir, 1, 2):
                seen, acked = await publish_seen(owner, room, 36, "lap", LAP_BODY)
                assert not acked, "an ack left before its message was stored"
                os.kill(server.shard_pids()[1], signal.SIGKILL)
            await asyncio.to_thread(server.wait_started, 3)
        (client,) = await clients_on_shards(server.url, [1])
        async with closing([client]):
            await client.join(room)
            await client.send(type="message", room=room, content="after", id="after-1")
            ack = await client.recv_type("ack")
        return seen, acked, int(ack["seq"])

    with stored_server(store_dir, 2, LAP) as server:
        seen, acked, after = asyncio.run(before())
        assert server.stop() == 0
    assert seen and after > max(seen)
    assert acked.items() <= stored_rows(store_dir, room).items()


def test_forwards_through_a_lapped_ring_lose_no_acked_message(store_dir: Path) -> None:
    """The owner's ring carries its forwards to other owners too: 30 of them while
    its writer is held up lap its own room's messages, none of which was acked;
    every forward is acked by its owner and stored there."""
    room = room_owned_by(1, workers=2, prefix="lap")
    other = room_owned_by(0, workers=2, prefix="fwd")

    async def before() -> tuple[dict[int, str], dict[int, str]]:
        (owner,) = await clients_on_shards(server.url, [1])
        async with closing([owner]):
            await owner.join(room)
            await owner.join(other)
            with writer_held(store_dir, 1, 2):
                seen, acked = await publish_seen(owner, room, 6, "early", LAP_BODY)
                forwarded = await publish_acked(owner, other, 30, "fwd", LAP_BODY)
                os.kill(server.shard_pids()[1], signal.SIGKILL)
            await asyncio.to_thread(server.wait_started, 3)
        assert len(seen) == 6 and not acked
        return acked, forwarded

    with stored_server(store_dir, 2, LAP) as server:
        acked, forwarded = asyncio.run(before())
        assert server.stop() == 0
    assert acked.items() <= stored_rows(store_dir, room).items()
    assert stored_rows(store_dir, other) == forwarded


def test_a_seq_is_never_given_twice_under_one_epoch_after_a_crash_of_every_process(
    store_dir: Path,
) -> None:
    """As above, then kill -9 of every process: the rings lapped messages members
    saw and the store lacks, so the rescue cannot store them: the next start
    takes a new epoch rather than give their seqs again under the old one."""
    room = room_owned_by(1, workers=2, prefix="lap")
    other = room_owned_by(0, workers=2, prefix="fwd")

    async def before() -> tuple[str, dict[int, str]]:
        (owner,) = await clients_on_shards(server.url, [1])
        async with closing([owner]):
            epoch = str((await owner.join(room))["epoch"])
            await owner.join(other)
            with writer_held(store_dir, 1, 2):
                seen, _ = await publish_seen(owner, room, 6, "early", LAP_BODY)
                await publish_acked(owner, other, 30, "fwd", LAP_BODY)
                await asyncio.to_thread(kill_server, server)
        return epoch, seen

    async def after() -> tuple[str, int]:
        (client,) = await clients_on_shards(server.url, [1])
        async with closing([client]):
            joined = await client.join(room)
            await client.send(type="message", room=room, content="new", id="new-1")
            ack = await client.recv_type("ack")
        return str(joined["epoch"]), int(ack["seq"])

    with stored_server(store_dir, 2, LAP) as server:
        epoch, seen = asyncio.run(before())
        # Started before the first server's shared memory is cleaned up after it.
        with stored_server(store_dir, 2, LAP) as server:
            new_epoch, seq = asyncio.run(after())
            events = [e for e in server.log_events() if "storage" in str(e.get("event"))]
    assert new_epoch != epoch or seq > max(seen), (epoch, new_epoch, seq, sorted(seen))
    # The rescue finds the hole (tests/storage has it alone); were the rings gone
    # by then, the unclean stop would take a new epoch all the same.
    assert new_epoch != epoch and "storage_new_epoch" in [e["event"] for e in events], events


def test_a_torn_log_tail_the_rings_hold_keeps_the_epoch(store_dir: Path) -> None:
    """kill -9 of every process, then the write-ahead log cut in the middle of a
    frame: the start cuts the torn tail, stores what it held from the dead run's
    rings, and keeps the epoch: nothing a member saw was lost."""
    settings = ("storage.fsync=always",)

    async def before() -> tuple[str, dict[int, str]]:
        async with closing([await connect_client(server.url, user="a")]) as (client,):
            joined = await client.join("torn")
            acked: dict[int, str] = {}
            for batch in range(10):  # ten transactions at least
                acked |= await publish_acked(client, "torn", 10, f"t{batch}")
        return str(joined["epoch"]), acked

    async def after() -> None:
        async with closing([await connect_client(server.url, user="b")]) as (client,):
            joined, messages = await replay(client, "torn", 0, epoch)
            assert joined["epoch"] == epoch and joined["recovered"] is True
            assert {m["seq"]: m["content"] for m in messages} == acked

    with stored_server(store_dir, 1, settings) as server:
        epoch, acked = asyncio.run(before())
        kill_server(server)
        wal = next(store_dir.glob("rooms-*.db-wal"))
        with open(wal, "r+b") as f:
            f.truncate(wal.stat().st_size - 1000)  # mid-frame: the last commit is torn
        # Started before the first server's shared memory is cleaned up after it.
        with stored_server(store_dir, 1, settings) as server:
            events = [e.get("event") for e in server.log_events()]
            assert "storage_tail_cut" in events and "storage_rescued" in events
            assert "storage_new_epoch" not in events
            asyncio.run(after())


def test_an_unclean_stop_without_its_rings_takes_a_new_epoch(store_dir: Path) -> None:
    """A SIGTERM marks the directory clean after the final sync, and the next start
    keeps the epoch. kill -9 of every process with the rings gone as well (as
    after a power loss) and fsync "batch": what was not synced may be lost
    though the log looks whole, so the start takes a new epoch."""

    async def publish_some(tag: str) -> str:
        async with closing([await connect_client(server.url, user="a")]) as (client,):
            joined = await client.join("unclean")
            await publish_acked(client, "unclean", 10, tag)
        return str(joined["epoch"])

    meta = store_dir / "meta.json"
    with stored_server(store_dir, 1) as server:
        epoch = asyncio.run(publish_some("a"))
        assert json.loads(meta.read_text())["clean"] is False
        assert server.stop() == 0
    assert json.loads(meta.read_text())["clean"] is True
    with stored_server(store_dir, 1) as server:
        assert asyncio.run(publish_some("b")) == epoch  # kept after a clean stop
        kill_server(server)
    # The rings are gone now (unlinked after the killed server), as after a reboot.
    with stored_server(store_dir, 1) as server:
        assert asyncio.run(publish_some("c")) != epoch
        events = [e.get("event") for e in server.log_events()]
        assert "storage_new_epoch" in events and "storage_rescued" not in events


def test_a_shard_killed_at_the_drain_deadline_leaves_its_rings_for_the_next_start(
    store_dir: Path,
) -> None:
    """A SIGTERM while the owner's writer is held up: the owner cannot close its
    store before server.graceful_timeout and is killed; the supervisor keeps the
    rings, and the next start stores from them what members saw, under the same
    epoch."""
    room = room_owned_by(1, workers=2, prefix="drain")
    settings = ("server.graceful_timeout=1",)

    async def publish_held() -> tuple[str, dict[int, str]]:
        (client,) = await clients_on_shards(server.url, [1])
        async with closing([client]):
            epoch = str((await client.join(room))["epoch"])
            seen, acked = await publish_seen(client, room, 20, "held")
        assert not acked
        return epoch, seen

    async def after() -> None:
        async with closing([await connect_client(server.url, user="b")]) as (client,):
            joined, messages = await replay(client, room, 0, epoch)
            assert joined["epoch"] == epoch and joined["recovered"] is True
            assert {m["seq"]: m["content"] for m in messages} == seen

    with stored_server(store_dir, 2, settings) as server:
        with writer_held(store_dir, 1, 2):
            epoch, seen = asyncio.run(publish_held())
            server.stop()
        events = [e.get("event") for e in server.log_events()]
        assert "drain_timeout" in events and "storage_rings_kept" in events
        # Started before the first server's shared memory is cleaned up after it.
        with stored_server(store_dir, 2, settings) as server:
            rescued = [e for e in server.log_events() if e.get("event") == "storage_rescued"]
            assert rescued and rescued[0]["messages"] == len(seen)
            asyncio.run(after())
