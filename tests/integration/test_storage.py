"""The room store (storage.kind = "sqlite"): rooms' history, seq and epoch outlive
the server: a SIGTERM and a start, a kill -9 of every process in the middle of
publishing, a torn store file, a full disk; and one server per storage.dir."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.helpers import (
    FAST,
    Client,
    Server,
    cleanup_server,
    clients_on_shards,
    closing,
    publish,
    room_owned_by,
    scaled,
    start_server,
)


@pytest.fixture
def store_dir() -> Iterator[Path]:
    """A storage.dir of the test's own, removed after it."""
    path = Path(tempfile.mkdtemp(prefix="shardchat-store-test-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def stored_server(
    directory: Path, workers: int = 3, settings: tuple[str, ...] = ()
) -> Iterator[Server]:
    server = start_server(workers, [*FAST, f"storage.dir={directory}", *settings])
    try:
        yield server
    finally:
        cleanup_server(server)


def kill_everything(server: Server) -> None:
    """kill -9 of the supervisor and of every shard at once, then wait until all
    are gone (the store's lock is free once the last one is)."""
    pids = list(server.shard_pids().values())
    for pid in [server.proc.pid, *pids]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    server.proc.wait()
    deadline = time.monotonic() + scaled(10)
    while any(_alive(pid) for pid in pids):
        assert time.monotonic() < deadline, "a shard outlived kill -9"
        time.sleep(0.01)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


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
                    publish(c, room, n, f"s{c.shard}")
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
