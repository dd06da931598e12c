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
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import ClientConnection, connect

from shardchat.brokers import segments as shm
from shardchat.client import ChatClient, Message
from shardchat.testing.rawws import (
    OP_CLOSE,
    close_code,
    encode_frame,
    frame_at,
    response_head,
    upgrade_request,
    upgrade_status,
)
from shardchat.testing.rooms import room_owned_by
from shardchat.testing.wait import scaled, wait_until

SHARDCHAT = str(Path(sys.executable).with_name("shardchat"))
# Limits high enough that a test's bursts are never rate limited, nor refused as
# overloaded (a burst of a few thousand forwards waits for its owner here).
FAST = [
    "limits.rate=100000",
    "limits.burst=100000",
    "overload.forwards=1000000",
    "overload.backlog=1073741824",
]
# The room store of a server whose settings name none: memory (durability is not
# the subject), or with SHARDCHAT_TEST_STORAGE=sqlite a temporary storage.dir of
# its own, removed with it. Never data/ in the working directory.
TEST_STORAGE = os.environ.get("SHARDCHAT_TEST_STORAGE", "memory")


class ServerExited(Exception):
    """The server process ended before its shards started."""


class NotPlaced(Exception):
    """No client landed on a wanted shard within the tries (a shard down, say)."""


def free_port() -> int:
    """A port free right now; :func:`start_server` retries if it is taken before use."""
    # The wildcard address: the port is then free on every address, not only on
    # 127.0.0.1 (a client socket from 127.0.0.5, or its TIME_WAIT, can hold the same
    # number, and a server started with --host 0.0.0.0 could not bind it).
    with socket.socket() as sock:
        sock.bind(("", 0))
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
    own_storage: Path | None = None  # a storage.dir made for this server alone

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

    def wait_for_log(
        self, check: Callable[[list[dict[str, Any]]], bool], timeout: float = 10.0
    ) -> list[dict[str, Any]]:
        """Read the server's log until ``check`` holds for its events; return them."""
        found: list[dict[str, Any]] = []

        def shown() -> bool:
            found[:] = self.log_events()
            return check(found)

        wait_until(shown, timeout, lambda: f"the log never showed it:\n{self.tail()}")
        return found

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

        def started() -> bool:
            if self.proc.poll() is not None:
                raise ServerExited(f"server exited with {self.proc.returncode}:\n{self.tail()}")
            return len(self.shard_starts()) >= count

        wait_until(started, timeout, lambda: f"shards did not start:\n{self.tail()}")

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
    port: int | None = None,
    admin_port: int | None = None,
) -> Server:
    """Start ``shardchat start`` on free ports, or on ``port``/``admin_port`` (a
    restart on the same ones). A port found free can be taken by another process
    before the server binds it: then the server stops at once ("already in use")
    and the start is retried on other ports."""
    for attempt in range(5):
        server = _start_server(workers, settings, extra_args, env, port, admin_port)
        try:
            server.wait_started(workers)
        except ServerExited:
            in_use = _port_taken(server)
            cleanup_server(server)
            if in_use and attempt < 4 and port is None and admin_port is None:
                continue
            raise
        except BaseException:
            cleanup_server(server)
            raise
        return server
    raise AssertionError("unreachable")


def start_servers(
    specs: Sequence[tuple[int, Sequence[str]]], env: dict[str, str] | None = None
) -> list[Server]:
    """Servers of (workers, settings) started side by side (a Redis box takes a
    second or two to start); one that lost a free port to another process is
    started again on others, as :func:`start_server` does."""
    started = [_start_server(workers, box, (), env, None, None) for workers, box in specs]
    try:
        for i, server in enumerate(started):
            try:
                server.wait_started(server.workers)
            except ServerExited:
                if not _port_taken(server):
                    raise
                cleanup_server(server)
                workers, box = specs[i]
                started[i] = start_server(workers, box, (), env)
    except BaseException:
        for server in started:
            cleanup_server(server)
        raise
    return started


def _port_taken(server: Server) -> bool:
    """The server stopped because a port drawn free was taken meanwhile (a port
    of the test's own settings, such as api.port from free_port, can be the
    number drawn for server.port: the same race)."""
    tail = server.tail()
    return "already in use" in tail or "must differ from server.port" in tail


def _start_server(
    workers: int,
    settings: Sequence[str],
    extra_args: Sequence[str],
    env: dict[str, str] | None,
    port: int | None,
    admin_port: int | None,
) -> Server:
    port = port or free_port()
    # Bound to the wildcard address and closed at once, two calls can return the
    # same port (seen here: the server and its admin port on one number, five
    # starts in a row): the admin port is drawn again until it differs.
    while not admin_port or admin_port == port:
        admin_port = free_port()
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
    own_storage: Path | None = None
    if not any(s.startswith("storage.") for s in settings):
        if TEST_STORAGE == "sqlite":
            own_storage = Path(tempfile.mkdtemp(prefix="shardchat-store-"))
            args += ["--set", f"storage.dir={own_storage}"]
        else:
            args += ["--set", "storage.kind=memory"]
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
    return Server(proc, port, admin_port, workers, Path(log_file.name), log_file, own_storage)


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
    if server.own_storage is not None:
        shutil.rmtree(server.own_storage, ignore_errors=True)
    server._log_file.close()
    with contextlib.suppress(OSError):
        server.log_path.unlink()


@contextlib.contextmanager
def running_server(
    workers: int = 3,
    settings: Sequence[str] = (),
    extra_args: Sequence[str] = (),
    env: dict[str, str] | None = None,
    port: int | None = None,
) -> Iterator[Server]:
    server = start_server(workers, settings, extra_args, env, port)
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
        self.dropped: list[dict[str, Any]] = []  # frames recv_type passed over

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
            self.dropped.append(frame)

    async def request(self, kind: str, reply: str, **obj: Any) -> dict[str, Any]:
        await self.send(type=kind, **obj)
        return await self.recv_type(reply)

    async def join(self, room: str, **extra: Any) -> dict[str, Any]:
        return await self.request("join", "joined", room=room, **extra)

    async def close(self) -> None:
        await self.ws.close()


async def expect_error(client: Client, code: str, request_id: str | None = None) -> dict[str, Any]:
    """The client's next ``error`` frame: its ``code``, the ``id`` it echoes, a reason."""
    frame = await client.recv_type("error")
    assert frame["code"] == code, frame
    assert frame.get("id") == request_id, frame
    assert frame["reason"], frame
    return frame


async def connect_client(
    url: str, user: str | None = None, rooms: Sequence[str] = (), source: str | None = None
) -> Client:
    """A connected client; ``source`` binds it to that local address in 127.0.0.0/8."""
    query = []
    if user is not None:
        query.append(f"user={user}")
    query += [f"room={room}" for room in rooms]
    joiner = "&" if "?" in url else "?"
    full = url + (joiner + "&".join(query) if query else "")
    # max_queue=None: a client that is not reading right now still drains its socket,
    # so that its close handshake is never stuck behind unread frames.
    extra: dict[str, Any] = {} if source is None else {"local_addr": (source, 0)}
    ws = await connect(
        full, max_size=None, max_queue=None, compression=None, open_timeout=scaled(10), **extra
    )
    welcome = json.loads(await asyncio.wait_for(ws.recv(), scaled(5)))
    assert welcome["type"] == "welcome", welcome
    return Client(ws, welcome)


async def take_messages(
    client: ChatClient,
    count: int,
    timeout: float = 60,
    progress: tuple[int, asyncio.Event] | None = None,
) -> list[Message]:
    """``count`` messages from a :class:`ChatClient` within ``timeout`` (scaled);
    ``progress`` (n, event): the event is set once n arrived."""
    got: list[Message] = []

    async def run() -> None:
        async for message in client.messages():
            got.append(message)
            if progress is not None and len(got) == progress[0]:
                progress[1].set()
            if len(got) == count:
                return

    await asyncio.wait_for(run(), scaled(timeout))
    return got


async def room_of_three(url: str, client: ChatClient, prefix: str) -> tuple[int, str, Client]:
    """For a :class:`ChatClient` on a server of three shards: its shard, a room it
    joined that another shard owns, and a member of that room on the third
    shard (users ``prefix``...)."""
    home = client.shard
    assert home is not None
    owner, third = (s for s in range(3) if s != home)
    room = room_owned_by(owner, prefix=prefix)
    await client.join(room)
    (member,) = await clients_on_shards(url, [third], prefix=prefix)
    try:
        await member.join(room)
    except BaseException:
        await member.close()
        raise
    return home, room, member


async def off_the_killed_shard(
    srv: Server, client: Client, killed: int, room: str, starts: int
) -> Client:
    """``client``, or, when it was on the shard just killed, its user again in
    ``room`` once the restart is logged (``starts`` shard starts in all)."""
    if client.shard != killed:
        return client
    await client.close()
    srv.wait_started(starts)
    again = await connect_client(srv.url, user=client.user, rooms=[room])
    await again.recv_type("joined")
    return again


async def clients_on_shards(
    url: str,
    shards: Sequence[int],
    prefix: str = "u",
    max_tries: int = 400,
    source: str | None = None,
    spread: bool = False,
) -> list[Client]:
    """Connect until there is one client on each listed shard (in that order).

    The kernel picks the shard; clients that land where none is wanted are closed.
    ``spread``: each attempt from its own address in 127.0.2.0/24 (instead of
    ``source``), so that the attempts never meet a per-address limit.
    """
    wanted = list(shards)
    found: list[Client | None] = [None] * len(wanted)
    spare: list[Client] = []
    for attempt in range(max_tries):
        if spread:
            source = f"127.0.2.{1 + attempt % 254}"
        client = await connect_client(url, user=f"{prefix}{attempt}", source=source)
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
        raise NotPlaced(f"could not place clients on shards {wanted}")
    return [c for c in found if c is not None]


@contextlib.asynccontextmanager
async def closing(clients: Sequence[Client]) -> AsyncIterator[Sequence[Client]]:
    try:
        yield clients
    finally:
        await asyncio.gather(*(c.ws.close() for c in clients), return_exceptions=True)


async def collect(
    client: Client, room: str, count: int, timeout: float = 60
) -> list[dict[str, Any]]:
    """The next ``count`` messages of ``room`` that ``client`` receives (other frames are
    passed over)."""
    got: list[dict[str, Any]] = []
    while len(got) < count:
        frame = await client.recv(timeout)
        if frame["type"] == "message" and frame["room"] == room:
            got.append(frame)
    return got


async def publish(
    client: Client, room: str, count: int, tag: str, body: str = ""
) -> list[dict[str, Any]]:
    """Send ``count`` messages without waiting, then gather every ack."""
    for i in range(count):
        content = f"{tag}:{i}{body}"
        await client.send(type="message", room=room, content=content, id=f"{tag}-{i}")
    acks: list[dict[str, Any]] = []
    while len(acks) < count:
        frame = await client.recv(60)
        if frame["type"] == "ack":
            acks.append(frame)
        assert frame["type"] != "error", frame
    return acks


@dataclass
class DroppedRoom:
    """A room owned by shard 0 whose copy shard 1 has dropped (see :func:`dropped_room`)."""

    server: Server
    room: str
    publisher: Client  # on shard 0, still a member
    late: Client  # on shard 1, not a member
    epoch: int  # the room's epoch, from the publisher's ``joined``


@contextlib.asynccontextmanager
async def dropped_room(prefix: str, count: int = 20, tag: str = "x") -> AsyncIterator[DroppedRoom]:
    """Three shards with ``delivery.room_idle=1``: a client on shard 0 (the owner)
    publishes ``count`` messages ``{tag}:{i}`` to a room, shard 1 drops its idle copy
    (waited for in the log), then a client connects to shard 1 without joining."""
    with running_server(workers=3, settings=[*FAST, "delivery.room_idle=1"]) as srv:
        room = room_owned_by(0, prefix=prefix)
        (pub,) = await clients_on_shards(srv.url, [0], prefix=f"{prefix}pub")
        async with closing([pub]):
            joined = await pub.join(room)
            await publish(pub, room, count, tag)
            srv.wait_for_log(
                lambda ev: any(e.get("event") == "rooms_dropped" and e["shard"] == 1 for e in ev)
            )
            (late,) = await clients_on_shards(srv.url, [1], prefix=f"{prefix}late")
            async with closing([late]):
                yield DroppedRoom(srv, room, pub, late, joined["epoch"])


class RawClient:
    """A WebSocket client on a bare socket: it sends whatever frames a test builds
    (bad UTF-8, binary, unanswered pings) and reads the server's frames one by one.

    Raises ConnectionError when the server ends the connection in the middle of what
    is being read."""

    def __init__(
        self, port: int, path: str, rcvbuf: int | None = None, timeout: float | None = None
    ) -> None:
        self.sock = socket.socket()
        if rcvbuf is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(scaled(10) if timeout is None else timeout)
        self.sock.connect(("127.0.0.1", port))
        self.sock.sendall(upgrade_request(path))
        self.buf = b""
        self.status = upgrade_status(self._until(b"\r\n\r\n"))

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)  # a reset raises ConnectionResetError
        if not chunk:
            raise ConnectionError("closed before a whole frame")
        self.buf += chunk

    def _until(self, marker: bytes) -> bytes:
        while marker not in self.buf:
            self._fill()
        head, _, self.buf = self.buf.partition(marker)
        return head

    def send_frame(self, opcode: int, payload: bytes, fin: bool = True) -> None:
        """A client frame masked with a random key (RFC 6455 5.3)."""
        self.sock.sendall(encode_frame(payload, opcode, fin=fin, mask=os.urandom(4)))

    def send_json(self, obj: dict[str, Any]) -> None:
        self.send_frame(0x1, json.dumps(obj).encode())

    def recv_frame(self) -> tuple[int, bytes]:
        while (at := frame_at(self.buf, 0, len(self.buf))) is None:
            self._fill()
        head, n = at
        opcode, payload = self.buf[0] & 0x0F, self.buf[head : head + n]
        self.buf = self.buf[head + n :]
        return opcode, payload

    def close_code(self) -> int:
        """Read frames until the server's close frame; its code."""
        while True:
            opcode, payload = self.recv_frame()
            if opcode == OP_CLOSE:
                code = close_code(payload)
                assert code is not None, "a close frame without a code"
                return code

    def close(self) -> None:
        self.sock.close()


async def raw_on_shard(server: Server, shard: int, path: str = "/ws?user=raw") -> RawClient:
    """A raw client that landed on ``shard`` (others are closed)."""
    for _ in range(300):
        raw = await asyncio.to_thread(RawClient, server.port, path)
        opcode, payload = await asyncio.to_thread(raw.recv_frame)
        welcome = json.loads(payload)
        if welcome["shard"] == shard:
            return raw
        raw.close()
    raise AssertionError(f"no raw client on shard {shard}")


async def closed_with(raw: RawClient) -> int:
    try:
        return await asyncio.to_thread(raw.close_code)
    finally:
        raw.close()


def raw_http(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send raw request bytes; the answer's status, headers (lower-case names) and body,
    read until the server closes (or, for a 101, to the end of the head)."""
    with socket.create_connection(("127.0.0.1", port), timeout=scaled(10)) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
            if data.startswith(b"HTTP/1.1 101 ") and b"\r\n\r\n" in data:
                break
    head, _, body = data.partition(b"\r\n\r\n")
    status, headers = response_head(head)
    return status, headers, body


Metrics = dict[str, dict[tuple[tuple[str, str], ...], float]]


def scrape(srv: Server) -> Metrics:
    """The server's /metrics: each sample's value by name and sorted labels."""
    url = f"http://127.0.0.1:{srv.admin_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    out: Metrics = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def metric_sum(srv: Server, name: str) -> float:
    """The sum of a metric's samples on the server's /metrics, whatever their labels."""
    return sum(scrape(srv).get(name, {}).values())


def metric(srv: Server, name: str, **labels: str) -> float:
    """One sample of the server's /metrics (AssertionError when it has none such)."""
    found = scrape(srv).get(name, {}).get(tuple(sorted(labels.items())))
    assert found is not None, f"no {name} {labels}"
    return found


def kill_server(server: Server) -> None:
    """kill -9 of the supervisor and of every shard at once (nothing gets to say
    goodbye), then wait until all are gone."""
    pids = list(server.shard_pids().values())
    for pid in [server.proc.pid, *pids]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    server.proc.wait()
    wait_until(lambda: not any(_alive(pid) for pid in pids), 10, "every shard gone after kill -9")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def assert_no_traceback(server: Server) -> None:
    """Nothing a client sent made the server write a traceback or an error."""
    text = server.log_path.read_text(errors="replace")
    assert "Traceback" not in text, server.tail()
    events = server.log_events()
    assert not [e for e in events if "exc" in e or e.get("level") == "error"], server.tail()


async def good_neighbour(
    url: str,
    shard: int,
    room: str,
    count: int = 30,
    source: str | None = None,
    query: str = "",
    spread: bool = False,
) -> tuple[Client, Client, asyncio.Task[list[dict[str, Any]]]]:
    """A well-behaved member of ``room`` on ``shard`` and a publisher sending it
    ``count`` messages in the background; await the task for what it received.
    ``query`` is added to both URLs (a token, say); ``spread`` places the member
    from addresses of its own (see clients_on_shards)."""
    url = url + query
    (good,) = await clients_on_shards(
        url, [shard], prefix=f"good{room}", source=source, spread=spread
    )
    publisher = await connect_client(url, user=f"pub{room}", source=source)
    await good.join(room)
    await publisher.join(room)

    async def run() -> list[dict[str, Any]]:
        for i in range(count):
            await publisher.send(type="message", room=room, content=f"n{i}")
            await asyncio.sleep(0.005)
        got = []
        while len(got) < count:
            frame = await good.recv(10)
            if frame["type"] == "message" and frame["sender"] == publisher.user:
                got.append(frame)
        return got

    return good, publisher, asyncio.create_task(run())


async def check_neighbour(
    good: Client, publisher: Client, task: asyncio.Task[list[dict[str, Any]]], count: int = 30
) -> None:
    try:
        got = await task
        assert [m["content"] for m in got] == [f"n{i}" for i in range(count)]
        assert [m["seq"] for m in got] == sorted(m["seq"] for m in got)
    finally:
        await good.close()
        await publisher.close()
