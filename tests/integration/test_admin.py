"""The admin port: its own listen address (127.0.0.1 whatever --host says), an
optional bearer token for /status and /metrics, read timeouts on idle admin
connections, and shards that do not hold the admin listening socket. The main
port keeps serving a neighbour meanwhile."""

from __future__ import annotations

import os
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from shardchat.procstat import stat_fields
from tests.support.helpers import Server, check_neighbour, good_neighbour, running_server, scaled

TOKEN = "admin-token-for-tests"


def listening_inodes(port: int) -> dict[str, str]:
    """Listening TCP sockets on ``port``: inode -> local address (hex, /proc/net/tcp)."""
    out = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address, hex_port = fields[1].rsplit(":", 1)
            if int(hex_port, 16) == port and fields[3] == "0A":  # LISTEN
                out[fields[9]] = address
    return out


def socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    return inodes


def get(server: Server, path: str, auth: str | None = None) -> int:
    request = urllib.request.Request(f"http://127.0.0.1:{server.admin_port}{path}")
    if auth is not None:
        request.add_header("Authorization", auth)
    try:
        with urllib.request.urlopen(request, timeout=scaled(5)) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


async def test_admin_host_token_and_shards_without_the_admin_socket() -> None:
    """With --host 0.0.0.0 the admin port still listens on 127.0.0.1 only; /status and
    /metrics need the bearer token (any case of the scheme), /healthz does not; no
    shard holds the admin listening socket."""
    settings = [f'server.admin_token="{TOKEN}"']
    with running_server(workers=2, settings=settings, extra_args=["--host", "0.0.0.0"]) as server:
        good, pub, task = await good_neighbour(server.url, 0, "admin")
        admin = listening_inodes(server.admin_port)
        assert set(admin.values()) == {"0100007F"}, admin  # 127.0.0.1
        assert set(listening_inodes(server.port).values()) == {"00000000"}  # 0.0.0.0
        (inode,) = admin
        assert inode in socket_inodes(server.proc.pid)
        shard_pids = [
            p for p in os.listdir("/proc") if p.isdigit() and _parent(int(p)) == server.proc.pid
        ]
        assert len(shard_pids) == 2
        for pid in shard_pids:
            assert inode not in socket_inodes(int(pid))
        assert get(server, "/status") == 401
        assert get(server, "/metrics", "Bearer wrong") == 401
        assert get(server, "/status", f"Bearer {TOKEN}") == 200
        assert get(server, "/metrics", f"bearer {TOKEN}") == 200
        assert get(server, "/healthz") == 200
        await check_neighbour(good, pub, task)


def _parent(pid: int) -> int:
    try:
        return int(stat_fields(pid)[1])
    except OSError:
        return -1


def test_idle_admin_connections_time_out() -> None:
    """Admin connections that send nothing are closed (read timeout), and /status
    answers while they are open."""
    with running_server(workers=1) as server:
        idle = [socket.create_connection(("127.0.0.1", server.admin_port)) for _ in range(20)]
        try:
            assert server.status()["shards"][0]["alive"]
            deadline = time.monotonic() + scaled(20)
            for sock in idle:
                sock.settimeout(max(0.1, deadline - time.monotonic()))
                assert sock.recv(1) == b""  # closed by the server, not by our timeout
        finally:
            for sock in idle:
                sock.close()


@pytest.mark.parametrize("setting", ["server.tls_cert=/nonexistent", "auth.secret=short"])
def test_bad_security_settings_stop_the_start(setting: str) -> None:
    """A missing certificate or a secret under 32 bytes: exit 2 with one line."""
    import subprocess

    from tests.support.helpers import SHARDCHAT

    out = subprocess.run(
        [SHARDCHAT, "config", "--set", setting], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and setting.split("=")[0] in out.stderr
