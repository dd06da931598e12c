"""Bytes of shard memory per held history message, at 1 and 4 shards.

A member on every shard joins ``--rooms`` fresh rooms; one publisher sends
``--messages`` messages of 100 characters round-robin over them, and every
member receives all of them, so that every shard holds every room's history.
Each shard's RssAnon (``/proc/PID/status``: the heap, not the shared rings)
is read before the first publish and after the last delivery; the growth over
the messages each shard holds is the cost per held message (held: at most
``delivery.history`` per room). The JSON of one such message is printed beside
it: the target is at most about twice that.

    python -m perf.scenarios.history_memory [--workers 1 4] [--set section.key=value]

Against another checkout in the same run: ``perf.compare --other DIR history``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

from websockets.asyncio.client import ClientConnection, connect

from perf.lib import procs
from shardchat.procstat import rss_anon

CONTENT = "x" * 100


async def _on_every_shard(url: str, workers: int) -> list[ClientConnection]:
    """One connection per shard (the kernel picks the shard; extras are closed)."""
    found: dict[int, ClientConnection] = {}
    spare: list[ClientConnection] = []
    for attempt in range(500):
        ws = await connect(f"{url}?user=member{attempt}", max_size=None, max_queue=None)
        shard = json.loads(await ws.recv())["shard"]
        if shard in found:
            spare.append(ws)
        else:
            found[shard] = ws
        if len(found) == workers:
            break
    for ws in spare:
        await ws.close()
    if len(found) < workers:
        raise RuntimeError(f"placed members on {len(found)} of {workers} shards")
    return list(found.values())


async def _drain(ws: ClientConnection, count: int, deadline: float) -> int:
    got = 0
    while got < count:
        frame = json.loads(await asyncio.wait_for(ws.recv(), deadline - time.monotonic()))
        if frame["type"] == "message":
            got += 1
    return got


async def _measure(
    server: procs.Running, workers: int, rooms: int, messages: int
) -> dict[str, Any]:
    url = f"ws://127.0.0.1:{server.port}/ws"
    names = [f"held{i}" for i in range(rooms)]
    members = await _on_every_shard(url, workers)
    publisher = await connect(f"{url}?user=publisher", max_size=None, max_queue=None)
    await publisher.recv()
    for ws in [*members, publisher]:
        for room in names:
            await ws.send(json.dumps({"type": "join", "room": room}))
    for ws in [*members, publisher]:
        joined = 0
        while joined < rooms:
            if json.loads(await ws.recv())["type"] == "joined":
                joined += 1
    pids = server.server_pids()
    before = {pid: rss_anon(pid) for pid in pids}
    deadline = time.monotonic() + 300
    drains = [asyncio.create_task(_drain(ws, messages, deadline)) for ws in members]
    acks = 0
    for i in range(messages):
        room = names[i % rooms]
        await publisher.send(json.dumps({"type": "message", "room": room, "content": CONTENT}))
        if i % 200 == 199:  # bounded in flight: never rate limited, never a slow consumer
            while acks <= i - 100:
                if json.loads(await publisher.recv())["type"] == "ack":
                    acks += 1
    await asyncio.gather(*drains)
    after = {pid: rss_anon(pid) for pid in pids}
    sample = json.dumps(
        {
            "type": "message",
            "room": names[0],
            "sender": "publisher",
            "content": CONTENT,
            "seq": messages // rooms,
            "timestamp": int(time.time() * 1000),
            "id": "0-abcdef-12345",
        },
        separators=(",", ":"),
    )
    for ws in [*members, publisher]:
        await ws.close()
    held = min(messages // rooms, 1000) * rooms  # delivery.history is left at its default
    growth = [after[pid] - before[pid] for pid in pids]
    return {
        "workers": workers,
        "held_per_shard": held,
        "rss_anon_growth_per_shard": growth,
        "bytes_per_held_message": round(sum(growth) / len(growth) / held),
        "message_json_bytes": len(sample),
    }


def measure(
    program: str, workers: int, rooms: int, messages: int, extra: list[str]
) -> dict[str, Any]:
    settings = ["limits.rate=100000", "limits.burst=100000", *extra]
    with procs.shardchat(workers, settings=settings, program=program) as server:
        return asyncio.run(_measure(server, workers, rooms, messages))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rooms", type=int, default=100)
    parser.add_argument("--messages", type=int, default=30000)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 4])
    parser.add_argument(
        "--set", action="append", default=[], help="section.key=value for both servers"
    )
    args = parser.parse_args()
    programs = {"this": procs.SHARDCHAT}
    rows = []
    for workers in args.workers:
        for name, program in programs.items():
            row = {"server": name, **measure(program, workers, args.rooms, args.messages, args.set)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    procs.write_result("history_memory", rows)


if __name__ == "__main__":
    main()
