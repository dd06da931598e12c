"""Overload: offered publish rate stepped from half to 5x what the server delivers.

    python -m perf.scenarios.overload                 # 2 shards held to 0.3 core, ~40 s
    python -m perf.scenarios.overload --share 0 --step-seconds 1

One server (``--workers 2``), one room owned by shard 0; ``--sinks``
members spread over both shards read everything (they only count bytes), two
probes (one per shard) decode every message, and ``--publishers`` publishers
on shard 1 (the non-owner: every publish is a forward) send on a fixed
timetable.

1. **Capacity**, measured first in the same run: a closed loop (each publisher
   keeps ``--window`` publishes unanswered) for ``--step-seconds``; the acked
   rate is what the server delivers.
2. **Steps**: open loop at ``--steps`` times that rate, each for
   ``--step-seconds``: message ``i`` is due at ``t0 + i / rate``, and its
   latency is counted from that time (a late sender makes it worse, never
   better). Per step: offered, accepted (acked) and refused (``overloaded``)
   rates, the latency p50/p99/max of the accepted messages at the probes, and
   the acked messages a probe never received (must be 0).
3. The same steps again with every ``overload.*`` bound out of reach (the
   server as it was before admission control), unless ``--no-unbounded``.

The load client is one Python process: it says when it is the limit (its CPU
time over 90% of the step, or its sender more than 50 ms behind the
timetable at p99). The machine may be shared: keep runs short, read the
same-run ratios, not the absolute figures. Writes
``perf/results/overload.json`` and ``overload.png``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from perf.lib import procs
from shardchat.testing.rawws import encode_frame, frame_at, take_head, upgrade_request
from shardchat.testing.rooms import room_owned_by

__all__ = ["main"]

UNBOUNDED = [
    "overload.forwards=1000000000",
    "overload.backlog=1000000000000",
    "overload.turn_bytes=1000000000000",
    "overload.pipeline=1000000000",
]
CLIENT_BUSY = 0.9  # the client's CPU share of a step past which it is the limit
SENDER_LATE_MS = 50.0  # the sender's p99 lateness past which it is the limit
_ACK = b'{"type":"ack"'
_ERROR = b'{"type":"error"'
_MESSAGE = b'{"type":"message"'


def percentile(values: list[float], p: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


@dataclass
class Tally:
    """What one step (or the capacity run) saw."""

    due: dict[str, float] = field(default_factory=dict)  # message id -> due time
    acked: set[str] = field(default_factory=set)
    refused: int = 0
    other_errors: int = 0
    received: list[set[str]] = field(default_factory=lambda: [set(), set()])  # per probe
    latency_ms: list[float] = field(default_factory=list)
    late_ms: list[float] = field(default_factory=list)  # the sender's lateness
    answered: int = 0


class Conn(asyncio.Protocol):
    """A raw WebSocket client: ``sink`` counts bytes, ``probe`` decodes messages,
    ``pub`` reads its answers (acks, errors) and passes over messages."""

    def __init__(self, path: str, role: str, bench: Bench, probe: int = 0) -> None:
        self.path = path
        self.role = role
        self.bench = bench
        self.probe = probe
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.welcome: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.upgraded = False
        self.bytes = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(upgrade_request(self.path))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.welcome.done():
            self.welcome.set_exception(ConnectionError("closed before the welcome"))

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        if self.role == "sink" and self.welcome.done():
            self.bytes += len(data)  # nothing parsed: the sinks must cost the client little
            return
        buf = self.buf
        buf += data
        if not self.upgraded:
            if take_head(buf) is None:
                return
            self.upgraded = True
        pos, end = 0, len(buf)
        bench = self.bench
        while (frame := frame_at(buf, pos, end)) is not None:
            head, n = frame
            start = pos + head
            pos = start + n
            if buf.startswith(_MESSAGE, start):
                if self.role == "probe":
                    bench.on_message(self.probe, orjson.loads(buf[start:pos]))
                continue
            if not self.welcome.done():
                self.welcome.set_result(orjson.loads(buf[start:pos]))
                continue
            if self.role == "pub" and (
                buf.startswith(_ACK, start) or buf.startswith(_ERROR, start)
            ):
                bench.on_answer(orjson.loads(buf[start:pos]))
        del buf[:pos]


class Bench:
    """The connections and the tally of the step under way."""

    def __init__(self, port: int, room: str) -> None:
        self.port = port
        self.room = room
        self.tally = Tally()
        self.pubs: list[Conn] = []
        self.conns: list[Conn] = []
        self.window_refill: asyncio.Queue[int] | None = None

    async def connect(self, role: str, shard: int | None, user: str, probe: int = 0) -> Conn:
        loop = asyncio.get_running_loop()
        for attempt in range(400):
            path = f"/ws?user={user}{attempt}&room={self.room}"
            _, conn = await loop.create_connection(
                lambda p=path: Conn(p, role, self, probe),  # type: ignore[misc]
                "127.0.0.1",
                self.port,
            )
            welcome = await asyncio.wait_for(conn.welcome, 10)
            if shard is None or welcome["shard"] == shard:
                self.conns.append(conn)
                return conn
            assert conn.transport is not None
            conn.transport.close()
        raise RuntimeError(f"no connection landed on shard {shard}")

    def on_message(self, probe: int, msg: dict[str, Any]) -> None:
        tally = self.tally
        msg_id = msg["content"]
        due = tally.due.get(msg_id)
        if due is None:
            return  # a message of an earlier step
        tally.received[probe].add(msg_id)
        tally.latency_ms.append((time.monotonic() - due) * 1000)

    def on_answer(self, frame: dict[str, Any]) -> None:
        tally = self.tally
        tally.answered += 1
        if frame["type"] == "ack":
            tally.acked.add(frame["id"])
        elif frame["code"] == "overloaded":
            tally.refused += 1
        else:
            tally.other_errors += 1
        if self.window_refill is not None:
            self.window_refill.put_nowait(1)

    def frame(self, msg_id: str) -> bytes:
        body = {"type": "message", "room": self.room, "content": msg_id, "id": msg_id}
        return encode_frame(orjson.dumps(body))

    # Runs

    async def closed_loop(self, window: int, seconds: float, tag: str) -> float:
        """Acked publishes per second with ``window`` unanswered per publisher."""
        self.tally = tally = Tally()
        refill: asyncio.Queue[int] = asyncio.Queue()
        self.window_refill = refill
        sent = 0
        started = time.monotonic()
        stop = started + seconds

        def send_one(i: int) -> None:
            msg_id = f"{tag}{i}"
            tally.due[msg_id] = time.monotonic()
            self.pubs[i % len(self.pubs)].write(self.frame(msg_id))

        for _ in range(window * len(self.pubs)):
            send_one(sent)
            sent += 1
        while time.monotonic() < stop:
            try:
                await asyncio.wait_for(refill.get(), max(0.001, stop - time.monotonic()))
            except TimeoutError:
                break
            send_one(sent)
            sent += 1
        elapsed = time.monotonic() - started
        self.window_refill = None
        await self.settle(tally, sent)
        return len(tally.acked) / elapsed

    async def open_loop(self, rate: float, seconds: float, tag: str) -> dict[str, Any]:
        """Publishes due at ``t0 + i / rate``, sent when due (batched per wake-up)."""
        self.tally = tally = Tally()
        count = int(rate * seconds)
        pubs = self.pubs
        cpu0 = time.process_time()
        t0 = time.monotonic() + 0.05
        i = 0
        while i < count:
            now = time.monotonic()
            batches: list[list[bytes]] = [[] for _ in pubs]
            while i < count and t0 + i / rate <= now:
                due = t0 + i / rate
                msg_id = f"{tag}{i}"
                tally.due[msg_id] = due
                tally.late_ms.append((now - due) * 1000)
                batches[i % len(pubs)].append(self.frame(msg_id))
                i += 1
            for conn, batch in zip(pubs, batches, strict=True):
                if batch:
                    conn.write(b"".join(batch))
            if i < count:
                await asyncio.sleep(max(0.0, t0 + i / rate - time.monotonic()))
        elapsed = time.monotonic() - t0
        busy = (time.process_time() - cpu0) / elapsed
        await self.settle(tally, count)
        lost = [len(tally.acked - got) for got in tally.received]
        late_p99 = percentile(tally.late_ms, 99)
        return {
            "offered_per_s": round(count / elapsed, 1),
            "accepted_per_s": round(len(tally.acked) / elapsed, 1),
            "refused_per_s": round(tally.refused / elapsed, 1),
            "sent": count,
            "acked": len(tally.acked),
            "refused": tally.refused,
            "other_errors": tally.other_errors,
            "unanswered": count - tally.answered,
            "acked_lost": lost,  # per probe (owner's shard, publishers' shard): must be 0
            "latency_ms": {
                "p50": round(percentile(tally.latency_ms, 50), 2),
                "p99": round(percentile(tally.latency_ms, 99), 2),
                "max": round(max(tally.latency_ms, default=0.0), 2),
            },
            "sender_late_p99_ms": round(late_p99, 2),
            "client_cpu": round(busy, 3),
            "client_limit": busy > CLIENT_BUSY or late_p99 > SENDER_LATE_MS,
        }

    async def settle(self, tally: Tally, count: int, timeout: float = 60) -> None:
        """Wait until every publish is answered and both probes hold every acked one."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if tally.answered >= count and all(tally.acked <= got for got in tally.received):
                return
            await asyncio.sleep(0.05)


async def measure(
    port: int, args: argparse.Namespace, capacity: float | None
) -> tuple[float, list[dict[str, Any]]]:
    room = room_owned_by(0, args.workers, "over")
    bench = Bench(port, room)
    try:
        await bench.connect("probe", 0, "probe-owner", probe=0)
        await bench.connect("probe", 1, "probe-pub", probe=1)
        for i in range(args.sinks):
            await bench.connect("sink", None, f"sink{i}-")
        for i in range(args.publishers):
            bench.pubs.append(await bench.connect("pub", 1, f"pub{i}-"))
        if capacity is None:
            capacity = await bench.closed_loop(args.window, args.step_seconds, "c")
            print(f"capacity: {capacity:,.0f} msg/s (closed loop, window {args.window})")
        steps = []
        for k, factor in enumerate(args.steps):
            step = await bench.open_loop(capacity * factor, args.step_seconds, f"s{k}-")
            step["factor"] = factor
            steps.append(step)
            lat = step["latency_ms"]
            print(
                f"  x{factor:<4} offered {step['offered_per_s']:>8,.0f}/s"
                f" accepted {step['accepted_per_s']:>8,.0f}/s"
                f" refused {step['refused_per_s']:>8,.0f}/s"
                f"  p50 {lat['p50']:>8.1f} ms p99 {lat['p99']:>8.1f} ms"
                f"  lost {step['acked_lost']} client cpu {step['client_cpu']:.2f}"
                + ("  (load client is the limit)" if step["client_limit"] else "")
            )
        return capacity, steps
    finally:
        for conn in bench.conns:
            if conn.transport is not None:
                conn.transport.close()


def run_server(args: argparse.Namespace, settings: list[str], capacity: float | None) -> Any:
    base = ["limits.rate=1000000", "limits.burst=1000000", *settings]
    with (
        procs.cpu_quota(args.share or None) as prefix,
        procs.shardchat(args.workers, base, prefix=prefix) as server,
    ):
        return asyncio.run(measure(server.port, args, capacity))


def plot(result: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_lat, ax_rate) = plt.subplots(1, 2, figsize=(12, 4.5))
    capacity = result["capacity_per_s"]
    for name, style in (("bounded", "o-"), ("unbounded", "s--")):
        steps = result.get(name)
        if not steps:
            continue
        x = [s["offered_per_s"] / capacity for s in steps]
        ax_lat.plot(x, [s["latency_ms"]["p99"] for s in steps], style, label=f"{name}: p99")
        ax_rate.plot(x, [s["accepted_per_s"] for s in steps], style, label=f"{name}: accepted")
        if name == "bounded":
            ax_rate.plot(x, [s["refused_per_s"] for s in steps], "^:", label="bounded: refused")
        for s, xi in zip(steps, x, strict=True):
            if s["client_limit"]:
                ax_lat.annotate("client busy", (xi, s["latency_ms"]["p99"]), fontsize=7)
    ax_lat.set(
        yscale="log",
        xlabel="offered rate / capacity",
        ylabel="latency of accepted messages, p99 (ms)",
        title="p99 from the due time (open loop)",
    )
    ax_rate.set(xlabel="offered rate / capacity", ylabel="msg/s", title="accepted and refused")
    for ax in (ax_lat, ax_rate):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(
        f"overload, {result['workers']} shards, capacity {capacity:,.0f} msg/s"
        f" (server CPU share {result['share'] or 'unlimited'})"
    )
    fig.tight_layout()
    fig.savefig(out, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--share", type=float, default=0.3, help="server CPU, cores; 0 = all")
    parser.add_argument("--sinks", type=int, default=20)
    parser.add_argument("--publishers", type=int, default=4)
    parser.add_argument(
        "--window", type=int, default=60, help="per publisher; 4 x 60 < overload.forwards"
    )
    parser.add_argument("--step-seconds", type=float, default=2.0)
    parser.add_argument(
        "--steps", type=lambda s: [float(x) for x in s.split(",")], default=[0.5, 1, 1.5, 2, 3, 5]
    )
    parser.add_argument("--no-unbounded", action="store_true")
    parser.add_argument("--set", action="append", default=[], help="a server setting, k=v")
    parser.add_argument("--name", default="overload")
    args = parser.parse_args()
    started = time.time()
    capacity, bounded = run_server(args, args.set, None)
    unbounded: list[dict[str, Any]] = []
    if not args.no_unbounded:
        print("the same steps, every overload bound out of reach:")
        _, unbounded = run_server(args, UNBOUNDED, capacity)
    result = {
        "workers": args.workers,
        "share": args.share,
        "sinks": args.sinks,
        "publishers": args.publishers,
        "step_seconds": args.step_seconds,
        "settings": args.set,
        "capacity_per_s": round(capacity, 1),
        "bounded": bounded,
        "unbounded": unbounded,
        "seconds": round(time.time() - started, 1),
        "load_avg": os.getloadavg(),
    }
    path = procs.write_result(args.name, result)
    plot(result, path.with_suffix(".png"))
    print(json.dumps({"result": str(path), "seconds": result["seconds"]}))


if __name__ == "__main__":
    main()
