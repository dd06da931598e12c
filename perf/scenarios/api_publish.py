"""The server API's publish against the same publish over the WebSocket, one run.

Two figures, each measured for both paths on the same server in the same run:

- publishes per second per shard (``--workers 1``): ``--conns`` keep-alive
  connections, each sending its next publish when the previous one is
  answered (the API's 200, the WebSocket's ``ack``), for ``--seconds``. A
  WebSocket publisher is its room's one member (its ack and its copy of the
  message leave in one write); the API publishes into rooms with no member,
  so that each side reads once and writes once per publish;
- publish-to-delivery latency (``--workers 2``, the member on the other
  shard than the publisher where the kernel allows): ``--rate`` publishes a
  second for ``--seconds``, each carrying the time it was due (CLOCK_MONOTONIC;
  open loop: neither path waits for its answers; the API's go round-robin over
  ``--conns`` keep-alive connections, pipelined), to
  a member that reads them over the WebSocket; p50 and p99.

The API client here is a few lines of raw keep-alive HTTP (the request bytes
built once per call), so that the figures are the server's rather than a
client library's. ``storage.kind = "memory"``: the acks do not wait for a
disk. Loopback only, bounded in count and time.

    python -m perf.scenarios.api_publish --seconds 5 --conns 8 --rate 1000
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

KEY = "perf-api-key-0123456789"
ROUNDS = 5  # each figure's time is spread over this many alternations of the two paths
SETTINGS = ["limits.rate=1000000", "limits.burst=1000000", "storage.kind=memory"]


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


class RawApi:
    """One keep-alive connection; ``publish`` waits for its answer."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> RawApi:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    async def publish(self, room: str, content: str) -> int:
        self.send(room, content)
        return await self.answer()

    def send(self, room: str, content: str) -> None:
        """Send a publish without waiting (HTTP/1.1 pipelining: answered in order)."""
        body = json.dumps({"room": room, "content": content}).encode()
        self.writer.write(
            b"POST /api/publish HTTP/1.1\r\nHost: x\r\nX-API-Key: " + KEY.encode()
            + b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )  # fmt: skip

    async def answer(self) -> int:
        """The next answer's seq."""
        head = await self.reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        answer = json.loads(await self.reader.readexactly(length))
        assert head.startswith(b"HTTP/1.1 200"), (head, answer)
        return int(answer["result"]["seq"])

    def close(self) -> None:
        self.writer.close()


async def ws_client(port: int, user: str, room: str) -> tuple[ClientConnection, int]:
    ws = await connect(
        f"ws://127.0.0.1:{port}/ws?user={user}&room={room}", compression=None, max_queue=None
    )
    welcome = json.loads(await ws.recv())
    while json.loads(await ws.recv())["type"] != "joined":
        pass
    return ws, int(welcome["shard"])


async def throughput(port: int, conns: int, seconds: float) -> dict[str, int]:
    """Calls answered per second over ``conns`` connections, API then WebSocket."""
    apis = [await RawApi.open(port) for _ in range(conns)]
    wss = [(await ws_client(port, f"w{i}", f"t{i}"))[0] for i in range(conns)]

    async def api_loop(api: RawApi, room: str, until: float) -> int:
        n = 0
        while time.monotonic() < until:
            await api.publish(room, "x")
            n += 1
        return n

    async def ws_loop(ws: ClientConnection, room: str, until: float) -> int:
        n = 0
        while time.monotonic() < until:
            await ws.send(f'{{"type":"message","room":"{room}","content":"x"}}')
            while True:
                frame = json.loads(await ws.recv())
                if frame["type"] == "ack":
                    break
            n += 1
        return n

    # Interleaved rounds, so that a change in the shared machine's load hits both.
    done = {"api": 0, "websocket": 0}
    spent = {"api": 0.0, "websocket": 0.0}
    for _ in range(ROUNDS):
        for name in ("api", "websocket"):
            start = time.monotonic()
            until = start + seconds / ROUNDS
            if name == "api":
                counts = await asyncio.gather(
                    *(api_loop(a, f"a{i}", until) for i, a in enumerate(apis))
                )
            else:
                counts = await asyncio.gather(
                    *(ws_loop(w, f"t{i}", until) for i, w in enumerate(wss))
                )
            done[name] += sum(counts)
            spent[name] += time.monotonic() - start
    rates = {name: round(done[name] / spent[name]) for name in done}
    for api in apis:
        api.close()
    for ws in wss:
        await ws.close()
    return rates


async def latency(port: int, conns: int, rate: int, seconds: float) -> dict[str, dict[str, Any]]:
    """Publish-to-delivery at ``rate`` a second, API then WebSocket, one member."""
    member, member_shard = await ws_client(port, "member", "lat")
    # A WebSocket publisher on the other shard than the member, when the kernel
    # puts one there within a few tries; the API's connection lands where it may.
    for attempt in range(50):
        publisher, shard = await ws_client(port, f"pub{attempt}", "lat")
        if shard != member_shard:
            break
        await publisher.close()
    # A pool, as a backend keeps one: an API connection answers its requests one
    # at a time (pipelined ones wait for the answer before), so one connection
    # would cap the rate at one publish per loop turn.
    apis = [await RawApi.open(port) for _ in range(conns)]
    latencies: dict[str, list[float]] = {"api": [], "websocket": []}
    for _ in range(ROUNDS):  # interleaved, as above
        for name in ("api", "websocket"):
            latencies[name] += await _one_path(
                name, apis, publisher, member, rate, seconds / ROUNDS
            )
    rows = {
        name: {
            "messages": len(got),
            "p50_ms": round(percentile(got, 50), 3),
            "p99_ms": round(percentile(got, 99), 3),
            "max_ms": round(max(got), 3),
        }
        for name, got in latencies.items()
    }
    for api in apis:
        api.close()
    await publisher.close()
    await member.close()
    return rows


async def _one_path(
    name: str,
    apis: list[RawApi],
    publisher: ClientConnection,
    member: ClientConnection,
    rate: int,
    seconds: float,
) -> list[float]:
    """One round of one path: each publish's delivery time, in ms."""
    total = int(rate * seconds)
    got: list[float] = []

    async def receive() -> None:
        while len(got) < total:
            frame = json.loads(await asyncio.wait_for(member.recv(), 10))
            if frame["type"] == "message" and frame["content"].startswith(name):
                sent = int(frame["content"].split(":")[1])
                got.append((time.monotonic_ns() - sent) / 1e6)

    async def drain() -> None:
        # What the publisher gets back (acks, its copy; the API's answers) is read
        # as it comes: both paths publish without waiting for it (open loop).
        if name == "api":
            await asyncio.gather(*(answers(api) for api in apis))
        while True:
            await publisher.recv()

    async def answers(api: RawApi) -> None:
        while True:
            await api.answer()

    receiving = asyncio.create_task(receive())
    draining = asyncio.create_task(drain())
    start = time.monotonic()
    start_ns = int(start * 1e9)
    for i in range(total):
        delay = start + i / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        # The time it was due, not the time it went: a publish held up (the
        # loop was late) counts its wait.
        content = f"{name}:{start_ns + i * 1_000_000_000 // rate}"
        if name == "api":
            apis[i % len(apis)].send("lat", content)  # the answers are read by drain()
        else:
            await publisher.send(json.dumps({"type": "message", "room": "lat", "content": content}))
    try:
        await asyncio.wait_for(receiving, 30)
    except TimeoutError:
        raise RuntimeError(f"{name}: {len(got)} of {total} delivered") from None
    finally:
        draining.cancel()
    return got


async def run(conns: int, seconds: float, rate: int) -> dict[str, Any]:
    env_settings = [*SETTINGS, f"api.key={KEY}"]
    result: dict[str, Any] = {"conns": conns, "seconds": seconds, "rate": rate}
    with procs.shardchat(1, settings=env_settings) as server:
        result["throughput_1_shard"] = await throughput(server.port, conns, seconds)
    with procs.shardchat(2, settings=env_settings) as server:
        result["latency_2_shards"] = await latency(server.port, conns, rate, seconds)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--conns", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rate", type=int, default=1000)
    args = parser.parse_args()
    result = uvloop.run(run(args.conns, args.seconds, args.rate))
    t = result["throughput_1_shard"]
    print(f"publishes/s, 1 shard, {args.conns} keep-alive connections, call then answer:")
    ratio = t["api"] / t["websocket"]
    print(f"  api {t['api']:>8}   websocket {t['websocket']:>8}   ratio {ratio:.2f}")
    print(f"publish-to-delivery, 2 shards, {args.rate}/s for {args.seconds:g} s:")
    for name, row in result["latency_2_shards"].items():
        p50, p99, top = row["p50_ms"], row["p99_ms"], row["max_ms"]
        print(f"  {name:<10} p50 {p50:>7} ms  p99 {p99:>7} ms  max {top:>7} ms")
    print(f"wrote {procs.write_result('api_publish', result)}")


if __name__ == "__main__":
    main()
