"""Charts from result files: fan-out latency against offered load, hold RSS over time,
memory per connection against the number of shards, rooms p99 against offered msg/s.

    python -m perf.lib.plot                 # every perf/results/*.json it knows how to draw
    python -m perf.lib.plot FILE.json ...   # just these

Writes PNG files next to the results (perf/results/*.png).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

RESULTS = Path(__file__).resolve().parent.parent / "results"


def plot_fanout(results: list[dict[str, Any]], out: Path) -> None:
    fig, (ax_lat, ax_rate) = plt.subplots(1, 2, figsize=(12, 4.5))
    for result in results:
        steps = result["steps"]
        offered = [s["offered_rate"] * (result["receivers"] + result["senders"]) for s in steps]
        name = result["target"]
        ax_lat.plot(offered, [s["latency_ms"]["p50"] for s in steps], "o-", label=f"{name} p50")
        ax_lat.plot(offered, [s["latency_ms"]["p99"] for s in steps], "s--", label=f"{name} p99")
        ax_rate.plot(offered, [s["deliveries_per_s"] for s in steps], "o-", label=name)
        for s, x in zip(steps, offered, strict=True):
            if s["client_saturated"]:
                ax_rate.annotate("client busy", (x, s["deliveries_per_s"]), fontsize=7)
    ax_lat.set(
        xscale="log",
        yscale="log",
        xlabel="offered deliveries/s",
        ylabel="publish-to-delivery latency (ms)",
        title="fan-out latency",
    )
    ax_lat.axhline(250, color="grey", lw=0.8, ls=":")
    ax_rate.set(
        xscale="log",
        yscale="log",
        xlabel="offered deliveries/s",
        ylabel="deliveries/s achieved",
        title="fan-out throughput",
    )
    for ax in (ax_lat, ax_rate):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot_hold(result: dict[str, Any], out: Path) -> None:
    series = result["series"]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([t for t, _, _ in series], [rss / 2**20 for _, _, rss in series], "o-", ms=3)
    ax.set(
        xlabel="seconds",
        ylabel="server RSS (MiB)",
        title=f"hold: {result['up']} connections ({result['target']})",
    )
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot_pss_shards(result: dict[str, Any], out: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    for side, rows in result["rows"].items():
        label = "after (this checkout)" if side == "new" else "before (previous main)"
        ax.plot(
            [r["shards"] for r in rows],
            [r["pss_per_connection"] / 1000 for r in rows],
            "o-",
            label=label,
        )
    what = "in rooms of 10" if result.get("rooms_of_10") else "idle, no room"
    ax.axhline(5, color="grey", lw=0.8, ls=":")
    ax.set(
        xlabel="shards",
        ylabel="server PSS per connection (KB)",
        ylim=(0, None),
        title=f"memory per connection, {result['connections']} connections ({what})",
    )
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot_rooms_curve(result: dict[str, Any], out: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    for side, rows in result["rows"].items():
        label = "after (this checkout)" if side == "new" else "before (previous main)"
        ax.plot(
            [r["offered_msgs_per_s"] for r in rows], [r["p99_ms"] for r in rows], "o-", label=label
        )
    ax.axhline(15, color="grey", lw=0.8, ls=":")
    ax.set(
        yscale="log",
        xlabel="offered messages/s (x10 deliveries)",
        ylabel="publish-to-delivery p99 (ms)",
        title=f"rooms of 10, {result['clients']} clients, one shard on one core",
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("files", nargs="*", type=Path, help="result files (default: all)")
    files = parser.parse_args(argv).files or sorted(RESULTS.glob("*.json"))
    fanouts: dict[str, list[dict[str, Any]]] = {}
    for path in files:
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            continue
        if data.get("scenario") == "fanout" and data.get("steps"):
            group = (
                "reliable"
                if data["target"].startswith("reliable")
                else ("metrics" if data["target"].startswith("metrics") else "fanout")
            )
            if data["target"] == "smoke":
                group = "smoke"
            fanouts.setdefault(group, []).append(data)
        elif data.get("scenario") in ("pss_shards", "rooms_curve"):
            out = path.with_suffix(".png")
            draw = plot_pss_shards if data["scenario"] == "pss_shards" else plot_rooms_curve
            draw(data, out)
            print(f"wrote {out}")
        elif data.get("scenario") == "hold" and data.get("series"):
            out = path.with_suffix(".png")
            plot_hold(data, out)
            print(f"wrote {out}")
    for group, results in fanouts.items():
        out = RESULTS / f"{group}.png"
        plot_fanout(results, out)
        print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
