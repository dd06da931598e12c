"""This checkout's server against another checkout's, in one run, rounds interleaved.

For a change that must not regress: fan-out (best sustained deliveries/s, its
p99, the server's CPU per delivery), rooms (p99 and server CPU), reliable
(the best rate with half the receivers acking over the best with none), and idle
memory per connection, each measured on this checkout and on the other one
(e.g. the previous main, checked out with its own ``.venv``) in alternating
rounds, so that drift of the shared machine hits both alike. The server under
test is pinned to CPU 0 and the load client (always this checkout's) to CPU 1.

    git worktree add /tmp/old-main <old commit> && make -C /tmp/old-main .venv/.installed
    python -m perf.compare --other /tmp/old-main --rounds 3 fanout rooms idle

Prints each round and the median of new/old for every figure; writes
perf/results/compare.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from perf import idle_rss, procs, run

SERVER_CPU = run.SERVER_CPU
COST_RATE = 80.0  # msg/s to 5,000 receivers: 400,000 deliveries/s, under every limit here


def _fanout(program: str, name: str) -> dict[str, float]:
    with procs.shardchat(1, settings=run.FAST, cpus=SERVER_CPU, program=program) as server:
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
    with procs.shardchat(1, settings=run.FAST, cpus=SERVER_CPU, program=program) as server:
        result = run.rooms_against(server, name, 10000, 1000, 20)
    return {
        "p99_ms": result["run"]["latency_ms"]["p99"],
        "server_cpu_cores": result["server_cpu_cores"],
        "delivered_share": result["delivered_share"],
    }


def _reliable(program: str, name: str) -> dict[str, float]:
    """perf.run reliable's ratio: best rate with half the receivers acking (every
    50 ms, as ChatClient does) over the best rate with none, 2,000 receivers."""
    with procs.shardchat(1, settings=run.FAST, cpus=SERVER_CPU, program=program) as server:
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
    with procs.shardchat(1, settings=settings, cpus=SERVER_CPU, program=program) as server:
        row = idle_rss.measure(server, 15000, 3.0)
    return {"bytes_per_connection": float(row["bytes_per_connection"])}  # type: ignore[arg-type]


SCENARIOS: dict[str, Callable[[str, str], dict[str, float]]] = {
    "fanout": _fanout,
    "rooms": _rooms,
    "reliable": _reliable,
    "idle": _idle,
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--other", required=True, help="the other checkout (with its .venv)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("scenarios", nargs="+", choices=list(SCENARIOS))
    args = parser.parse_args()
    other = str(Path(args.other).resolve() / ".venv" / "bin" / "shardchat")
    sides = {"new": procs.SHARDCHAT, "old": other}
    run.pin_self(run.CLIENT_CPU)
    rounds: dict[str, list[dict[str, dict[str, float]]]] = {s: [] for s in args.scenarios}
    for r in range(args.rounds):
        for scenario in args.scenarios:
            figures = {}
            # Alternate which side goes first, so neither always gets the warmer machine.
            order = ["new", "old"] if r % 2 == 0 else ["old", "new"]
            for side in order:
                figures[side] = SCENARIOS[scenario](sides[side], f"compare-{scenario}-{side}")
            rounds[scenario].append(figures)
            print(f"round {r + 1} {scenario}: {json.dumps(figures)}", file=sys.stderr)
    summary: dict[str, Any] = {}
    for scenario, results in rounds.items():
        for key in results[0]["new"]:
            ratios = [
                f["new"][key] / f["old"][key] for f in results if f["old"][key] not in (0, 0.0)
            ]
            summary[f"{scenario}.{key}.new_over_old"] = (
                round(statistics.median(ratios), 3) if ratios else None
            )
    out = {"other": args.other, "rounds": rounds, "median_ratios": summary}
    path = procs.write_result("compare", out)
    print(json.dumps(summary, indent=2))
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
