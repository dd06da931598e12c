"""Memory per idle connection: shardchat against the plain websockets server.

Holds N idle WebSocket connections (default 15,000) on one shardchat shard and
on the baseline, in the same run, and reports the server's RSS growth per
connection. The connections come from several client processes bound to
several source addresses in 127.0.0.0/8 (20,000 open files per process).

    python -m perf.scenarios.idle_rss --connections 15000
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import multiprocessing
import time
from multiprocessing.connection import Connection

from perf.lib import procs
from shardchat.testing.rawws import open_upgraded

PER_PROCESS = 5000
CONCURRENT_HANDSHAKES = 200


# A connection's request target: {p} is the client process, {i} the connection in it.
IDLE_PATH = "/ws?user=idle{i}"


def _client(port: int, count: int, local_addr: str, pipe: Connection, path: str) -> None:
    async def run() -> None:
        gate = asyncio.Semaphore(CONCURRENT_HANDSHAKES)
        held = []
        failures = 0

        async def one(i: int) -> None:
            nonlocal failures
            async with gate:
                try:
                    target = path.format(p=local_addr.rsplit(".", 1)[1], i=i, r=i // 10)
                    held.append(
                        await open_upgraded(port, target, local_addr=local_addr, limit=4096)
                    )
                except (OSError, ConnectionError, asyncio.IncompleteReadError):
                    failures += 1

        await asyncio.gather(*(one(i) for i in range(count)))
        pipe.send((len(held), failures))
        await asyncio.get_running_loop().run_in_executor(None, pipe.recv)
        for _, writer in held:
            writer.close()

    asyncio.run(run())


def hold(
    port: int, connections: int, path: str = IDLE_PATH
) -> tuple[int, int, list[tuple[Connection, multiprocessing.Process]]]:
    ctx = multiprocessing.get_context("fork")
    clients = []
    for n in range(0, connections, PER_PROCESS):
        parent, child = ctx.Pipe()
        # A fresh /16 per server port, as perf.lib.load does: TIME_WAIT of one run's
        # ports must not exhaust the next run's.
        addr = f"127.{1 + port % 250}.0.{2 + len(clients)}"
        proc = ctx.Process(
            target=_client, args=(port, min(PER_PROCESS, connections - n), addr, child, path)
        )
        proc.start()
        clients.append((parent, proc))
    up = failed = 0
    for parent, _ in clients:
        ok, bad = parent.recv()
        up += ok
        failed += bad
    return up, failed, clients


def release(clients: list[tuple[Connection, multiprocessing.Process]]) -> None:
    for parent, _ in clients:
        parent.send("stop")
    for _, proc in clients:
        proc.join(30)


def measure(server: procs.Running, connections: int, settle: float) -> dict[str, object]:
    time.sleep(settle)
    before = server.rss()
    started = time.monotonic()
    up, failed, clients = hold(server.port, connections)
    connect_s = time.monotonic() - started
    time.sleep(settle)
    after = server.rss()
    release(clients)
    per_conn = (after - before) / up if up else 0.0
    return {
        "server": server.name,
        "connections": up,
        "failed": failed,
        "connect_seconds": round(connect_s, 2),
        "rss_before": before,
        "rss_after": after,
        "bytes_per_connection": round(per_conn),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--connections", type=int, default=15000)
    parser.add_argument("--settle", type=float, default=3.0, help="seconds before each RSS reading")
    args = parser.parse_args()
    gc.disable()
    rows = []
    with procs.baseline() as server:
        rows.append(measure(server, args.connections, args.settle))
    with procs.shardchat(
        1, settings=["heartbeat.interval=600", "heartbeat.idle_timeout=0"]
    ) as server:
        rows.append(measure(server, args.connections, args.settle))
    ratio = rows[1]["bytes_per_connection"] / rows[0]["bytes_per_connection"]  # type: ignore[operator]
    print(f"{'server':<32} {'conns':>7} {'failed':>6} {'connect s':>9} {'RSS/conn':>9}")
    for row in rows:
        print(
            f"{row['server']:<32} {row['connections']:>7} {row['failed']:>6} "
            f"{row['connect_seconds']:>9} {row['bytes_per_connection']:>9}"
        )
    print(f"shardchat / baseline RSS per connection: {ratio:.2f}")
    path = procs.write_result("idle_rss", {"rows": rows, "ratio": round(ratio, 3)})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
