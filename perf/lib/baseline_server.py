"""The baseline: the plain single-process websockets server a Python developer would write.

uvloop, ``websockets.asyncio.server.serve``, one coroutine per connection and
``websockets.broadcast`` for fan-out; it speaks the same protocol subset the
benchmarks use (welcome, join, message with ack, ping/pong). Every benchmark
runs it in the same run as shardchat and reports ratios against it.

    python -m perf.lib.baseline_server --port 8765
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections import defaultdict
from urllib.parse import parse_qsl, urlsplit

import uvloop
from websockets.asyncio.server import ServerConnection, broadcast, serve
from websockets.exceptions import ConnectionClosed

rooms: defaultdict[str, set[ServerConnection]] = defaultdict(set)
seqs: defaultdict[str, int] = defaultdict(int)


async def handler(ws: ServerConnection) -> None:
    assert ws.request is not None
    params = parse_qsl(urlsplit(ws.request.path).query)
    user = next((v for k, v in params if k == "user"), "guest")
    joined: set[str] = set()
    await ws.send(
        json.dumps({"type": "welcome", "user": user, "shard": 0, "heartbeat": 30, "protocol": 1})
    )
    for key, room in params:
        if key == "room":
            rooms[room].add(ws)
            joined.add(room)
            await ws.send(json.dumps({"type": "joined", "room": room, "seq": seqs[room]}))
    try:
        async for raw in ws:
            msg = json.loads(raw)
            kind = msg.get("type")
            room = msg.get("room", "")
            if kind == "join":
                rooms[room].add(ws)
                joined.add(room)
                await ws.send(json.dumps({"type": "joined", "room": room, "seq": seqs[room]}))
            elif kind == "message" and room in joined:
                seqs[room] += 1
                seq = seqs[room]
                await ws.send(
                    json.dumps({"type": "ack", "room": room, "seq": seq, "id": msg.get("id")})
                )
                out = {
                    "type": "message",
                    "room": room,
                    "sender": user,
                    "content": msg.get("content", ""),
                    "seq": seq,
                    "timestamp": time.time_ns() // 1_000_000,
                }
                broadcast(rooms[room], json.dumps(out))
            elif kind == "ping":
                msg["type"] = "pong"
                await ws.send(json.dumps(msg))
    except ConnectionClosed:
        pass  # a client that leaves mid-send is not an error of the server
    finally:
        for room in joined:
            rooms[room].discard(ws)


async def main(host: str, port: int) -> None:
    async with serve(handler, host, port, compression=None, backlog=4096, ping_interval=30):
        await asyncio.get_running_loop().create_future()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    args = parser.parse_args()
    uvloop.run(main(args.host, args.port))
