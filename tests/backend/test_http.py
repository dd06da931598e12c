"""The backend HTTP client: keep-alive reuse, at most `connections` sockets however
many requests wait, a deadline per request, failures as BackendError with a short
reason, and one retry when the backend closed an idle keep-alive connection."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from shardchat.backend.http import HttpClient
from shardchat.core.errors import BackendError


class Server:
    """A tiny keep-alive HTTP/1.1 server: counts connections, answers each request
    after ``delay`` with its body echoed; ``close_after`` requests per connection."""

    def __init__(self, delay: float = 0.0, close_after: int = 0) -> None:
        self.delay = delay
        self.close_after = close_after
        self.connections = 0
        self.open = 0
        self.most_open = 0
        self.requests = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open += 1
        self.most_open = max(self.most_open, self.open)
        served = 0
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    return
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                body = await reader.readexactly(length)
                self.requests += 1
                if self.delay:
                    await asyncio.sleep(self.delay)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
                served += 1
                if self.close_after and served >= self.close_after:
                    return
        finally:
            self.open -= 1
            writer.close()


@pytest.fixture
async def served() -> AsyncIterator[tuple[Server, int]]:
    server = Server()
    listening = await asyncio.start_server(server.handle, "127.0.0.1", 0)
    port = listening.sockets[0].getsockname()[1]
    try:
        yield server, port
    finally:
        listening.close()


async def test_requests_share_a_bounded_pool_of_keep_alive_connections(
    served: tuple[Server, int],
) -> None:
    server, port = served
    server.delay = 0.01
    client = HttpClient(f"http://127.0.0.1:{port}/hook", connections=2, timeout=5)
    answers = await asyncio.gather(*(client.post(b"%d" % i) for i in range(20)))
    assert [a.body for a in answers] == [b"%d" % i for i in range(20)]
    assert {a.status for a in answers} == {200}
    assert server.connections == 2 and server.most_open == 2  # 20 requests, 2 sockets
    await client.post(b"again")
    assert server.connections == 2  # kept alive
    client.close()


async def test_an_idle_connection_the_backend_closed_is_retried_once(
    served: tuple[Server, int],
) -> None:
    server, port = served
    server.close_after = 1  # the backend closes each connection after one answer
    client = HttpClient(f"http://127.0.0.1:{port}/", connections=1, timeout=5)
    assert (await client.post(b"one")).body == b"one"
    await asyncio.sleep(0.05)  # the close reaches us while the connection is idle
    assert (await client.post(b"two")).body == b"two"
    assert server.connections == 2
    client.close()


async def test_a_slow_backend_times_out_and_the_pool_recovers(
    served: tuple[Server, int],
) -> None:
    server, port = served
    server.delay = 1.0
    client = HttpClient(f"http://127.0.0.1:{port}/", connections=1, timeout=0.1)
    with pytest.raises(BackendError, match="timed out"):
        await client.post(b"slow")
    server.delay = 0.0
    assert (await client.post(b"quick")).body == b"quick"  # a fresh connection
    client.close()


async def test_no_backend_is_a_short_reason() -> None:
    client = HttpClient("http://127.0.0.1:1/", connections=1, timeout=1)
    with pytest.raises(BackendError, match="connection refused"):
        await client.post(b"x")
    with pytest.raises(BackendError, match="not an http"):
        HttpClient("ftp://127.0.0.1/", connections=1, timeout=1)


async def test_requests_waiting_for_a_connection_are_bounded(
    served: tuple[Server, int],
) -> None:
    server, port = served
    server.delay = 0.2
    client = HttpClient(f"http://127.0.0.1:{port}/", connections=1, timeout=5, max_waiting=2)
    results = await asyncio.gather(
        *(client.post(b"%d" % i) for i in range(5)), return_exceptions=True
    )
    refused = [r for r in results if isinstance(r, BackendError)]
    assert len(refused) == 2 and "already wait" in str(refused[0])
    assert [r.body for r in results if not isinstance(r, BaseException)] == [b"0", b"1", b"2"]
    client.close()


async def test_a_waiter_woken_then_cancelled_passes_the_free_connection_on(
    served: tuple[Server, int],
) -> None:
    """Two requests wait for the one connection; the first is handed it and times out
    before it runs: the second gets it at once, not at its own deadline."""
    server, port = served
    client = HttpClient(f"http://127.0.0.1:{port}/", connections=1, timeout=30)
    held, _ = await client._acquire()
    first = asyncio.create_task(client._acquire())
    second = asyncio.create_task(client._acquire())
    while len(client._waiters) < 2:
        await asyncio.sleep(0)
    client._idle.append(held)
    client._wake()  # the first is handed the connection...
    first.cancel()  # ...and cancelled before it ran
    conn, reused = await asyncio.wait_for(second, 5)
    assert conn is held and reused
    assert first.cancelled()
    client._idle.append(conn)
    client.close()
    conn.writer.close()
    await conn.writer.wait_closed()
