"""Two boxes through one Redis against one box with the same number of shards.

    python -m perf.scenarios.boxes --receivers 5000 --rates 20,50,100 --clients 10000

Same run, same machine: starts a redis-server (AOF on, appendfsync everysec,
in a temporary directory), then for each configuration

- ``one box``: ``shardchat start --workers 2`` (``broker.kind = "shm"``);
- ``two boxes``: two ``shardchat start --workers 1`` (``broker.kind = "redis"``),

runs :mod:`perf.lib.load`'s fan-out (``--receivers`` in one room, split over the
boxes, senders too) and rooms scenarios against it, and reads Redis's CPU
time (``/proc``) and the boxes' broker counters (``/status``: round trips,
publishes per pipeline). Writes ``perf/results/boxes.json`` and prints a
table. Not a test: the machine is shared, so compare the ratios, not the
absolute numbers.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from perf.lib import load
from perf.lib.procs import free_port
from shardchat.procstat import cpu_seconds

ROOT = Path(__file__).resolve().parent.parent.parent
SHARDCHAT = str(Path(sys.executable).with_name("shardchat"))


def status(admin: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/status", timeout=5) as response:
        data: dict[str, Any] = json.loads(response.read())
        return data


class Box:
    def __init__(self, workers: int, settings: list[str]) -> None:
        self.port, self.admin = free_port(), free_port()
        args = [SHARDCHAT, "start", "--workers", str(workers), "--port", str(self.port)]
        # Rooms live in Redis: no room store (two boxes on one machine would share
        # the working directory's data/ and the second would refuse to start).
        base = [f"server.admin_port={self.admin}", "log.level=warning", "storage.kind=memory"]
        for setting in [*base, *settings]:
            args += ["--set", setting]
        self.proc = subprocess.Popen(args, cwd=tempfile.gettempdir())
        deadline = time.monotonic() + 30
        while True:
            try:
                shards = status(self.admin)["shards"]
                if len(shards) == workers and all(s["alive"] for s in shards):
                    # Alive is not listening yet (a Redis box connects first).
                    with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                        break
            except OSError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("the box did not start")
            time.sleep(0.1)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def run_config(
    name: str, boxes: list[Box], redis_pid: int | None, a: argparse.Namespace
) -> dict[str, Any]:
    ports = ",".join(str(b.port) for b in boxes)
    admins = ",".join(f"http://127.0.0.1:{b.admin}" for b in boxes)
    workers = max(2, len(boxes))
    out: dict[str, Any] = {"config": name}
    common = ["--port", ports, "--admin", admins, "--workers", str(workers), "--target", name]
    scenarios = [
        (
            "fanout",
            ["--receivers", str(a.receivers), "--senders", "10", "--rates", a.rates,
             "--seconds", str(a.seconds), "--p99-bound", "1000"],
        ),
        (
            "rooms",
            ["--clients", str(a.clients), "--room-size", "10", "--interval-ms", "1000",
             "--seconds", str(a.seconds)],
        ),
    ]  # fmt: skip
    for scenario, extra in [(s, e) for s, e in scenarios if s in a.scenarios]:
        before = {b.admin: status(b.admin)["broker"] for b in boxes}
        redis_before = cpu_seconds(redis_pid) if redis_pid else 0.0
        result = load.main(
            [
                scenario,
                *common,
                *extra,
                "--output",
                str(load.RESULTS / f"boxes-{scenario}-{name}.json"),
            ]
        )
        redis_cpu = (cpu_seconds(redis_pid) - redis_before) if redis_pid else 0.0
        after = {b.admin: status(b.admin)["broker"] for b in boxes}
        sent = (
            sum(step["sent"] for step in result["steps"])
            if scenario == "fanout"
            else result["sent"]
        )
        broker: dict[str, Any] = {"redis_cpu_s": round(redis_cpu, 3)}
        if redis_pid:
            trips = sum(after[k]["round_trips"] - before[k]["round_trips"] for k in after)
            received = sum(
                after[k]["messages_received"] - before[k]["messages_received"] for k in after
            )
            broker.update(
                redis_round_trips=trips,
                redis_us_per_message=round(redis_cpu / sent * 1e6, 2) if sent else None,
                messages_per_round_trip=round(sent / trips, 2) if trips else None,
                messages_received_from_redis=received,
                batch_size_since_start=[after[k]["batch_size"] for k in after],
            )
        out[scenario] = {"result": result, "broker": broker}
    return out


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--receivers", type=int, default=5000)
    p.add_argument("--rates", default="20,50,100")
    p.add_argument("--clients", type=int, default=10000)
    p.add_argument("--seconds", type=float, default=5)
    p.add_argument("--scenarios", default="fanout,rooms", type=lambda s: s.split(","))
    p.add_argument(
        "--box-workers",
        type=int,
        default=0,
        help="only two Redis boxes of this many shards each (who talks to Redis: per shard)",
    )
    p.add_argument("--output", default="boxes.json")
    a = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="shardchat-boxes-"))
    redis_port = free_port()
    redis = subprocess.Popen(
        ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--dir", str(tmp),
         "--appendonly", "yes", "--appendfsync", "everysec", "--save", ""],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    results = []
    try:
        time.sleep(0.5)
        limits = ["limits.rate=1000", "limits.burst=1000", "server.max_connections=200000"]
        if not a.box_workers:
            one = [Box(2, limits)]
            try:
                results.append(run_config("one-box-w2", one, None, a))
            finally:
                for box in one:
                    box.stop()
        settings = [*limits, "broker.kind=redis", f"redis.url=redis://127.0.0.1:{redis_port}/0"]
        per_box = a.box_workers or 1
        two = [Box(per_box, settings), Box(per_box, settings)]
        try:
            results.append(run_config(f"two-boxes-w{per_box}-redis", two, redis.pid, a))
        finally:
            for box in two:
                box.stop()
    finally:
        redis.terminate()
        redis.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    load.RESULTS.mkdir(exist_ok=True)
    (load.RESULTS / a.output).write_text(json.dumps(results, indent=2) + "\n")
    for r in results:
        if "rooms" in r:
            print(f"{r['config']:>20} broker rooms {r['rooms']['broker']}")
        if "fanout" not in r or "rooms" not in r:
            continue
        for step in r["fanout"]["result"]["steps"]:
            print(
                f"{r['config']:>20} fanout rate {step['offered_rate']:>6}/s deliveries"
                f" {step['deliveries_per_s']:>9}/s p99 {step['latency_ms']['p99']:>8} ms"
                f" share {step['delivered_share']}"
            )
        rooms = r["rooms"]["result"]
        print(
            f"{r['config']:>20} rooms deliveries {rooms['deliveries_per_s']}/s share"
            f" {rooms['delivered_share']} p99 {rooms['run']['latency_ms']['p99']} ms"
            f" server cpu {rooms['server_cpu_cores']} cores"
        )
        print(
            f"{r['config']:>20} broker fanout {r['fanout']['broker']} rooms {r['rooms']['broker']}"
        )


if __name__ == "__main__":
    main()
