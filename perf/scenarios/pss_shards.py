"""Memory per idle connection against the number of shards.

Holds N idle connections (several client processes, each from its own source
address in 127.0.0.0/8) on shardchat with 1, 2, 4, 6 shards, and reports the
growth of the server's PSS per connection: the supervisor's and every shard's
``Pss`` from /proc/PID/smaps_rollup, so that pages the forked shards still
share (and the shared-memory segments) count once, not once per process as
RSS counts them. Against another checkout in the same run (sides interleaved
shard count by shard count): ``perf.compare --other DIR pss``.

    python -m perf.scenarios.pss_shards --connections 30000 --shards 1,2,4,6
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

from perf.lib import procs
from perf.scenarios import idle_rss

IDLE = ["heartbeat.interval=600", "heartbeat.idle_timeout=0", "server.max_connections=1000000"]


def pss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no Pss for {pid}")


def server_pss(server: procs.Running) -> int:
    # A set: the baseline is its own server process (server_pids() is [proc.pid]).
    return sum(pss_bytes(p) for p in {server.proc.pid, *server.server_pids()})


# --rooms: each connection joins a room of 10 at open ({r} is i // 10): presence.
ROOMS_PATH = "/ws?user=p{p}u{i}&room=p{p}r{r}"


def measure(
    program: str, shards: int, connections: int, settle: float, path: str = idle_rss.IDLE_PATH
) -> dict[str, object]:
    with procs.shardchat(shards, settings=IDLE, program=program) as server:
        time.sleep(settle)
        before = server_pss(server)
        rss_before = server.rss()
        up, failed, clients = idle_rss.hold(server.port, connections, path)
        time.sleep(settle)
        after = server_pss(server)
        rss_after = server.rss()
        idle_rss.release(clients)
    return {
        "shards": shards,
        "connections": up,
        "failed": failed,
        "pss_before": before,
        "pss_after": after,
        "pss_per_connection": round((after - before) / up) if up else None,
        "rss_per_connection": round((rss_after - rss_before) / up) if up else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--connections", type=int, default=30000)
    parser.add_argument("--shards", default="1,2,4,6")
    parser.add_argument("--settle", type=float, default=3.0)
    parser.add_argument(
        "--rooms", action="store_true", help="each connection joins a room of 10 at open"
    )
    args = parser.parse_args()
    gc.disable()
    sides = {"new": procs.SHARDCHAT}
    rows: dict[str, list[dict[str, object]]] = {side: [] for side in sides}
    for shards in (int(s) for s in args.shards.split(",")):
        for side in sides:
            path = ROOMS_PATH if args.rooms else idle_rss.IDLE_PATH
            row = measure(sides[side], shards, args.connections, args.settle, path)
            rows[side].append(row)
            print(f"{side} {json.dumps(row)}", file=sys.stderr)
    print(f"{'side':<5} {'shards':>6} {'conns':>7} {'PSS/conn':>9} {'RSS/conn':>9}")
    for side, side_rows in rows.items():
        for row in side_rows:
            print(
                f"{side:<5} {row['shards']:>6} {row['connections']:>7} "
                f"{row['pss_per_connection']:>9} {row['rss_per_connection']:>9}"
            )
    name = "pss_shards_rooms" if args.rooms else "pss_shards"
    out = {
        "scenario": "pss_shards",
        "connections": args.connections,
        "rooms_of_10": args.rooms,
        "rows": rows,
    }
    path = procs.write_result(name, out)
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
