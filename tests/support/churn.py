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
import sys

import uvloop

from shardchat.testing.rawws import close_frame, encode_frame, open_upgraded, read_frame

_CLOSE = close_frame(1000)
_PING = encode_frame(b'{"type":"ping","id":"churn"}')


async def _until_pong(reader: asyncio.StreamReader) -> None:
    while True:
        _, payload = await read_frame(reader)
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
        path = f"/ws?user=churn{n % 997}&room=churn{n % 10}"
        reader, writer = await asyncio.wait_for(open_upgraded(port, path, local_addr=source), 30)
    except (OSError, asyncio.IncompleteReadError, TimeoutError):
        await barrier.wait()
        return False
    try:
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
