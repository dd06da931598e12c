"""Connection churn for the leak test: ``python -m tests.support.churn PORT COUNT CONCURRENCY``.

Each cycle does what a short-lived chat client does: it opens a TCP connection,
upgrades it to a WebSocket joining a room (presence, membership), sends an
application ping, reads until the pong and closes: every other cycle with a
close frame (a clean close), the rest by dropping the TCP connection (1006).
Prints the number of completed cycles.
A process of its own, so that several can run at once (the churn is CPU-bound
on the client side too).
"""

from __future__ import annotations

import asyncio
import base64
import os
import sys

import uvloop

_REQUEST = (
    "GET /ws?user=churn{user}&room=churn{room} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
    "Sec-WebSocket-Version: 13\r\n\r\n"
)
# Masked frames with a zero mask: the payload is sent as is.
_CLOSE = bytes([0x88, 0x82]) + b"\0\0\0\0" + (1000).to_bytes(2, "big")
_PING_JSON = b'{"type":"ping","id":"churn"}'
_PING = bytes([0x81, 0x80 | len(_PING_JSON)]) + b"\0\0\0\0" + _PING_JSON


async def _until_pong(reader: asyncio.StreamReader) -> None:
    while True:
        b0, b1 = await reader.readexactly(2)
        n = b1 & 0x7F
        if n == 126:
            n = int.from_bytes(await reader.readexactly(2), "big")
        elif n == 127:
            n = int.from_bytes(await reader.readexactly(8), "big")
        payload = await reader.readexactly(n)
        if b'"pong"' in payload:
            return


async def cycle(port: int, n: int, barrier: asyncio.Barrier) -> bool:
    """One connection's life. All the process's connections are open together at
    the barrier, as under real churn, where many are open whenever the shard
    freezes its objects (gc.freeze())."""
    try:
        # Each cycle from one of 200 source addresses: 50,000 closed connections
        # leave their TIME_WAIT ports spread over them, instead of exhausting
        # 127.0.0.1's ephemeral ports for the tests (and the machine) that follow.
        source = f"127.0.3.{1 + n % 200}"
        reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    except OSError:
        await barrier.wait()
        return False
    try:
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(_REQUEST.format(key=key, user=n % 997, room=n % 10).encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
        if b" 101 " not in head[:20]:
            await barrier.wait()
            return False
        writer.write(_PING)
        await asyncio.wait_for(_until_pong(reader), 30)
        await barrier.wait()
        if n % 2:
            writer.write(_CLOSE)
            await writer.drain()
            # The server's close frame, then its FIN.
            await asyncio.wait_for(reader.read(), 30)
        return True
    except (OSError, asyncio.IncompleteReadError, TimeoutError):
        await barrier.wait()
        return False
    finally:
        writer.close()


async def main(port: int, count: int, concurrency: int) -> int:
    rounds = -(-count // concurrency)
    barrier = asyncio.Barrier(concurrency)

    async def worker(w: int) -> int:
        done = 0
        for r in range(rounds):
            done += await cycle(port, r * concurrency + w, barrier)
        return done

    return sum(await asyncio.gather(*(worker(w) for w in range(concurrency))))


if __name__ == "__main__":
    port_, count_, concurrency_ = (int(a) for a in sys.argv[1:4])
    print(uvloop.run(main(port_, count_, concurrency_)))
