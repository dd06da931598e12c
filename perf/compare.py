"""The one comparison tool: this checkout's server against another checkout's, in one run.

Each named scenario is measured on this checkout and on the other one (e.g.
the previous main, checked out with its own ``.venv``) in alternating rounds,
the side that goes first alternating, so that drift of the shared machine
hits both alike. The load client is always this checkout's, pinned to CPU 1;
the server under test is pinned to CPU 0 except where the scenario says.

- ``fanout``: best sustained deliveries/s to 5,000 receivers, its p99, the
  server's CPU per delivery at a rate both sides reach;
- ``rooms``: 10,000 clients in rooms of 10 at 10,000 msg/s: p99, server CPU;
- ``reliable``: the best rate with half the receivers acking over none;
- ``idle``: memory per idle connection (15,000 on one shard);
- ``hold15k``: 15,000 held on one shard at 1,000 conn/s: ping and connect
  p99, RSS and PSS per connection;
- ``hold100k``: 100,000 held on 6 shards at 2,000 conn/s (server unpinned);
- ``pss``: PSS per idle connection (18,000) at 1, 2, 4 and 6 shards;
- ``rooms_curve``: the rooms p99 and server CPU at 2,500 to 15,000 msg/s;
- ``history``: shard memory per held history message, at 1 and 4 shards.

    git worktree add /tmp/old-main <old commit> && make -C /tmp/old-main .venv/.installed
    python -m perf.compare --other /tmp/old-main --rounds 3 fanout rooms idle

Prints each round and the median of new/old for every figure; writes
perf/results/compare.json (``--name``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from perf.lib import procs
from perf.scenarios import history_memory, hold, idle_rss, pss_shards, rooms_curve, run

SERVER_CPU = run.SERVER_CPU
COST_RATE = 80.0  # msg/s to 5,000 receivers: 400,000 deliveries/s, under every limit here


def _fanout(program: str, name: str) -> dict[str, float]:
    with procs.server(program, 1, run.FAST, SERVER_CPU) as server:
        result = run.fanout_against(server, name, 5000, [])
    best = max(
        (s for s in result["steps"] if s["latency_ms"]["p99"] <= 250 and s["delivered_share"]),
        key=lambda s: s["deliveries_per_s"],
        default=None,
    )
    # The server's CPU per delivery at a fixed offered rate that every run reaches with
    # everything delivered (the step list is the same for both sides): a cost figure
    # the load client's own limit cannot bias.
    at = {s["offered_rate"]: s for s in result["steps"]}.get(COST_RATE)
    return {
        "best_deliveries_per_s": best["deliveries_per_s"] if best else 0.0,
        "p99_ms_at_best": best["latency_ms"]["p99"] if best else float("nan"),
        f"server_us_per_delivery_at_{int(COST_RATE)}": at["server_us_per_delivery"]
        if at and at["server_us_per_delivery"] is not None
        else float("nan"),
    }


def _rooms(program: str, name: str) -> dict[str, float]:
    with procs.server(program, 1, run.FAST, SERVER_CPU) as server:
        result = run.rooms_against(server, name, 10000, 1000, 20)
    return {
        "p99_ms": result["run"]["latency_ms"]["p99"],
        "server_cpu_cores": result["server_cpu_cores"],
        "delivered_share": result["delivered_share"],
    }


def _reliable(program: str, name: str) -> dict[str, float]:
    """perf.scenarios.run reliable's ratio: best rate with half the receivers acking (every
    50 ms, as ChatClient does) over the best rate with none, 2,000 receivers."""
    with procs.server(program, 1, run.FAST, SERVER_CPU) as server:
        rates = run.SMALL_FANOUT_RATES
        none = run.fanout_against(server, f"{name}-0", 2000, [], rates)
        half = run.fanout_against(server, f"{name}-50", 2000, ["--reliable", "0.5"], rates)
    return {
        "best_none": run.best_rate(none),
        "best_half": run.best_rate(half),
        "ratio": run.best_rate(half) / max(1.0, run.best_rate(none)),
    }


def _idle(program: str, name: str) -> dict[str, float]:
    settings = ["heartbeat.interval=600", "heartbeat.idle_timeout=0"]
    with procs.server(program, 1, settings, SERVER_CPU) as server:
        row = idle_rss.measure(server, 15000, 3.0)
    return {"bytes_per_connection": float(row["bytes_per_connection"])}  # type: ignore[arg-type]


def _held(row: dict[str, Any]) -> dict[str, float]:
    return {
        "ping_rtt_p99_ms": row["ping_rtt_ms"]["p99"],
        "connect_p99_ms": row["connect_ms"]["p99"],
        "rss_per_connection": float(row["rss_per_connection"] or 0),
        "pss_per_connection": float(row["pss_per_connection"] or 0),
    }


def _hold15k(program: str, name: str) -> dict[str, float]:
    row = hold.measure(program, 1, 15000, connect_rate=1000, cpus=SERVER_CPU, rt=True)
    return _held(row)


def _hold100k(program: str, name: str) -> dict[str, float]:
    return _held(hold.measure(program, 6, 100000, connect_rate=2000, rt=True))


def _pss(program: str, name: str) -> dict[str, float]:
    out = {}
    for shards in (1, 2, 4, 6):
        row = pss_shards.measure(program, shards, 18000, 3.0)
        per = row["pss_per_connection"]
        out[f"pss_per_connection_w{shards}"] = float(per) if isinstance(per, int) else 0.0
    return out


def _rooms_curve(program: str, name: str) -> dict[str, float]:
    out = {}
    for rate in (2500, 5000, 10000, 15000):
        row = rooms_curve.one(program, 10000, rate, 15)
        out[f"p99_ms_at_{rate}"] = row["p99_ms"]
        out[f"server_cpu_cores_at_{rate}"] = row["server_cpu_cores"]
    return out


def _history(program: str, name: str) -> dict[str, float]:
    out = {}
    for workers in (1, 4):
        row = history_memory.measure(program, workers, 100, 30000, [])
        out[f"bytes_per_held_message_w{workers}"] = float(row["bytes_per_held_message"])
    return out


# The scenarios the one-process baseline can run (--baseline): one shard's worth.
WITH_BASELINE = {"fanout", "rooms", "reliable", "idle", "hold15k"}

SCENARIOS: dict[str, Callable[[str, str], dict[str, float]]] = {
    "fanout": _fanout,
    "rooms": _rooms,
    "reliable": _reliable,
    "idle": _idle,
    "hold15k": _hold15k,
    "hold100k": _hold100k,
    "pss": _pss,
    "rooms_curve": _rooms_curve,
    "history": _history,
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--other", required=True, help="the other checkout (with its .venv)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--name", default="compare", help="the result's file name")
    parser.add_argument(
        "--baseline",
        action="store_true",
        help="a third side: the single-process websockets server (one process whatever"
        " the scenario's shard count; it cannot hold 100,000 connections)",
    )
    parser.add_argument("scenarios", nargs="+", choices=list(SCENARIOS))
    args = parser.parse_args()
    other = str(Path(args.other).resolve() / ".venv" / "bin" / "shardchat")
    sides = {"new": procs.SHARDCHAT, "old": other}
    if args.baseline:
        sides["baseline"] = procs.BASELINE
    run.pin_self(run.CLIENT_CPU)
    rounds: dict[str, list[dict[str, dict[str, float]]]] = {s: [] for s in args.scenarios}
    for r in range(args.rounds):
        for scenario in args.scenarios:
            figures = {}
            # Alternate which side goes first, so neither always gets the warmer machine.
            order = list(sides) if r % 2 == 0 else list(reversed(sides))
            for side in order:
                if side == "baseline" and scenario not in WITH_BASELINE:
                    continue
                measure = SCENARIOS[scenario]
                figures[side] = procs.retried(measure, sides[side], f"compare-{scenario}-{side}")
            rounds[scenario].append(figures)
            print(f"round {r + 1} {scenario}: {json.dumps(figures)}", file=sys.stderr)
    summary: dict[str, Any] = {}
    for scenario, results in rounds.items():
        for key in results[0]["new"]:
            for against in [side for side in results[0] if side != "new"]:
                ratios = [
                    f["new"][key] / f[against][key]
                    for f in results
                    if f[against][key] not in (0, 0.0)
                ]
                summary[f"{scenario}.{key}.new_over_{against}"] = (
                    round(statistics.median(ratios), 3) if ratios else None
                )
    out = {"other": args.other, "rounds": rounds, "median_ratios": summary}
    path = procs.write_result(args.name, out)
    print(json.dumps(summary, indent=2))
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
