"""Rooms p99 against the offered message rate.

10,000 clients in rooms of 10 (each message goes to the room's 10 members),
each client publishing every ``clients / rate`` seconds, open-loop; the
server pinned to CPU 0, the load client to CPU 1. Against another checkout
in the same run (sides interleaved rate by rate): ``perf.compare --other DIR
rooms_curve``.

    python -m perf.scenarios.rooms_curve --rates 2500,5000,10000,15000

Writes perf/results/rooms_curve.json (``python -m perf.lib.plot`` draws it).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from perf.lib import procs
from perf.scenarios import run


def one(program: str, clients: int, rate: float, seconds: float) -> dict[str, Any]:
    with procs.shardchat(1, settings=run.FAST, cpus=run.SERVER_CPU, program=program) as server:
        result = run.rooms_against(server, "rooms-curve", clients, 1000 * clients / rate, seconds)
    return {
        "offered_msgs_per_s": rate,
        "p50_ms": result["run"]["latency_ms"]["p50"],
        "p99_ms": result["run"]["latency_ms"]["p99"],
        "server_cpu_cores": result["server_cpu_cores"],
        "delivered_share": result["delivered_share"],
        "send_lag_p99_ms": result["run"]["send_lag_ms"]["p99"],
        "client_limited": result["run"]["client_limited"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=10000)
    parser.add_argument("--rates", default="2500,5000,10000,15000")
    parser.add_argument("--seconds", type=float, default=15)
    args = parser.parse_args()
    sides = {"new": procs.SHARDCHAT}
    run.pin_self(run.CLIENT_CPU)
    rows: dict[str, list[dict[str, Any]]] = {side: [] for side in sides}
    for rate in (float(r) for r in args.rates.split(",")):
        for side in sides:
            row = one(sides[side], args.clients, rate, args.seconds)
            rows[side].append(row)
            print(f"{side} {row}", file=sys.stderr)
    print(f"{'side':<5} {'msg/s':>7} {'p50 ms':>8} {'p99 ms':>8} {'CPU':>6} {'share':>6}")
    for side, side_rows in rows.items():
        for row in side_rows:
            print(
                f"{side:<5} {row['offered_msgs_per_s']:>7.0f} {row['p50_ms']:>8.2f} "
                f"{row['p99_ms']:>8.2f} {row['server_cpu_cores']:>6.3f} "
                f"{row['delivered_share']:>6.3f}"
            )
    out = {"scenario": "rooms_curve", "clients": args.clients, "rows": rows}
    print(f"wrote {procs.write_result('rooms_curve', out)}", file=sys.stderr)


if __name__ == "__main__":
    main()
