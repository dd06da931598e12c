"""Issue 14's table in one run: each row for the single-process baseline server,
the previous main and this checkout, sides interleaved.

    git worktree add /tmp/before 93224fe && make -C /tmp/before .venv/.installed
    python -m perf.issue14 --before /tmp/before [--rows rooms,hold15k,hold50k,hold100k]

Rows (the server under test pinned to CPU 0 and the load client and the ping
prober to CPU 1, except at 6 shards, where the shards and the load processes
share both cores):

- ``rooms``: 10,000 clients in rooms of 10, each 1 msg/s (10,000 msg/s in,
  100,000 deliveries/s), one shard: p99 (open-loop: a message carries the
  time it was due) and the server's CPU share of its core.
- ``hold15k``: 15,000 idle connections on one shard, opened at 1,000 conn/s:
  ping RTT p99 from perf.prober's 1,000 connections (open-loop, 0.1 ms
  resolution), connect p99 (open-loop, the prober's and the load workers'),
  RSS per connection.
- ``hold50k`` and ``hold100k``: 50,000 on 4 shards and 100,000 on 6, opened at
  2,000 conn/s: ping RTT p99 and PSS per connection (the baseline is one
  process and cannot hold them under this box's 20,000 open files per
  process: not run).

Every row is one server start per side; ``--rounds`` repeats them (sides
alternating). ``--client-nice 19`` runs the load client (not the prober, which
is SCHED_FIFO) below the server's priority, for the 6-shard row where they
share the two cores. Writes perf/results/issue14.json (``--name``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from perf import procs, run
from perf.hold_compare import hold_row
from perf.pss_shards import server_pss

HOLD_SETTINGS = [*run.FAST, "heartbeat.interval=30", "server.max_connections=1000000"]
PROBER = 1000  # the prober's connections, each pinged once a second


def _server(
    side: str, programs: dict[str, str], workers: int, settings: list[str], cpus: str | None
) -> AbstractContextManager[procs.Running]:
    # The server runs at nice 0 whatever this process (the load client) runs at.
    nice = os.nice(0)
    prefix = ["nice", "-n", str(-nice)] if nice else []
    if side == "baseline":
        return procs.baseline(cpus=cpus, prefix=prefix)
    return procs.shardchat(
        workers, settings=settings, cpus=cpus, prefix=prefix, program=programs[side]
    )


def rooms(side: str, programs: dict[str, str]) -> dict[str, Any]:
    with _server(side, programs, 1, run.FAST, run.SERVER_CPU) as server:
        args = ["rooms", "--port", str(server.port), "--target", f"rooms-{side}"]
        args += ["--clients", "10000", "--room-size", "10", "--interval-ms", "1000"]
        result = run.load([*args, "--seconds", "20", *run.target_args(server)])
    r = result["run"]
    return {
        "p50_ms": r["latency_ms"]["p50"],
        "p99_ms": r["latency_ms"]["p99"],
        "delivered_share": result["delivered_share"],
        "server_cpu_cores": result["server_cpu_cores"],
        "send_lag_p99_ms": r["send_lag_ms"]["p99"],
        "client_limited": r["client_limited"],
    }


def _hold(
    side: str,
    programs: dict[str, str],
    workers: int,
    connections: int,
    connect_rate: int,
    cpus: str | None,
) -> dict[str, Any]:
    with _server(side, programs, workers, HOLD_SETTINGS, cpus) as server:
        before = server_pss(server)
        args = ["hold", "--port", str(server.port), "--target", f"hold-{side}-w{workers}"]
        args += ["--connections", str(connections), "--seconds", "30"]
        args += ["--connect-rate", str(connect_rate), "--prober", str(PROBER)]
        args += ["--workers", str(max(1, -(-connections // 19000))), "--prober-rt"]
        if cpus is not None:
            args += ["--prober-cpu", run.CLIENT_CPU]
        result = run.load([*args, *run.target_args(server)])
        after = server_pss(server)
    return hold_row(result, before, after)


def hold15k(side: str, programs: dict[str, str]) -> dict[str, Any]:
    return _hold(side, programs, 1, 15000, 1000, run.SERVER_CPU)


def hold50k(side: str, programs: dict[str, str]) -> dict[str, Any]:
    return _hold(side, programs, 4, 50000, 2000, None)


def hold100k(side: str, programs: dict[str, str]) -> dict[str, Any]:
    return _hold(side, programs, 6, 100000, 2000, None)


ROWS: dict[str, tuple[Callable[[str, dict[str, str]], dict[str, Any]], list[str]]] = {
    "rooms": (rooms, ["baseline", "before", "after"]),
    "hold15k": (hold15k, ["baseline", "before", "after"]),
    "hold50k": (hold50k, ["before", "after"]),
    "hold100k": (hold100k, ["before", "after"]),
}


def _order(sides: list[str], round_: int) -> Iterator[str]:
    return iter(sides if round_ % 2 == 0 else list(reversed(sides)))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--before", required=True, help="the previous main (with its .venv)")
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument(
        "--client-nice",
        type=int,
        default=0,
        help="run the load client at this nice value (the prober stays SCHED_FIFO): at 6"
        " shards it shares both cores with the server, where a real one has its own box",
    )
    parser.add_argument("--name", default="issue14", help="the result's file name")
    args = parser.parse_args()
    if args.client_nice:
        os.nice(args.client_nice)
    programs = {
        "after": procs.SHARDCHAT,
        "before": str(Path(args.before).resolve() / ".venv" / "bin" / "shardchat"),
    }
    out: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for name in args.rows.split(","):
        measure, sides = ROWS[name]
        # Pinned rows: the load client on CPU 1. At 6 shards everything shares both.
        pinned = name in ("rooms", "hold15k")
        cpus = {int(run.CLIENT_CPU)} if pinned else set(range(procs.cpu_count()))
        os.sched_setaffinity(0, cpus)
        out[name] = {side: [] for side in sides}
        for r in range(args.rounds):
            for side in _order(sides, r):
                row = procs.retried(measure, side, programs)
                out[name][side].append(row)
                print(f"{name} {side} {json.dumps(row)}", file=sys.stderr)
    path = procs.write_result(args.name, {"args": vars(args), "rows": out})
    print(json.dumps(out, indent=1))
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
