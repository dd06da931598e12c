"""Hold N connections on W shards: ping RTT p99, connect p99 and PSS per connection.

The load client (perf.lib.load, several processes and source addresses)
connects at ``--connect-rate`` (open-loop: a connect's time counts from when
it was due), then perf.lib.prober opens ``--sample`` more and pings from them
for ``--seconds`` (open-loop, each ping sent at its exact due time); the
server's PSS (the supervisor and every shard, /proc/PID/smaps_rollup) is read
before and after. Against another checkout in the same run: ``perf.compare
--other DIR hold15k hold100k``.

    python -m perf.scenarios.hold --connections 100000 --workers 6
    python -m perf.scenarios.hold --connections 15000 --workers 1 --cpus 0

Writes perf/results/hold-wN.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from perf.lib import procs
from perf.scenarios import run
from perf.scenarios.pss_shards import server_pss

SETTINGS = [*run.FAST, "heartbeat.interval=30", "server.max_connections=1000000"]


def measure(
    program: str,
    workers: int,
    connections: int,
    *,
    connect_rate: float = 2000,
    seconds: float = 30,
    sample: int = 1000,
    cpus: str | None = None,
    rt: bool = False,
) -> dict[str, Any]:
    """One hold on ``program``'s server (another checkout's ``shardchat``, or the baseline)."""
    with procs.server(program, workers, SETTINGS, cpus) as server:
        before = server_pss(server)
        result = run.hold_against(
            server,
            f"hold-w{workers}",
            connections,
            seconds,
            connect_rate=connect_rate,
            prober=sample,
            workers=max(1, -(-connections // 19000)),
            **({"prober_cpu": run.CLIENT_CPU} if cpus else {}),
            **({"prober_rt": True} if rt else {}),
        )
        after = server_pss(server)
    return hold_row(result, before, after)


def hold_row(result: dict[str, Any], pss_before: int, pss_after: int) -> dict[str, Any]:
    """A hold's figures (``perf.lib.load hold --prober``), with the server's memory
    growth per connection from ``pss_before`` to ``pss_after``."""
    up = result["up"]
    return {
        "up": up,
        "open_after_hold": result["open_after_hold"],
        "connect_ms": result["connect"]["connect_ms"],
        "connect_send_lag_ms": result["connect"]["send_lag_ms"],
        "connect_tcp": result["connect"]["tcp"],
        "ping_rtt_ms": result["hold"]["rtt_ms"],
        # Open-loop: an RTT counts from when the ping was due, so how late the
        # prober sent it is inside the RTT.
        "ping_send_lag_ms": result["hold"]["send_lag_ms"],
        "prober_limited": result["hold"]["client_limited"],
        "slowest_pings": result["probe"]["worst"][:5],
        "pss_per_connection": round((pss_after - pss_before) / up) if up else None,
        "rss_per_connection": result["rss_per_connection"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--connections", type=int, default=100000)
    parser.add_argument("--workers", type=int, default=6, help="shards")
    parser.add_argument("--cpus", help="pin the server (e.g. 0); the load client goes to 1")
    parser.add_argument("--connect-rate", type=float, default=2000)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument(
        "--sample", type=int, default=1000, help="connections that ping (perf.lib.prober's)"
    )
    parser.add_argument(
        "--rt", action="store_true", help="the prober at SCHED_FIFO (root; a shared machine)"
    )
    args = parser.parse_args()
    if args.cpus:
        run.pin_self(run.CLIENT_CPU)
    row = procs.retried(
        lambda: measure(
            procs.SHARDCHAT,
            args.workers,
            args.connections,
            connect_rate=args.connect_rate,
            seconds=args.seconds,
            sample=args.sample,
            cpus=args.cpus,
            rt=args.rt,
        )
    )
    out = {"scenario": "hold", "args": vars(args), "row": row}
    print(json.dumps(row, indent=1))
    print(f"wrote {procs.write_result(f'hold-w{args.workers}', out)}", file=sys.stderr)


if __name__ == "__main__":
    main()
