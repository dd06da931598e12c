"""Helpers for the integration tests: a real server process and real clients.

Deadlines scale with ``SHARDCHAT_TEST_TIMEOUT_FACTOR`` (default 1) for slow
machines. Every server started here is stopped, and its shared memory
unlinked, even when the test fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from websockets.asyncio.client import ClientConnection, connect

from shardchat import shm

FACTOR = float(os.environ.get("SHARDCHAT_TEST_TIMEOUT_FACTOR", "1"))
SHARDCHAT = str(Path(sys.executable).with_name("shardchat"))


def scaled(seconds: float) -> float:
    return seconds * FACTOR


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Server:
    """A running ``shardchat start`` process."""

    proc: subprocess.Popen[bytes]
    port: int
    admin_port: int
    workers: int
    log_path: Path
    _log_file: Any = field(repr=False)

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def log_events(self) -> list[dict[str, Any]]:
        events = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    events.append(json.loads(line))
        return events

    def shard_starts(self) -> list[dict[str, Any]]:
        return [e for e in self.log_events() if e.get("event") == "shard_start"]

    def status(self) -> dict[str, Any]:
        url = f"http://127.0.0.1:{self.admin_port}/status"
        with urllib.request.urlopen(url, timeout=5) as response:
            data: dict[str, Any] = json.loads(response.read())
            return data

    def shard_pids(self) -> dict[int, int]:
        return {s["id"]: s["pid"] for s in self.status()["shards"] if s["alive"]}

    def wait_started(self, count: int, timeout: float = 15.0) -> None:
        """Wait until ``count`` shard_start events are logged (restarts included)."""
        deadline = time.monotonic() + scaled(timeout)
        while len(self.shard_starts()) < count:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"shards did not start:\n{self.tail()}")
            time.sleep(0.02)

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(scaled(timeout))
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_server(
    workers: int = 3,
    settings: Sequence[str] = (),
    extra_args: Sequence[str] = (),
    env: dict[str, str] | None = None,
) -> Server:
    port, admin_port = free_port(), free_port()
    log_file = tempfile.NamedTemporaryFile(prefix="shardchat-test-", suffix=".log", delete=False)
    args = [
        SHARDCHAT,
        "start",
        "--workers",
        str(workers),
        "--port",
        str(port),
        "--set",
        f"server.admin_port={admin_port}",
        "--set",
        "log.format=json",
    ]
    for setting in settings:
        args += ["--set", setting]
    args += list(extra_args)
    proc = subprocess.Popen(
        args,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})},
        cwd=tempfile.gettempdir(),  # no ./config.toml: the built-in defaults apply
    )
    server = Server(proc, port, admin_port, workers, Path(log_file.name), log_file)
    try:
        server.wait_started(workers)
    except BaseException:
        cleanup_server(server)
        raise
    return server


def cleanup_server(server: Server) -> None:
    """Stop the server whatever state it is in and remove its shared memory."""
    with contextlib.suppress(Exception):
        server.stop()
    if server.proc.poll() is None:
        server.proc.kill()
        server.proc.wait()
    # Shards that outlived a killed supervisor.
    with contextlib.suppress(Exception):
        out = subprocess.run(
            ["pgrep", "-f", f"--port {server.port} "], capture_output=True, text=True
        ).stdout
        for pid in out.split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
    shm.unlink_all(server.proc.pid)
    server._log_file.close()
    with contextlib.suppress(OSError):
        server.log_path.unlink()


@contextlib.contextmanager
def running_server(
    workers: int = 3,
    settings: Sequence[str] = (),
    extra_args: Sequence[str] = (),
    env: dict[str, str] | None = None,
) -> Iterator[Server]:
    server = start_server(workers, settings, extra_args, env)
    try:
        yield server
    finally:
        cleanup_server(server)


class Client:
    """A WebSocket client that speaks the protocol and keeps what it received."""

    def __init__(self, ws: ClientConnection, welcome: dict[str, Any]) -> None:
        self.ws = ws
        self.welcome = welcome
        self.shard: int = welcome["shard"]
        self.user: str = welcome["user"]

    async def send(self, **obj: Any) -> None:
        await self.ws.send(json.dumps(obj))

    async def recv(self, timeout: float = 5.0) -> dict[str, Any]:
        raw = await asyncio.wait_for(self.ws.recv(), scaled(timeout))
        data: dict[str, Any] = json.loads(raw)
        return data

    async def recv_type(self, kind: str, timeout: float = 5.0) -> dict[str, Any]:
        """Receive until a frame of ``kind`` arrives; other frames are dropped."""
        deadline = time.monotonic() + scaled(timeout)
        while True:
            frame = await self.recv(max(0.01, deadline - time.monotonic()))
            if frame["type"] == kind:
                return frame

    async def request(self, kind: str, reply: str, **obj: Any) -> dict[str, Any]:
        await self.send(type=kind, **obj)
        return await self.recv_type(reply)

    async def join(self, room: str, **extra: Any) -> dict[str, Any]:
        return await self.request("join", "joined", room=room, **extra)

    async def close(self) -> None:
        await self.ws.close()


async def connect_client(url: str, user: str | None = None, rooms: Sequence[str] = ()) -> Client:
    query = []
    if user is not None:
        query.append(f"user={user}")
    query += [f"room={room}" for room in rooms]
    full = url + ("?" + "&".join(query) if query else "")
    # max_queue=None: a client that is not reading right now still drains its socket,
    # so that its close handshake is never stuck behind unread frames.
    ws = await connect(
        full, max_size=None, max_queue=None, compression=None, open_timeout=scaled(10)
    )
    welcome = json.loads(await asyncio.wait_for(ws.recv(), scaled(5)))
    assert welcome["type"] == "welcome", welcome
    return Client(ws, welcome)


async def clients_on_shards(
    url: str, shards: Sequence[int], prefix: str = "u", max_tries: int = 400
) -> list[Client]:
    """Connect until there is one client on each listed shard (in that order).

    The kernel picks the shard; clients that land where none is wanted are closed.
    """
    wanted = list(shards)
    found: list[Client | None] = [None] * len(wanted)
    spare: list[Client] = []
    for attempt in range(max_tries):
        client = await connect_client(url, user=f"{prefix}{attempt}")
        for i, shard in enumerate(wanted):
            if found[i] is None and shard == client.shard:
                found[i] = client
                break
        else:
            spare.append(client)
        if all(c is not None for c in found):
            break
    for client in spare:
        await client.close()
    if not all(c is not None for c in found):
        raise AssertionError(f"could not place clients on shards {wanted}")
    return [c for c in found if c is not None]


@contextlib.asynccontextmanager
async def closing(clients: Sequence[Client]) -> AsyncIterator[Sequence[Client]]:
    try:
        yield clients
    finally:
        await asyncio.gather(*(c.ws.close() for c in clients), return_exceptions=True)
