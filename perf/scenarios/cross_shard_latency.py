"""Publish-to-delivery latency across shards at a steady rate.

shardchat ``--workers 3``: the sender sits on shard 0, the room's owner is
shard 2 and the receiver sits on shard 1, so every message crosses two rings
(forward 0 -> 2, sequenced 2 -> 1) and two doorbells. The plain websockets
server (one process, no rings) is measured in the same run as the baseline.
Messages go out at a fixed rate (default 1,000/s for 10 s); each carries its
send time (CLOCK_MONOTONIC, one clock for the whole box).

    python -m perf.scenarios.cross_shard_latency --rate 1000 --seconds 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

import uvloop
from websockets.asyncio.client import ClientConnection, connect

from perf.lib import procs
from shardchat.brokers.sequencer import owner_of


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


async def on_shard(url: str, shard: int | None, user: str) -> ClientConnection:
    for attempt in range(500):
        ws = await connect(f"{url}?user={user}{attempt}", compression=None, max_queue=None)
        welcome = json.loads(await ws.recv())
        if shard is None or welcome["shard"] == shard:
            return ws
        await ws.close()
    raise RuntimeError(f"no connection landed on shard {shard}")


async def measure(
    url: str, room: str, shards: tuple[int | None, int | None], rate: int, seconds: float
) -> dict[str, Any]:
    sender = await on_shard(url, shards[0], "sender")
    receiver = await on_shard(url, shards[1], "receiver")
    for ws in (sender, receiver):
        await ws.send(json.dumps({"type": "join", "room": room}))
    total = int(rate * seconds)
    latencies: list[float] = []
    seqs: list[int] = []

    async def receive() -> None:
        while len(latencies) < total:
            frame = json.loads(await asyncio.wait_for(receiver.recv(), 10))
            if frame["type"] == "message":
                latencies.append((time.monotonic_ns() - int(frame["content"])) / 1e6)
                seqs.append(frame["seq"])

    async def drain_sender() -> None:
        while True:
            await sender.recv()

    receiving = asyncio.create_task(receive())
    draining = asyncio.create_task(drain_sender())
    await asyncio.sleep(0.5)
    start = time.monotonic()
    for i in range(total):
        delay = start + i / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        await sender.send(
            json.dumps({"type": "message", "room": room, "content": str(time.monotonic_ns())})
        )
    try:
        await asyncio.wait_for(receiving, 30)
    finally:
        draining.cancel()
        await sender.close()
        await receiver.close()
    in_order = seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    return {
        "messages": len(latencies),
        "in_order": in_order,
        "p50_ms": round(percentile(latencies, 50), 3),
        "p99_ms": round(percentile(latencies, 99), 3),
        "max_ms": round(max(latencies), 3),
    }


async def run(rate: int, seconds: float) -> list[dict[str, Any]]:
    rows = []
    with procs.baseline() as server:
        row = await measure(f"ws://127.0.0.1:{server.port}/ws", "lat", (None, None), rate, seconds)
        rows.append({"server": server.name, "path": "one process", **row})
    settings = ["limits.rate=100000", "limits.burst=100000"]
    with procs.shardchat(3, settings=settings) as server:
        url = f"ws://127.0.0.1:{server.port}/ws"
        room = next(f"lat{i}" for i in range(1000) if owner_of(f"lat{i}", 3) == 2)
        row = await measure(url, room, (0, 1), rate, seconds)
        rows.append({"server": server.name, "path": "shard 0 -> owner 2 -> shard 1", **row})
        row = await measure(url, room, (2, 2), rate, seconds)
        rows.append({"server": server.name, "path": "all on the owner (no ring hop)", **row})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rate", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    rows = uvloop.run(run(args.rate, args.seconds))
    head = f"{'server':<30} {'path':<32} {'msgs':>6} {'order':>5}"
    print(head + f" {'p50 ms':>7} {'p99 ms':>7} {'max ms':>7}")
    for r in rows:
        print(
            f"{r['server']:<30} {r['path']:<32} {r['messages']:>6} {str(r['in_order']):>5} "
            f"{r['p50_ms']:>7} {r['p99_ms']:>7} {r['max_ms']:>7}"
        )
    print(f"wrote {procs.write_result('cross_shard_latency', {'rate': args.rate, 'rows': rows})}")


if __name__ == "__main__":
    main()
