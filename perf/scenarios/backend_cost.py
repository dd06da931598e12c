"""What the application's backend in the loop costs, in one run, on one shard.

    python -m perf.scenarios.backend_cost --seconds 4 --publishers 20 --window 4 --events 20000

1. **Publish proxy**: ``--publishers`` raw WebSocket clients, each in a room of
   its own, publish in a closed loop with ``--window`` messages in flight for
   ``--seconds``; the acked rate and the publish-to-ack latency (p50, p99) with
   ``proxy.publish_url`` off and on, against a local backend that answers at
   once (perf/lib/fast_backend.py, its own process).
2. **Webhooks on the publish path**: ``--events`` messages are published as
   fast as the clients go with ``webhooks.events = ["message"]``; the events
   per second the receiver got (from the first publish until it has them
   all), and the shard's CPU per message against the same publishes with
   webhooks off.
3. **The webhook sender alone** (one core, as in a shard): ``--events`` events
   queued at once, signed and POSTed in batches of 1, 10 and 100; events per
   second until the receiver took them all, and CPU per event.

The machine may be shared: read the ratios of the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.request
from typing import Any

from perf.lib import procs
from shardchat.procstat import cpu_seconds
from shardchat.testing.rawws import OP_TEXT, encode_frame, open_upgraded, parse_frames

FAST = [*procs.UNLIMITED, "storage.kind=memory"]
SECRET = "whsec_" + base64.b64encode(b"b" * 32).decode()


def masked_text(payload: bytes) -> bytes:
    return encode_frame(payload, mask=os.urandom(4))


class Publisher:
    """A raw WebSocket client in a room of its own: sends, and times each ack."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, room: str
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.room = room
        self.buf = b""
        self.sent: dict[str, float] = {}
        self.latencies: list[float] = []
        self.acked = 0
        self.errors = 0
        self.next = 0

    @classmethod
    async def open(cls, port: int, room: str) -> Publisher:
        reader, writer = await open_upgraded(port, f"/ws?user={room}&room={room}")
        self = cls(reader, writer, room)
        while not any(f.get("type") == "joined" for f in await self.frames()):
            pass
        return self

    def send(self) -> None:
        self.next += 1
        ident = str(self.next)
        self.sent[ident] = time.perf_counter()
        payload = {"type": "message", "room": self.room, "content": "hello there", "id": ident}
        self.writer.write(masked_text(json.dumps(payload).encode()))

    async def frames(self) -> list[dict[str, Any]]:
        chunk = await self.reader.read(65536)
        if not chunk:
            raise ConnectionError("closed")
        self.buf += chunk
        frames, used = parse_frames(self.buf)
        self.buf = self.buf[used:]
        return [
            json.loads(payload)
            for opcode, payload in frames
            if opcode == OP_TEXT and payload[:17] != b'{"type":"message"'
        ]

    async def run(self, window: int, until: float, count: int | None = None) -> None:
        for _ in range(window):
            self.send()
        while self.sent:
            for frame in await self.frames():
                kind = frame.get("type")
                if kind not in ("ack", "error"):
                    continue
                started = self.sent.pop(frame.get("id", ""), None)
                if started is None:
                    continue
                if kind == "ack":
                    self.acked += 1
                    self.latencies.append(time.perf_counter() - started)
                else:
                    self.errors += 1
                more = time.monotonic() < until if count is None else self.next < count
                if more:
                    self.send()


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000 if ordered else 0.0


async def publish_round(
    server: procs.Running, publishers: int, window: int, seconds: float
) -> dict[str, Any]:
    pid = server.server_pids()[0]
    clients = [await Publisher.open(server.port, f"bench{i}") for i in range(publishers)]
    cpu_before = cpu_seconds(pid)
    start = time.monotonic()
    await asyncio.gather(*(c.run(window, start + seconds) for c in clients))
    took = time.monotonic() - start
    cpu = cpu_seconds(pid) - cpu_before
    acked = sum(c.acked for c in clients)
    latencies = [x for c in clients for x in c.latencies]
    for c in clients:
        c.writer.close()
    return {
        "rate": round(acked / took),
        "shard_cpu_us_per_message": round(cpu / max(1, acked) * 1e6, 1),
        "p50_ms": round(pct(latencies, 0.50), 3),
        "p99_ms": round(pct(latencies, 0.99), 3),
        "errors": sum(c.errors for c in clients),
    }


def backend_count(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/count", timeout=5) as response:
        return int(response.read())


async def events_round(
    server: procs.Running, backend_port: int | None, publishers: int, window: int, events: int
) -> dict[str, Any]:
    pid = server.server_pids()[0]
    clients = [await Publisher.open(server.port, f"ev{i}") for i in range(publishers)]
    before_events = backend_count(backend_port) if backend_port else 0
    cpu_before = cpu_seconds(pid)
    start = time.monotonic()
    each = events // publishers
    await asyncio.gather(*(c.run(window, 0.0, each) for c in clients))
    acked = time.monotonic() - start
    got = 0
    if backend_port:
        while got < each * publishers and time.monotonic() - start < 60:
            got = backend_count(backend_port) - before_events
            await asyncio.sleep(0.005)
    took = time.monotonic() - start
    cpu = cpu_seconds(pid) - cpu_before
    for c in clients:
        c.writer.close()
    total = each * publishers
    return {
        "messages": total,
        "acked_s": round(acked, 3),
        "events_received": got,
        "events_per_s": round(got / took) if backend_port else None,
        "shard_cpu_us_per_message": round(cpu / total * 1e6, 1),
    }


async def sender_round(backend_port: int, events: int, batch: int) -> dict[str, Any]:
    """The webhook sender alone, in this process (one core, as in a shard): ``events``
    emitted at once, signed, batched and POSTed to the local backend."""
    from shardchat.backend.webhooks import WebhookSender
    from shardchat.core.config import WebhooksConfig
    from shardchat.stats import BLOCK_SLOTS, Slot

    config = WebhooksConfig(
        url=f"http://127.0.0.1:{backend_port}/webhooks",
        secret=SECRET,
        events=("join",),
        queue=events + 1,
        batch=batch,
    )
    counters = [0] * BLOCK_SLOTS
    sender = WebhookSender(config, 0, "bench:1", counters)
    sender.start()
    cpu_before = time.process_time()
    start = time.monotonic()
    for i in range(events):
        sender.emit("join", f"user{i % 1000}", "lobby", {"conn": i})
    while counters[Slot.WEBHOOK_EVENTS_SENT] < events:
        await asyncio.sleep(0.002)
    took = time.monotonic() - start
    cpu = time.process_time() - cpu_before
    await sender.close()
    return {
        "events": events,
        "batch": batch,
        "events_per_s": round(events / took),
        "cpu_us_per_event": round(cpu / events * 1e6, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--publishers", type=int, default=20)
    parser.add_argument("--window", type=int, default=4)
    parser.add_argument("--events", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=2, help="off/on alternations")
    args = parser.parse_args()
    backend_port = procs.free_port()
    backend = subprocess.Popen(
        [sys.executable, "-m", "perf.lib.fast_backend", "--port", str(backend_port)], cwd=procs.ROOT
    )
    results: dict[str, Any] = {"args": vars(args), "publish": [], "webhooks": []}
    try:
        procs.wait_port(backend_port)
        proxy = [f"proxy.publish_url=http://127.0.0.1:{backend_port}/publish"]
        for _ in range(args.rounds):
            for name, extra in (("off", []), ("on", proxy)):
                with procs.shardchat(1, [*FAST, *extra]) as server:
                    row = asyncio.run(
                        publish_round(server, args.publishers, args.window, args.seconds)
                    )
                row["proxy"] = name
                print("publish proxy", row, flush=True)
                results["publish"].append(row)
        hooks = [
            f"webhooks.url=http://127.0.0.1:{backend_port}/webhooks",
            f"webhooks.secret={SECRET}",
            'webhooks.events=["message"]',
            "webhooks.queue=1000000",
        ]
        for _ in range(args.rounds):
            for name, extra in (("off", []), ("on", hooks)):
                with procs.shardchat(1, [*FAST, *extra]) as server:
                    row = asyncio.run(
                        events_round(
                            server,
                            backend_port if extra else None,
                            args.publishers,
                            args.window,
                            args.events,
                        )
                    )
                row["webhooks"] = name
                print("webhooks", row, flush=True)
                results["webhooks"].append(row)
        for batch in (1, 10, 100):
            row = asyncio.run(sender_round(backend_port, args.events, batch))
            print("sender alone", row, flush=True)
            results.setdefault("sender", []).append(row)
    finally:
        backend.terminate()
        backend.wait()
    for key, column in (("publish", "proxy"), ("webhooks", "webhooks")):
        rows = results[key]
        for mode in ("off", "on"):
            picked = [r for r in rows if r[column] == mode]
            if key == "publish":
                results[f"publish_{mode}_median_rate"] = statistics.median(
                    r["rate"] for r in picked
                )
    print(procs.write_result("backend_cost", results))


if __name__ == "__main__":
    main()
