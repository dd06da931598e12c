"""The load generator: hold, fanout and rooms scenarios against shardchat or the baseline.

Connections are spread over several worker processes (each well under the
20,000 open files a process may have) bound to several source addresses in
127.0.0.0/8 (one address has about 28,000 ports toward one server port).
Workers are forked before any event loop exists; each runs uvloop and raw
connections (:mod:`perf.lib.loadclient`) that parse only frame headers, except a
sample that decodes JSON for latency, order and duplicates. Latency is
open-loop: a message carries the time it was due to go, not the time it
went, so a server that queues cannot hide it by slowing the sender; each
worker reports its own send lag (how late its sends went) and its CPU share
while it sends, and a step where the load client was near a full core or
sent late is marked ``client_limited``; a fan-out step also reports the
server's CPU time per delivery, its cost whoever the limit. ``hold --prober
N``: N of the connections are perf.lib.prober's, which times its connects and
pings at 0.1 ms (the workers' uvloop timers tick in milliseconds), and the
hold's figures are its.

    python -m perf.lib.load hold   --port 8080 --connections 50000 --seconds 300 --prober 1000
    python -m perf.lib.load fanout --port 8080 --receivers 5000 --senders 10 --rates 2000,5000
    python -m perf.lib.load rooms  --port 8080 --clients 10000 --room-size 10 --interval-ms 1000

Several boxes (broker.kind = "redis"): ``--port 8080,8081 --admin URL1,URL2``;
load process i connects to port i mod the number of ports (so ``--workers``
at least the number of ports), and a room's clients are spread over them.

Each run prints a table and writes one JSON file in perf/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import multiprocessing
import os
import resource
import subprocess
import sys
import time
from collections import Counter
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import uvloop

from perf.lib import procs
from perf.lib.loadclient import LoadConn
from shardchat.client.chatclient import ACK_DELAY

RESULTS = Path(__file__).resolve().parent.parent / "results"
PER_WORKER = 12000  # connections per worker process at most
SATURATED = 0.9  # a worker using this share of a core or more may be the limit
# A client whose sends go out this late (p99, ms) is itself adding to the latency.
LAGGING_MS = 2.0
TICK = 0.001  # the senders' shortest sleep (s): batches what falls due within it


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def new_stats() -> dict[str, Any]:
    stats: dict[str, Any] = Counter()
    stats["latencies"] = []
    stats["rtts"] = []
    stats["connect_ms"] = []
    stats["send_lag_ms"] = []
    return stats


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# Worker side


class Worker:
    """One load process: its connections, and commands from the coordinator."""

    def __init__(self, index: int, args: dict[str, Any], pipe: Connection) -> None:
        self.index = index
        self.args = args
        self.pipe = pipe
        self.stats = new_stats()
        self.conns: list[LoadConn] = []
        self.senders: list[LoadConn] = []
        self.pingers: list[LoadConn] = []
        self.ackers: list[LoadConn] = []  # reliable connections that ack on the tick
        self.acking: asyncio.Task[None] | None = None
        # A fresh /16 of 127.0.0.0/8 for each run (the server's port is part of it):
        # the ports a run's closed connections leave in TIME_WAIT (60 s, some
        # 10,000 per address) must not exhaust the next run's, one after the other.
        net = 1 + args["ports"][0] % 250
        self.source = f"127.{net}.{index // 200}.{2 + index % 200}"

    async def connect(self, paths: list[tuple[str, bool, bool, bool]], rate: float) -> None:
        """Open connections (path, sampled, sender, reliable), ``rate`` per second at most."""
        loop = asyncio.get_running_loop()
        ports = self.args["ports"]
        host, port = "127.0.0.1", ports[self.index % len(ports)]
        ack_every_read = self.args["ack_ms"] <= 0
        gate = asyncio.Semaphore(200)
        start = time.monotonic()

        async def one(i: int, path: str, sampled: bool, sender: bool, reliable: bool) -> None:
            # Open-loop: a connect's time counts from when it was due, so the time
            # it waited for the client (its timers, the gate) is in the figure too,
            # and how late it began is its send lag.
            due = start + i / rate
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            async with gate:
                opened: asyncio.Future[None] = loop.create_future()
                t0 = time.monotonic()
                self.stats["send_lag_ms"].append((t0 - due) * 1000)
                try:
                    _, conn = await loop.create_connection(
                        lambda: LoadConn(
                            path, sampled, self.stats, opened, sender, reliable, ack_every_read
                        ),
                        host,
                        port,
                        local_addr=(self.source, 0),
                    )
                    await asyncio.wait_for(opened, 30)
                except (TimeoutError, OSError, ConnectionError) as exc:
                    self.stats["failed_" + type(exc).__name__] += 1
                    return
                self.stats["connect_ms"].append((time.monotonic() - due) * 1000)
                self.conns.append(conn)
                if sender:
                    self.senders.append(conn)
                if sampled:
                    self.pingers.append(conn)
                if reliable and not ack_every_read:
                    self.ackers.append(conn)

        await asyncio.gather(*(one(i, *p) for i, p in enumerate(paths)))
        # The held connections leave the collector's walk: a full collection of
        # 10,000 of them would stall the senders and show up as send lag.
        gc.collect()
        gc.freeze()
        if self.ackers and self.acking is None:
            self.acking = asyncio.create_task(self.ack_ticks())

    async def send_at(self, rate: float, seconds: float) -> int:
        """Senders publish at ``rate`` messages/s in total for ``seconds``, open-loop.

        Message k is due at ``start + k / rate`` and carries that due time, not
        the time it went: a server that queues (or a client that falls behind)
        shows in the latency instead of delaying the next send and hiding
        itself (coordinated omission). How late each message actually went is
        the client's own send lag, reported beside the latency."""
        senders = [c for c in self.senders if not c.closed]
        if not senders or rate <= 0:
            return 0
        lags = self.stats["send_lag_ms"]
        total = int(rate * seconds)
        interval_ns = 1e9 / rate
        start_ns = time.monotonic_ns()
        sent = 0
        while sent < total:
            now_ns = time.monotonic_ns()
            due = min(total, int((now_ns - start_ns) / interval_ns) + 1)
            while sent < due:
                scheduled_ns = start_ns + int(sent * interval_ns)
                conn = senders[sent % len(senders)]
                conn.send(
                    {"type": "message", "room": conn.room, "content": f"t{scheduled_ns}:{sent}"}
                )
                lags.append((now_ns - scheduled_ns) / 1e6)
                sent += 1
            if sent < total:
                # Until the next one is due, but 1 ms at least: a wake-up per message
                # at 10,000 msg/s would make the client its own limit. What waits
                # for the tick shows as send lag, and in the latency.
                next_ns = start_ns + sent * interval_ns
                await asyncio.sleep(max(TICK, (next_ns - time.monotonic_ns()) / 1e9))
        return sent

    async def ping_loop(self, seconds: float) -> None:
        """Each sampled connection sends an application ping once a second, at its own
        offset within the second (as independent clients would); pongs give the RTT,
        measured open-loop from the time each ping was due."""
        pingers = self.pingers
        if not pingers:
            return
        start_ns = time.monotonic_ns()
        interval_ns = 1e9 / len(pingers)
        total = int(seconds * len(pingers))
        # A ping's lateness is send lag too: the RTT counts from when it was due.
        lags = self.stats["send_lag_ms"]
        n = 0
        while n < total:
            now_ns = time.monotonic_ns()
            due = min(total, int((now_ns - start_ns) / interval_ns) + 1)
            while n < due:
                scheduled_ns = start_ns + int(n * interval_ns)
                pingers[n % len(pingers)].send({"type": "ping", "t": scheduled_ns})
                lags.append((now_ns - scheduled_ns) / 1e6)
                n += 1
            next_ns = start_ns + n * interval_ns
            await asyncio.sleep(max(TICK, (next_ns - time.monotonic_ns()) / 1e9))

    async def ack_ticks(self) -> None:
        """Reliable connections ack what they got at most every ``ack_ms``, as
        shardchat.client does; a tenth of them on each tick, so that the acks of
        independent clients do not all arrive at once."""
        slices = 10
        tick = self.args["ack_ms"] / 1000 / slices
        n = 0
        while True:
            await asyncio.sleep(tick)
            for conn in self.ackers[n % slices :: slices]:
                conn.ack_due()
            n += 1

    async def settle(self, quiet: float, limit: float) -> None:
        """Wait until no text frame has come for ``quiet`` seconds (``limit`` at most).

        A step counts text frames as deliveries (telling a message from a
        presence event would cost every frame a look at its payload), so the
        presence events of the connect phase must have arrived before it."""
        deadline = time.monotonic() + limit
        last = -1
        while (count := self.stats["frames"]) != last and time.monotonic() < deadline:
            last = count
            await asyncio.sleep(quiet)

    def report(self, cpu: float, wall: float) -> dict[str, Any]:
        stats = self.stats
        out = {k: v for k, v in stats.items() if not isinstance(v, list)}
        out["latencies"] = list(stats["latencies"])
        out["rtts"] = list(stats["rtts"])
        out["connect_ms"] = list(stats["connect_ms"])
        out["send_lag_ms"] = list(stats["send_lag_ms"])
        out["cpu_share"] = cpu / wall if wall > 0 else 0.0
        out["open"] = sum(1 for c in self.conns if not c.closed)
        return out

    def reset(self) -> None:
        for key in ("latencies", "rtts", "send_lag_ms"):
            self.stats[key].clear()
        for key in list(self.stats):
            if not isinstance(self.stats[key], list) and not key.startswith(("failed", "close")):
                self.stats[key] = 0

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            command, payload = await loop.run_in_executor(None, self.pipe.recv)
            if command == "connect":
                cpu0, t0 = cpu_seconds(), time.monotonic()
                await self.connect(payload["paths"], payload["rate"])
                self.pipe.send(self.report(cpu_seconds() - cpu0, time.monotonic() - t0))
            elif command == "settle":
                await self.settle(payload["quiet"], payload["limit"])
                self.pipe.send({"frames": self.stats["frames"]})
            elif command == "step":
                self.reset()
                cpu0, t0 = cpu_seconds(), time.monotonic()
                pinging = (
                    asyncio.create_task(self.ping_loop(payload["seconds"]))
                    if payload.get("ping")
                    else None
                )
                sent = await self.send_at(payload["rate"], payload["seconds"])
                if pinging is not None:
                    await pinging
                # A worker with no senders receives while the others send.
                await asyncio.sleep(max(0.0, t0 + payload["seconds"] - time.monotonic()))
                # While the senders send, the worker is busiest: its CPU share over
                # that time, not diluted by the drain, says if it was the limit.
                cpu1, t1 = cpu_seconds(), time.monotonic()
                await asyncio.sleep(payload.get("drain", 0))
                report = self.report(cpu1 - cpu0, t1 - t0)
                report["sent"] = sent
                self.pipe.send(report)
            elif command == "close":
                if self.acking is not None:
                    self.acking.cancel()
                for conn in self.conns:
                    if conn.transport is not None:
                        conn.transport.close()
                await asyncio.sleep(0.2)
                self.pipe.send("closed")
                return


def _worker_main(index: int, args: dict[str, Any], pipe: Connection) -> None:
    worker = Worker(index, args, pipe)
    uvloop.run(worker.serve())


# Coordinator side


class Load:
    """Forks the workers and speaks to them."""

    def __init__(self, port: list[int], room: str, workers: int, ack_ms: float = 0) -> None:
        ctx = multiprocessing.get_context("fork")
        self.pipes: list[Connection] = []
        self.procs = []
        for index in range(workers):
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=_worker_main,
                args=(index, {"ports": port, "room": room, "ack_ms": ack_ms}, child),
                daemon=True,
            )
            proc.start()
            self.pipes.append(parent)
            self.procs.append(proc)

    def ask(self, command: str, payloads: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for pipe, payload in zip(self.pipes, payloads, strict=True):
            pipe.send((command, payload))
        return [pipe.recv() for pipe in self.pipes]

    def settle(self) -> None:
        """Until every worker has had no frame for half a second: the connect
        phase's join events are in before a step starts counting."""
        self.ask("settle", [{"quiet": 0.5, "limit": 30.0}] * len(self.pipes))

    def close(self) -> None:
        for pipe in self.pipes:
            try:
                pipe.send(("close", None))
                pipe.recv()
            except (EOFError, OSError):
                pass
        for proc in self.procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()


def merge(reports: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = Counter()
    lists: dict[str, list[float]] = {
        "latencies": [],
        "rtts": [],
        "connect_ms": [],
        "send_lag_ms": [],
    }
    cpu = []
    for report in reports:
        for key, value in report.items():
            if key in lists:
                lists[key] += value
            elif key == "cpu_share":
                cpu.append(value)
            else:
                out[key] += value
    for key, value in lists.items():
        out[key] = value
    out["client_cpu_max"] = max(cpu) if cpu else 0.0
    out["client_saturated"] = bool(cpu) and max(cpu) >= SATURATED
    return out


def server_pids(admin: str | None, pid: int | None) -> list[int]:
    """The server's processes: shardchat's shards (from its admin URL), or one pid."""
    if admin:
        return [p for url in admin.split(",") for p in procs.shard_pids(url)]
    return [pid] if pid else []


def server_rss(admin: str | None, pid: int | None) -> int:
    return sum(procs.rss_bytes(p) for p in server_pids(admin, pid))


def split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def workers_for(connections: int, minimum: int = 1) -> int:
    return max(minimum, -(-connections // PER_WORKER))


def summary(merged: dict[str, Any]) -> dict[str, Any]:
    lat = merged["latencies"]
    rtt = merged["rtts"]
    con = merged["connect_ms"]
    lag = merged["send_lag_ms"]
    lag_p99 = percentile(lag, 99) if lag else 0.0
    failures = {k: v for k, v in merged.items() if k.startswith(("failed", "close_", "error_"))}
    return {
        "latency_ms": {
            p: round(percentile(lat, q), 3)
            for p, q in (("p50", 50), ("p90", 90), ("p99", 99), ("max", 100))
        },
        "rtt_ms": {
            p: round(percentile(rtt, q), 3) for p, q in (("p50", 50), ("p99", 99), ("max", 100))
        },
        "connect_ms": {p: round(percentile(con, q), 2) for p, q in (("p50", 50), ("p99", 99))},
        "duplicates": merged.get("duplicates", 0),
        "out_of_order_or_gap": merged.get("out_of_order_or_gap", 0),
        "dropped": merged.get("dropped", 0),
        "failures": failures,
        "send_lag_ms": {
            p: round(percentile(lag, q), 3) if lag else 0.0
            for p, q in (("p50", 50), ("p99", 99), ("max", 100))
        },
        "client_cpu_max": round(merged["client_cpu_max"], 3),
        "client_saturated": merged["client_saturated"],
        # The load client is the limit: a worker near a full core, or sends that
        # went out late (their lateness is inside the latency figures).
        "client_limited": merged["client_saturated"] or lag_p99 > LAGGING_MS,
    }


TCP_COUNTERS = (
    "ListenOverflows",
    "ListenDrops",
    "TCPReqQFullDrop",
    "TCPReqQFullDoCookies",
    "SyncookiesSent",
    "TCPSynRetrans",
)


def tcp_counters() -> dict[str, int]:
    """The kernel's TcpExt counters that tell a full accept or SYN queue and the SYN
    retransmissions it causes (/proc/net/netstat: the whole network namespace, so
    on a shared machine other programs' connections count too)."""
    lines = Path("/proc/net/netstat").read_text().splitlines()
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            table = dict(zip(names.split()[1:], values.split()[1:], strict=True))
            return {k: int(table.get(k, 0)) for k in TCP_COUNTERS}
    return {}


def _prober(a: argparse.Namespace) -> subprocess.Popen[bytes]:
    """perf.lib.prober as its own process (on ``--prober-cpu``) against the first port:
    it opens its connections alongside the workers' (at its share of the connect
    rate, so that its connect times sample the whole connect phase), then waits
    for a line on stdin to ping."""
    net = 1 + a.port[0] % 250
    cmd = [sys.executable, "-m", "perf.lib.prober", "--port", str(a.port[0]), "--wait-go"]
    cmd += ["--connections", str(a.prober), "--seconds", str(a.seconds)]
    cmd += ["--connect-rate", str(a.connect_rate * a.prober / a.connections)]
    cmd += ["--source", f"127.{net}.250.2"]  # apart from the workers' addresses
    if a.prober_cpu is not None:
        cmd += ["--cpu", str(a.prober_cpu)]
    if a.prober_rt:
        cmd += ["--rt"]
    return subprocess.Popen(
        cmd,
        cwd=Path(__file__).resolve().parent.parent.parent,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )


def _probe_result(prober: subprocess.Popen[bytes]) -> dict[str, Any]:
    assert prober.stdin is not None
    prober.stdin.write(b"go\n")
    prober.stdin.flush()
    out, _ = prober.communicate()
    if prober.returncode != 0:
        raise RuntimeError(f"perf.lib.prober exited {prober.returncode}")
    result: dict[str, Any] = json.loads(out)
    return result


def run_hold(a: argparse.Namespace) -> dict[str, Any]:
    # With the prober, it holds and pings its own connections (part of the total)
    # and the workers' connections only stay open.
    n = a.connections - a.prober
    workers = workers_for(n, a.workers)
    load = Load(a.port, "hold", workers)
    prober: subprocess.Popen[bytes] | None = None
    try:
        series: list[tuple[float, int, int]] = []
        rss_before = server_rss(a.admin, a.pid)
        tcp_before = tcp_counters()
        start = time.monotonic()
        sample = 0 if a.prober else max(1, a.sample // workers)
        payloads = []
        for count in split(n, workers):
            paths = [("/ws?user=h", i < sample, False, False) for i in range(count)]
            payloads.append({"paths": paths, "rate": a.connect_rate * n / a.connections / workers})
        if a.prober:
            prober = _prober(a)
        for pipe, payload in zip(load.pipes, payloads, strict=True):
            pipe.send(("connect", payload))
        reports = []
        pending = list(load.pipes)
        while pending:
            for pipe in list(pending):
                if pipe.poll(1.0):
                    reports.append(pipe.recv())
                    pending.remove(pipe)
            elapsed = time.monotonic() - start
            rss = server_rss(a.admin, a.pid)
            series.append((round(elapsed, 1), -1, rss))
            print(
                f"\r  connecting... {elapsed:6.1f} s  server RSS {rss / 2**20:8.1f} MiB",
                end="",
                file=sys.stderr,
            )
        connected = merge(reports)
        tcp_after = tcp_counters()
        up = sum(r["open"] for r in reports)
        print(f"\n  {up} connections up in {time.monotonic() - start:.1f} s", file=sys.stderr)
        rss_up = server_rss(a.admin, a.pid)
        probe = None
        if prober is not None:
            probe = _probe_result(prober)
            up += probe["connect"]["up"]
            hold = merge([])
        else:
            hold = merge(
                load.ask(
                    "step", [{"rate": 0, "seconds": a.seconds, "ping": True, "drain": 0}] * workers
                )
            )
        rss_after = server_rss(a.admin, a.pid)
        series.append((round(time.monotonic() - start, 1), up, rss_after))
        open_after = sum(r["open"] for r in load.ask("step", [{"rate": 0, "seconds": 0}] * workers))
    finally:
        if prober is not None and prober.poll() is None:
            prober.kill()
            prober.wait()
        load.close()
    result = {
        "scenario": "hold",
        "target": a.target,
        "connections": n,
        "up": up,
        "open_after_hold": open_after,
        "hold_seconds": a.seconds,
        "rss_before": rss_before,
        "rss_connected": rss_up,
        "rss_after": rss_after,
        "rss_per_connection": round((rss_after - rss_before) / up) if up else None,
        "connect": {
            **summary(connected),
            "tcp": {k: tcp_after[k] - tcp_before.get(k, 0) for k in tcp_after},
        },
        "hold": summary(hold),
        "series": series,
    }
    if probe is not None:
        # The hold's ping figures are the prober's (its RTTs resolve 0.1 ms).
        result["probe"] = probe
        for key in ("rtt_ms", "send_lag_ms", "client_limited"):
            result["hold"][key] = probe[key]
        result["open_after_hold"] += probe["connect"]["up"] - probe["closed_by_server"]
        # The connect figures too: its connects are timed at 0.1 ms, the
        # workers' (their share of the same connect phase) on uvloop's 1 ms timers.
        result["connect"]["workers"] = {
            k: result["connect"][k] for k in ("connect_ms", "send_lag_ms")
        }
        for key in ("connect_ms", "send_lag_ms"):
            result["connect"][key] = probe["connect"][key]
    return result


def run_fanout(a: argparse.Namespace) -> dict[str, Any]:
    receivers, senders = a.receivers, a.senders
    workers = workers_for(receivers + senders, a.workers)
    load = Load(a.port, a.room, workers, a.ack_ms)
    steps = []
    try:
        payloads = []
        shares = split(receivers, workers)
        sender_shares = split(senders, workers)
        for w in range(workers):
            paths = []
            for i in range(shares[w]):
                sampled = i < max(1, a.sample // workers)
                # Spread reliable receivers evenly: receiver i acks when i * share
                # crosses an integer.
                reliable = int((i + 1) * a.reliable) > int(i * a.reliable)
                paths.append((f"/ws?user=r{w}x{i}&room={a.room}", sampled, False, reliable))
            for i in range(sender_shares[w]):
                paths.append((f"/ws?user=s{w}x{i}&room={a.room}", False, True, False))
            payloads.append({"paths": paths, "rate": a.connect_rate / workers})
        connected = merge(load.ask("connect", payloads))
        load.settle()
        members = receivers + senders
        for rate in a.rates:
            server_cpu0 = server_cpu(a)
            reports = load.ask(
                "step",
                [
                    {"rate": rate * s / senders, "seconds": a.seconds, "drain": a.drain}
                    for s in sender_shares
                ],
            )
            server_cpu_s = server_cpu(a) - server_cpu0
            merged = merge(reports)
            sent = merged["sent"]
            expected = sent * members
            delivered = merged["frames"] - merged["acks"]
            row = {
                "offered_rate": rate,
                "sent": sent,
                "acked": merged["acks"],
                "expected_deliveries": expected,
                "delivered": delivered,
                "deliveries_per_s": round(delivered / a.seconds),
                "delivered_share": round(delivered / expected, 4) if expected else None,
                "lost": max(0, expected - delivered),
                # The server's own cost, whoever was the limit: CPU over the step
                # (drain included) per delivery.
                "server_cpu_s": round(server_cpu_s, 3),
                "server_us_per_delivery": (
                    round(server_cpu_s / delivered * 1e6, 4) if delivered else None
                ),
                **summary(merged),
            }
            steps.append(row)
            p99 = row["latency_ms"]["p99"]
            print(
                f"  rate {rate:>8}/s  deliveries {row['deliveries_per_s']:>9}/s  "
                f"p50 {row['latency_ms']['p50']:>8} p99 {p99:>8} ms  "
                f"share {row['delivered_share']}  client cpu {row['client_cpu_max']:.2f}  "
                f"send lag p99 {row['send_lag_ms']['p99']} ms"
                + ("  CLIENT IS THE LIMIT" if row["client_limited"] else ""),
                file=sys.stderr,
            )
            if p99 > a.p99_bound or (row["delivered_share"] or 0) < 0.99:
                break
    finally:
        load.close()
    return {
        "scenario": "fanout",
        "target": a.target,
        "receivers": receivers,
        "senders": senders,
        "connect": summary(connected),
        "steps": steps,
    }


def run_rooms(a: argparse.Namespace) -> dict[str, Any]:
    n, size = a.clients, a.room_size
    workers = workers_for(n, a.workers)
    load = Load(a.port, "rooms", workers)
    rooms = [f"room{i}" for i in range(-(-n // size))]
    try:
        payloads = []
        index = 0
        for w, count in enumerate(split(n, workers)):
            paths = []
            for i in range(count):
                # Several boxes: worker w talks to box w mod boxes, so a room's
                # clients are interleaved over the workers to span the boxes.
                position = index if len(a.port) == 1 else i * workers + w
                room = rooms[min(len(rooms) - 1, position // size)]
                sampled = i < max(1, a.sample // workers)
                paths.append((f"/ws?user=c{index}&room={room}", sampled, True, False))
                index += 1
            payloads.append({"paths": paths, "rate": a.connect_rate / workers})
        connected = merge(load.ask("connect", payloads))
        load.settle()
        # Each worker's clients are its senders; each sends once per interval.
        counts = split(n, workers)
        rate_per_client = 1000 / a.interval_ms
        cpu_before = server_cpu(a)
        t0 = time.monotonic()
        reports = load.ask(
            "step",
            [{"rate": rate_per_client * c, "seconds": a.seconds, "drain": a.drain} for c in counts],
        )
        server_cpu_share = (server_cpu(a) - cpu_before) / (time.monotonic() - t0)
        merged = merge(reports)
    finally:
        load.close()
    sent = merged["sent"]
    delivered = merged["frames"] - merged["acks"]
    expected = sent * size
    return {
        "scenario": "rooms",
        "target": a.target,
        "clients": n,
        "room_size": size,
        "interval_ms": a.interval_ms,
        "sent": sent,
        "expected_deliveries": expected,
        "delivered": delivered,
        "delivered_share": round(delivered / expected, 4) if expected else None,
        "deliveries_per_s": round(delivered / a.seconds),
        "server_cpu_cores": round(server_cpu_share, 3),
        "connect": summary(connected),
        "run": summary(merged),
    }


def server_cpu(a: argparse.Namespace) -> float:
    """CPU seconds used so far by the server's processes."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for p in server_pids(a.admin, a.pid):
        fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / ticks
    return total


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("scenario", choices=["hold", "fanout", "rooms"])
    p.add_argument(
        "--port",
        type=lambda s: [int(x) for x in s.split(",")],
        required=True,
        help="the server's port; several boxes: a comma-separated list",
    )
    p.add_argument("--admin", help="shardchat's admin URL, to read the shards' pids")
    p.add_argument("--pid", type=int, help="the server's pid (the baseline)")
    p.add_argument("--target", default="shardchat", help="a name for the report")
    p.add_argument("--workers", type=int, default=1, help="load processes, at least")
    p.add_argument("--connect-rate", type=float, default=2000, help="new connections/s")
    p.add_argument("--sample", type=int, default=20, help="connections that decode JSON")
    p.add_argument("--seconds", type=float, default=5, help="length of a step or of the hold")
    p.add_argument("--drain", type=float, default=2, help="seconds to wait after sending")
    p.add_argument("--connections", type=int, default=1000)
    p.add_argument(
        "--prober",
        type=int,
        default=0,
        help="hold: this many of the connections ping from perf.lib.prober (0: the workers ping)",
    )
    p.add_argument("--prober-cpu", type=int, help="hold: pin the prober to this CPU")
    p.add_argument("--prober-rt", action="store_true", help="hold: the prober at SCHED_FIFO")
    p.add_argument("--receivers", type=int, default=1000)
    p.add_argument("--senders", type=int, default=10)
    p.add_argument("--room", default="fan")
    p.add_argument("--rates", type=lambda s: [float(x) for x in s.split(",")], default=[100, 1000])
    p.add_argument("--p99-bound", type=float, default=250.0, help="ms; stop stepping past it")
    p.add_argument("--reliable", type=float, default=0.0, help="share of receivers that ack")
    p.add_argument(
        "--ack-ms",
        type=float,
        default=ACK_DELAY * 1000,
        help="reliable receivers ack at most this often, as shardchat.client; 0: every read",
    )
    p.add_argument("--clients", type=int, default=1000)
    p.add_argument("--room-size", type=int, default=10)
    p.add_argument("--interval-ms", type=float, default=1000)
    p.add_argument(
        "--output", help="the JSON result file (default perf/results/SCENARIO-TARGET.json)"
    )
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    a = parser().parse_args(argv)
    runner = {"hold": run_hold, "fanout": run_fanout, "rooms": run_rooms}[a.scenario]
    result = runner(a)
    RESULTS.mkdir(exist_ok=True)
    out = Path(a.output) if a.output else RESULTS / f"{a.scenario}-{a.target}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("series", "steps")}, indent=2))
    for step in result.get("steps", []):
        print(json.dumps(step))
    print(f"wrote {out}", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
