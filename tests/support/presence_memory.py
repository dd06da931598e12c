"""Python heap per connection in rooms, against the number of engines (tracemalloc).

A box of engines in one process (tests/core/box.py: real engines and
shared-memory brokers over bytearrays, no sockets), N connections in rooms of
10, each room with members on every shard (connection i on shard i %
workers, in room i // 10): the workload where presence kept by every shard
grew with the shards. Reports the heap growth per connection, overall and by
file, at each number of engines. Each count runs in its own process.

    python -m tests.support.presence_memory --workers 1 2 4 6 --connections 3000

Built on the engine tests' box, so it lives with them (perf/ imports nothing of
tests/).

Measures the tree it is run from: to compare two trees, run it from each, one
after the other (and say that the machine was shared, if it was).
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent


def measure(workers: int, connections: int) -> dict[str, object]:
    import tests.core.box as boxmod

    boxmod.RING = 1 << 22  # every announcement of the run fits the rings
    box = boxmod.Box(workers)
    gc.collect()
    tracemalloc.start(1)
    before = tracemalloc.take_snapshot()
    clients = [
        box.connect(i % workers, f"p1u{i}", query=f"room=p1r{i // 10}") for i in range(connections)
    ]
    for client in clients:
        client.frames = []  # what a test client kept is not the server's
    gc.collect()
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    stats = after.compare_to(before, "filename")
    total = sum(s.size_diff for s in stats)
    by_file = {
        s.traceback[0].filename.replace(str(ROOT) + "/", ""): round(s.size_diff / connections)
        for s in stats
        if abs(s.size_diff) >= connections  # at least 1 B per connection
    }
    return {
        "workers": workers,
        "connections": connections,
        "per_connection": round(total / connections),
        "by_file": by_file,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 6])
    parser.add_argument("--connections", type=int, default=3000)
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.workers[0], args.connections)))
        return
    results = []
    for workers in args.workers:
        out = subprocess.run(
            [sys.executable, "-m", "tests.support.presence_memory", "--one",
             "--workers", str(workers), "--connections", str(args.connections)],
            cwd=ROOT, check=True, capture_output=True, text=True,
        ).stdout  # fmt: skip
        results.append(json.loads(out))
    base = results[0]["per_connection"]
    for r in results:
        files = ", ".join(f"{f} {b}" for f, b in sorted(r["by_file"].items(), key=lambda x: -x[1]))
        print(
            f"{r['workers']} engines: {r['per_connection']} B/conn (+{r['per_connection'] - base})"
        )
        print(f"    {files}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
