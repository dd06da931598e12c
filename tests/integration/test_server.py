"""The real server as a process: shards, SO_REUSEPORT, restarts, drain, errors at start."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import time
import urllib.request

import pytest
from websockets.exceptions import ConnectionClosed

from shardchat.brokers import segments as shm
from tests.support.helpers import (
    SHARDCHAT,
    Server,
    clients_on_shards,
    closing,
    connect_client,
    free_port,
    running_server,
    scaled,
)


async def test_connections_spread_over_all_shards(server: Server) -> None:
    """60 clients: the kernel spreads them over all 3 shards; ping/pong works on each."""
    clients = await asyncio.gather(
        *(connect_client(server.url, user=f"spread{i}") for i in range(60))
    )
    async with closing(clients):
        assert {c.shard for c in clients} == {0, 1, 2}
        for client in clients[:6]:
            pong = await client.request("ping", "pong", id="p1", extra=[1, 2])
            assert pong == {"type": "pong", "id": "p1", "extra": [1, 2]}
        welcome = clients[0].welcome
        assert welcome["protocol"] == 1 and welcome["heartbeat"] == 30
        assert welcome["user"] == "spread0"


async def test_same_shard_room_messages(server: Server) -> None:
    """Members on one shard get each message once, in seq order; the sender gets an ack."""
    a, b, c = await clients_on_shards(server.url, [1, 1, 1], prefix="same")
    async with closing([a, b, c]):
        for client in (a, b, c):
            joined = await client.join("same-room")
            assert joined["room"] == "same-room" and joined["seq"] == 0
        for i in range(5):
            await a.send(type="message", room="same-room", content=f"m{i}", id=f"id{i}")
        acks = [await a.recv_type("ack") for _ in range(5)]
        assert [x["seq"] for x in acks] == [1, 2, 3, 4, 5]
        assert [x["id"] for x in acks] == [f"id{i}" for i in range(5)]
        for client in (b, c):
            got = [await client.recv_type("message") for _ in range(5)]
            assert [m["seq"] for m in got] == [1, 2, 3, 4, 5]
            assert [m["content"] for m in got] == [f"m{i}" for i in range(5)]
            assert {m["sender"] for m in got} == {a.user}


async def test_guest_name_and_healthz(server: Server) -> None:
    """No user name: the server assigns guest-XXXX. /healthz answers 200 ok."""
    client = await connect_client(server.url)
    async with closing([client]):
        assert client.user.startswith("guest-") and len(client.user) == len("guest-") + 4
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/healthz", timeout=5) as r:
        assert r.status == 200 and r.read() == b"ok\n"
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/", timeout=5) as r:
        assert r.headers["Content-Type"].startswith("text/html") and b"shardchat" in r.read()


async def test_killed_shard_restarts_and_others_keep_serving() -> None:
    """kill -9 of a shard: back with a new pid and the same id in 2 s; others untouched."""
    with running_server(workers=3) as srv:
        c0, c1, c2 = await clients_on_shards(srv.url, [0, 1, 2], prefix="kill")
        async with closing([c0, c1, c2]):
            pids = srv.shard_pids()
            os.kill(pids[1], signal.SIGKILL)
            killed_at = time.monotonic()
            srv.wait_started(4, timeout=2.0)
            back_in = time.monotonic() - killed_at
            assert back_in < 2.0
            new_pids = srv.shard_pids()
            assert new_pids[1] != pids[1]
            assert new_pids[0] == pids[0] and new_pids[2] == pids[2]
            # The killed shard's client lost its connection; the others did not.
            with pytest.raises(ConnectionClosed):
                await c1.request("ping", "pong")
            for client in (c0, c2):
                assert (await client.request("ping", "pong", id="alive"))["id"] == "alive"
            fresh = await clients_on_shards(srv.url, [1], prefix="fresh")
            async with closing(fresh):
                assert (await fresh[0].request("ping", "pong", id="new"))["id"] == "new"
            assert srv.status()["shards"][1]["restarts"] == 1


async def test_sigterm_drains_with_1001_and_leaves_no_shm() -> None:
    """SIGTERM: each client gets close 1001 "shutdown", exit 0 in time, /dev/shm clean."""
    with running_server(workers=3, settings=["server.graceful_timeout=5"]) as srv:
        clients = await clients_on_shards(srv.url, [0, 1, 2, 0, 1, 2], prefix="drain")
        async with closing(clients):
            for client in clients:
                await client.join("drain-room")
            started = time.monotonic()
            srv.proc.send_signal(signal.SIGTERM)
            for client in clients:
                with pytest.raises(ConnectionClosed) as info:
                    while True:
                        await client.recv(timeout=10)
                assert info.value.rcvd is not None
                assert (info.value.rcvd.code, info.value.rcvd.reason) == (1001, "shutdown")
            code = await asyncio.to_thread(srv.proc.wait, scaled(10))
            assert code == 0
            assert time.monotonic() - started < 5.0 + 1.0
            assert shm.leftover_names(srv.proc.pid) == []


def _listen_backlogs(port: int) -> list[int]:
    """The backlog of each socket listening on ``port`` (``ss``: a listening
    socket's Send-Q is its backlog, capped by net.core.somaxconn)."""
    out = subprocess.run(
        ["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True, check=True
    ).stdout
    return [int(line.split()[2]) for line in out.splitlines() if line.strip()]


def test_every_shard_listens_with_the_configured_backlog() -> None:
    """server.backlog reaches each shard's socket (asyncio's default of 100 made
    SYNs wait for retransmission when an accept burst filled it)."""
    with open("/proc/sys/net/core/somaxconn") as f:
        backlog = min(123, int(f.read()))
    with running_server(workers=2, settings=[f"server.backlog={backlog}"]) as server:
        assert _listen_backlogs(server.port) == [backlog, backlog]


def test_port_in_use_is_a_clear_error() -> None:
    """A port someone listens on: exit 1, one line naming the port, no traceback."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = subprocess.run(
            [
                SHARDCHAT,
                "start",
                "--workers",
                "2",
                "--port",
                str(port),
                "--set",
                f"server.admin_port={free_port()}",
            ],
            capture_output=True,
            text=True,
            timeout=scaled(20),
        )
    assert result.returncode == 1
    assert f"port {port} on 127.0.0.1 is already in use" in result.stderr
    assert "Traceback" not in result.stderr


def test_second_server_on_same_port_is_refused(server: Server) -> None:
    """SO_REUSEPORT must not let a second shardchat share a running one's port."""
    result = subprocess.run(
        [
            SHARDCHAT,
            "start",
            "--workers",
            "1",
            "--port",
            str(server.port),
            "--set",
            f"server.admin_port={free_port()}",
        ],
        capture_output=True,
        text=True,
        timeout=scaled(20),
    )
    assert result.returncode == 1
    assert "already in use" in result.stderr


@pytest.mark.parametrize(
    ("args", "key"),
    [
        (["--set", "server.nope=1"], "server.nope"),
        (["--set", "limits.rate=fast"], "limits.rate"),
        (["--workers", "0"], "server.workers"),
        (["--port", "70000"], "server.port"),
    ],
)
def test_bad_config_exits_2_with_one_line(args: list[str], key: str) -> None:
    """Each kind of config mistake: exit 2 and one line that names the key."""
    result = subprocess.run(
        [SHARDCHAT, "start", *args], capture_output=True, text=True, timeout=scaled(20)
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and key in lines[0], result.stderr


def test_stale_shm_of_killed_supervisor_is_swept() -> None:
    """Names left by a supervisor that is gone are removed at the next start."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    seg = shm.Segment.create(shm.ring_name(dead.pid, 0), 4096)
    seg.close()
    bell = shm.Doorbell(shm.bell_name(dead.pid, 0), create=True)
    bell.close()
    assert len(shm.leftover_names(dead.pid)) == 2
    with running_server(workers=1):
        assert shm.leftover_names(dead.pid) == []


async def test_stuck_shard_is_killed_and_restarted() -> None:
    """A shard whose loop stops (SIGSTOP) misses its heartbeats: after shard_timeout the
    supervisor kills it and starts it again; the other shards are untouched."""
    with running_server(workers=3, settings=["server.shard_timeout=2"]) as srv:
        c0, c2 = await clients_on_shards(srv.url, [0, 2], prefix="stuck")
        async with closing([c0, c2]):
            pids = srv.shard_pids()
            os.kill(pids[1], signal.SIGSTOP)
            srv.wait_started(4, timeout=10)
            events = srv.wait_for_log(lambda ev: any(e.get("event") == "shard_stuck" for e in ev))
            stuck = [e for e in events if e.get("event") == "shard_stuck"]
            assert stuck[0]["shard_id"] == 1 and stuck[0]["pid"] == pids[1]
            new_pids = srv.shard_pids()
            assert new_pids[1] != pids[1]
            assert (new_pids[0], new_pids[2]) == (pids[0], pids[2])
            for client in (c0, c2):
                assert (await client.request("ping", "pong", id="on"))["id"] == "on"
