"""What TLS costs: server memory per idle connection and server CPU per delivered
frame, wss:// against ws:// on the same one-shard server build, in the same run.

    python -m perf.scenarios.tls_cost --connections 2000 --receivers 100 --messages 3000

For each mode a fresh `shardchat --workers 1` (the TLS one with a certificate
made for the run, ECDSA P-256, TLS 1.3): ``--connections`` idle connections are
opened and the shard's RSS growth per connection is read; then ``--receivers``
of them join one room and a publisher sends ``--messages`` messages at
``--rate`` a second; the shard's CPU time (utime + stime) from the first publish
until every receiver has every message, divided by the deliveries, is the cost
per delivered frame. The client is the same in both modes (raw asyncio
streams, frame headers parsed), so the ratio is the figure to read; on a
shared machine the absolute numbers move with the neighbours' load.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import ssl
import tempfile
import time
from pathlib import Path
from typing import Any

from perf.lib import procs
from shardchat.procstat import cpu_seconds
from shardchat.testing.pki import make_pki
from shardchat.testing.rawws import encode_frame, frame_at, open_upgraded

FAST = [*procs.UNLIMITED, "server.max_connections=1000000"]
MESSAGE = b'{"type":"message"'


def masked_text(payload: bytes) -> bytes:
    return encode_frame(payload, mask=os.urandom(4))


class Conn:
    """A raw WebSocket connection that counts room messages."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.messages = 0
        self.buf = b""

    async def read_frames(self, until: int) -> None:
        """Read until ``until`` room messages have arrived."""
        while self.messages < until:
            chunk = await self.reader.read(65536)
            if not chunk:
                raise ConnectionError("closed")
            self.buf += chunk
            self._parse()

    def _parse(self) -> None:
        buf, at = self.buf, 0
        while (found := frame_at(buf, at, len(buf))) is not None:
            head, n = found
            if buf[at + head : at + head + len(MESSAGE)] == MESSAGE:
                self.messages += 1
            at += head + n
        self.buf = buf[at:]


async def open_conn(port: int, context: ssl.SSLContext | None, path: str) -> Conn:
    return Conn(*await open_upgraded(port, path, ssl=context))


async def measure(
    server: procs.Running, context: ssl.SSLContext | None, args: argparse.Namespace
) -> dict[str, Any]:
    (pid,) = server.server_pids()
    await asyncio.sleep(1)
    before = procs.rss_bytes(pid)
    gate = asyncio.Semaphore(100)

    async def one(i: int) -> Conn:
        async with gate:
            return await open_conn(server.port, context, f"/ws?user=u{i}")

    started = time.monotonic()
    conns = await asyncio.gather(*(one(i) for i in range(args.connections)))
    connect_s = time.monotonic() - started
    await asyncio.sleep(2)
    after = procs.rss_bytes(pid)
    receivers = conns[: args.receivers]
    join = masked_text(b'{"type":"join","room":"tlsroom"}')
    for conn in receivers:
        conn.writer.write(join)
    publisher = await open_conn(server.port, context, "/ws?user=pub&room=tlsroom")
    await asyncio.sleep(1)  # the joins are done
    reading = [asyncio.create_task(c.read_frames(args.messages)) for c in receivers]
    drain = asyncio.create_task(publisher.read_frames(args.messages))
    cpu0 = cpu_seconds(pid)
    t0 = time.monotonic()
    batch = max(1, args.rate // 100)
    content = "x" * args.size
    for i in range(0, args.messages, batch):
        for _ in range(i, min(i + batch, args.messages)):
            payload = json.dumps({"type": "message", "room": "tlsroom", "content": content})
            publisher.writer.write(masked_text(payload.encode()))
        await asyncio.sleep(batch / args.rate)
    await asyncio.wait_for(asyncio.gather(*reading, drain), 120)
    elapsed = time.monotonic() - t0
    cpu = cpu_seconds(pid) - cpu0
    deliveries = args.receivers * args.messages
    for conn in [*conns, publisher]:
        conn.writer.close()
    return {
        "mode": "wss" if context else "ws",
        "connections": len(conns),
        "connect_seconds": round(connect_s, 2),
        "rss_bytes_per_connection": round((after - before) / len(conns)),
        "deliveries": deliveries,
        "seconds": round(elapsed, 2),
        "server_cpu_seconds": round(cpu, 3),
        "server_us_per_delivery": round(cpu / deliveries * 1e6, 3),
        "server_cpu_share": round(cpu / elapsed, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=2000)
    parser.add_argument("--receivers", type=int, default=100)
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--rate", type=int, default=500, help="messages a second")
    parser.add_argument("--size", type=int, default=100, help="content bytes")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        pki = make_pki(Path(tmp))
        client = ssl.create_default_context(cafile=str(pki.ca))
        tls = [f'server.tls_cert="{pki.cert}"', f'server.tls_key="{pki.key}"']
        for settings, context in ((FAST, None), ([*FAST, *tls], client)):
            with procs.shardchat(1, settings=settings) as server:
                rows.append(asyncio.run(measure(server, context, args)))
    plain, tls_row = rows
    ratios = {
        "rss_per_connection": round(
            tls_row["rss_bytes_per_connection"] / plain["rss_bytes_per_connection"], 2
        ),
        "cpu_per_delivery": round(
            tls_row["server_us_per_delivery"] / plain["server_us_per_delivery"], 2
        ),
    }
    for row in rows:
        print(json.dumps(row))
    print(json.dumps({"wss / ws": ratios}))
    path = procs.write_result("tls_cost", {"args": vars(args), "rows": rows, "ratios": ratios})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
