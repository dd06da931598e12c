"""Hold N connections on W shards: ping RTT p99 and PSS per connection, two checkouts.

The load client (this checkout's perf.load, several processes and source
addresses) connects at ``--connect-rate`` (open-loop: a connect's time counts
from when it was due), then perf.prober opens ``--sample`` more and pings
from them for ``--seconds`` (open-loop, each ping sent at its exact due
time); the server's PSS (the
supervisor and every shard, /proc/PID/smaps_rollup) is read before and after.
Sides alternate round by round.

    python -m perf.hold_compare --other /tmp/old-main --connections 100000 --workers 6
    python -m perf.hold_compare --other /tmp/old-main --connections 15000 --workers 1 --cpus 0

Writes perf/results/hold_compare-wN.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from perf import procs, run
from perf.pss_shards import server_pss


def one(program: str, a: argparse.Namespace) -> dict[str, Any]:
    settings = [*run.FAST, "heartbeat.interval=30", "server.max_connections=1000000"]
    with procs.shardchat(a.workers, settings=settings, cpus=a.cpus, program=program) as server:
        before = server_pss(server)
        result = run.hold_against(
            server,
            f"hold-compare-w{a.workers}",
            a.connections,
            a.seconds,
            connect_rate=a.connect_rate,
            prober=a.sample,
            workers=max(1, -(-a.connections // 19000)),
            **({"prober_cpu": run.CLIENT_CPU} if a.cpus else {}),
            **({"prober_rt": True} if a.rt else {}),
        )
        after = server_pss(server)
    return hold_row(result, before, after)


def hold_row(result: dict[str, Any], pss_before: int, pss_after: int) -> dict[str, Any]:
    """A hold's figures (``perf.load hold --prober``), with the server's memory
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
    parser.add_argument("--other", required=True)
    parser.add_argument("--connections", type=int, default=100000)
    parser.add_argument("--workers", type=int, default=6, help="shards")
    parser.add_argument("--cpus", help="pin the server (e.g. 0); the load client goes to 1")
    parser.add_argument("--connect-rate", type=float, default=2000)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument(
        "--sample", type=int, default=1000, help="connections that ping (perf.prober's)"
    )
    parser.add_argument(
        "--rt", action="store_true", help="the prober at SCHED_FIFO (root; a shared machine)"
    )
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    if args.cpus:
        run.pin_self(run.CLIENT_CPU)
    sides = {"new": procs.SHARDCHAT}
    sides["old"] = str(Path(args.other).resolve() / ".venv" / "bin" / "shardchat")
    rows: dict[str, list[dict[str, Any]]] = {"new": [], "old": []}
    for r in range(args.rounds):
        for side in ["new", "old"] if r % 2 == 0 else ["old", "new"]:
            row = procs.retried(one, sides[side], args)
            rows[side].append(row)
            print(f"{side} {json.dumps(row)}", file=sys.stderr)
    out = {"scenario": "hold_compare", "args": vars(args), "rows": rows}
    print(json.dumps(rows, indent=1))
    print(f"wrote {procs.write_result(f'hold_compare-w{args.workers}', out)}", file=sys.stderr)


if __name__ == "__main__":
    main()
