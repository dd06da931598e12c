"""The benchmark runner: start the servers, run a named scenario set, stop, clean up.

    python -m perf.scenarios.run smoke     # every scenario, tiny (a minute)
    python -m perf.scenarios.run fanout    # --workers 1 vs the baseline, pinned; --workers 2
    python -m perf.scenarios.run quota     # the same fan-out, each server held to a CPU share
    python -m perf.scenarios.run rooms     # 10,000 clients in rooms of 10, pinned
    python -m perf.scenarios.run hold      # 50,000 connections, --workers 4, 5 minutes
    python -m perf.scenarios.run reliable  # fan-out with 50% of receivers acking vs 0%
    python -m perf.scenarios.run metrics   # fan-out with /metrics scraped vs no admin port
    python -m perf.scenarios.run all

Pinning (``taskset``): the server under test on CPU 0, the load client on
CPU 1, so that each comparison is core against core. Results go to
perf/results/*.json; ``python -m perf.lib.plot`` draws them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import urllib.request
from collections.abc import Callable
from typing import Any

from perf.lib import procs
from perf.lib.load import main as load_main

PY = sys.executable
SERVER_CPU, CLIENT_CPU = "0", "1"
FAST = ["limits.rate=1000000", "limits.burst=1000000", "heartbeat.idle_timeout=0"]
FANOUT_RATES = "5,10,20,40,80,160,240,320,480,640,960,1280"
# 2,000 receivers: the steps go on until p99 passes the bound, so that a ratio of
# two runs compares their limits, not the top of the step list.
SMALL_FANOUT_RATES = "40,80,120,160,320,640,960,1280,1440,1600,1760,1920,2240,2560,3840"


def pin_self(cpu: str) -> None:
    """The load client (this process and the workers it forks) on one core."""
    if hasattr(os, "sched_setaffinity") and os.cpu_count() and os.cpu_count() > 1:  # type: ignore[operator]
        os.sched_setaffinity(0, {int(cpu)})


def load(args: list[str]) -> dict[str, Any]:
    return load_main(args)


def target_args(server: procs.Running) -> list[str]:
    """How perf.lib.load finds the server's processes: shardchat's admin, or the pid."""
    if server.admin_port:
        return ["--admin", f"http://127.0.0.1:{server.admin_port}"]
    return ["--pid", str(server.server_pids()[0])]


def fanout_against(
    server: procs.Running, name: str, receivers: int, extra: list[str], rates: str = FANOUT_RATES
) -> dict[str, Any]:
    args = ["fanout", "--port", str(server.port), "--target", name, "--receivers", str(receivers)]
    args += ["--senders", "10", "--rates", rates, "--seconds", "5", "--drain", "2"]
    return load(args + target_args(server) + extra)


def rooms_against(
    server: procs.Running, name: str, clients: int, interval_ms: float, seconds: float
) -> dict[str, Any]:
    """The rooms scenario (rooms of 10) against a running shardchat."""
    args = ["rooms", "--port", str(server.port), "--target", name, "--clients", str(clients)]
    args += ["--room-size", "10", "--interval-ms", str(interval_ms), "--seconds", str(seconds)]
    return load([*args, "--admin", f"http://127.0.0.1:{server.admin_port}"])


def hold_against(
    server: procs.Running, name: str, connections: int, seconds: float, **extra: object
) -> dict[str, Any]:
    """The hold scenario against a running shardchat; ``extra``: more options
    (``connect_rate=2500`` is ``--connect-rate 2500``, ``prober_rt=True`` is
    ``--prober-rt``)."""
    args = ["hold", "--port", str(server.port), "--target", name]
    args += ["--admin", f"http://127.0.0.1:{server.admin_port}"]
    args += ["--connections", str(connections), "--seconds", str(seconds)]
    for key, value in extra.items():
        flag = "--" + key.replace("_", "-")
        args += [flag] if value is True else [flag, str(value)]
    return load(args)


def best_rate(result: dict[str, Any], bound: float = 250.0) -> float:
    """Deliveries/s of the best step with p99 under the bound and nothing lost."""
    ok = [
        s["deliveries_per_s"]
        for s in result["steps"]
        if s["latency_ms"]["p99"] <= bound and (s["delivered_share"] or 0) >= 0.99
    ]
    return max(ok, default=0.0)


def run_fanout(receivers: int = 5000) -> dict[str, Any]:
    pin_self(CLIENT_CPU)
    with procs.baseline(cpus=SERVER_CPU) as server:
        base = fanout_against(server, "baseline", receivers, [])
    with procs.shardchat(1, settings=FAST, cpus=SERVER_CPU) as server:
        one = fanout_against(server, "shardchat-w1-pinned", receivers, [])
    os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
    with procs.shardchat(2, settings=FAST) as server:
        two = fanout_against(server, "shardchat-w2", receivers, [])
    summary = {
        "baseline_best": best_rate(base),
        "shardchat_w1_best": best_rate(one),
        "shardchat_w2_best": best_rate(two),
    }
    summary["ratio_w1_vs_baseline"] = round(
        summary["shardchat_w1_best"] / max(1, summary["baseline_best"]), 2
    )
    procs.write_result("fanout-summary", summary)
    return summary


QUOTA_SHARES = (0.25, 0.5)


def run_fanout_quota(receivers: int = 5000) -> dict[str, Any]:
    """Fan-out with the server held to a share of its core by a CFS quota, so that
    the one-core load client is not the limit: deliveries/s per core share."""
    pin_self(CLIENT_CPU)
    summary: dict[str, Any] = {}
    for share in QUOTA_SHARES:
        pct = int(share * 100)
        with procs.cpu_quota(share) as prefix, procs.baseline(SERVER_CPU, prefix) as server:
            base = fanout_against(server, f"baseline-quota{pct}", receivers, [])
        with (
            procs.cpu_quota(share) as prefix,
            procs.shardchat(1, settings=FAST, cpus=SERVER_CPU, prefix=prefix) as server,
        ):
            one = fanout_against(server, f"shardchat-w1-quota{pct}", receivers, [])
        for name, result in (("baseline", base), ("shardchat_w1", one)):
            best = best_rate(result)
            summary[f"{name}_quota{pct}_best"] = best
            summary[f"{name}_quota{pct}_per_core"] = round(best / share)
            summary[f"{name}_quota{pct}_client_limited"] = any(
                s["client_limited"] for s in result["steps"]
            )
        summary[f"ratio_quota{pct}"] = round(
            summary[f"shardchat_w1_quota{pct}_best"] / max(1, summary[f"baseline_quota{pct}_best"]),
            2,
        )
    procs.write_result("fanout-quota-summary", summary)
    return summary


def run_rooms(clients: int = 10000) -> dict[str, Any]:
    pin_self(CLIENT_CPU)
    out = {}
    common = [
        "--clients",
        str(clients),
        "--room-size",
        "10",
        "--interval-ms",
        "1000",
        "--seconds",
        "20",
    ]
    with procs.baseline(cpus=SERVER_CPU) as server:
        out["baseline"] = load(
            [
                "rooms",
                "--port",
                str(server.port),
                "--pid",
                str(server.proc.pid),
                "--target",
                "baseline",
                *common,
            ]
        )
    with procs.shardchat(1, settings=FAST, cpus=SERVER_CPU) as server:
        out["shardchat"] = load(
            [
                "rooms",
                "--port",
                str(server.port),
                "--target",
                "shardchat-w1-pinned",
                "--admin",
                f"http://127.0.0.1:{server.admin_port}",
                *common,
            ]
        )
    return out


def run_hold(connections: int = 50000, seconds: float = 300) -> dict[str, Any]:
    settings = [*FAST, "heartbeat.interval=30"]
    with procs.shardchat(4, settings=settings) as server:
        return hold_against(
            server, "shardchat-w4", connections, seconds, connect_rate=2500, prober=200, workers=5
        )


def cost_ratio(base: dict[str, Any], other: dict[str, Any], name: str) -> dict[str, Any]:
    """The server's deliveries per CPU second in ``other`` against ``base``, at the
    highest offered rate both ran with everything delivered and neither load
    client saturated: a throughput ratio that the load client cannot bias."""
    steps = {s["offered_rate"]: s for s in base["steps"] if _clean(s)}
    common = [
        (rate, steps[rate], s)
        for s in other["steps"]
        if _clean(s) and (rate := s["offered_rate"]) in steps
    ]
    if not common:
        return {f"{name}_ratio": None}
    rate, b, o = max(common, key=lambda c: c[0])
    return {
        f"{name}_ratio": round(b["server_us_per_delivery"] / o["server_us_per_delivery"], 3),
        f"{name}_at_rate": rate,
        f"{name}_us_per_delivery": [b["server_us_per_delivery"], o["server_us_per_delivery"]],
    }


def _clean(step: dict[str, Any]) -> bool:
    return (
        not step["client_saturated"]
        and (step["delivered_share"] or 0) >= 0.99
        and step.get("server_us_per_delivery") is not None
    )


def run_reliable(receivers: int = 2000) -> dict[str, Any]:
    pin_self(CLIENT_CPU)
    out = {}
    with procs.shardchat(1, settings=FAST, cpus=SERVER_CPU) as server:
        out["none"] = fanout_against(server, "reliable-0", receivers, [], SMALL_FANOUT_RATES)
        # Acks as shardchat.client sends them (at most every 50 ms), then the worst
        # case: an ack after every read.
        out["half"] = fanout_against(
            server, "reliable-50", receivers, ["--reliable", "0.5"], SMALL_FANOUT_RATES
        )
        out["half_every_read"] = fanout_against(
            server,
            "reliable-50-every-read",
            receivers,
            ["--reliable", "0.5", "--ack-ms", "0"],
            SMALL_FANOUT_RATES,
        )
    none = max(1, best_rate(out["none"]))
    summary = {
        "none": best_rate(out["none"]),
        "half": best_rate(out["half"]),
        "half_every_read": best_rate(out["half_every_read"]),
        "ratio": round(best_rate(out["half"]) / none, 3),
        "ratio_every_read": round(best_rate(out["half_every_read"]) / none, 3),
        **cost_ratio(out["none"], out["half"], "cost"),
        **cost_ratio(out["none"], out["half_every_read"], "cost_every_read"),
    }
    procs.write_result("reliable-summary", summary)
    return {**out, **summary}


def _scrape_every_second(admin_port: int, stop: threading.Event) -> None:
    while not stop.wait(1.0):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=5).read()
        except OSError:
            pass


def run_metrics(receivers: int = 2000) -> dict[str, Any]:
    pin_self(CLIENT_CPU)
    out = {}
    with procs.shardchat(1, settings=[*FAST, "server.admin_port=0"], cpus=SERVER_CPU) as server:
        out["off"] = fanout_against(server, "metrics-off", receivers, [], SMALL_FANOUT_RATES)
    with procs.shardchat(1, settings=FAST, cpus=SERVER_CPU) as server:
        stop = threading.Event()
        assert server.admin_port is not None
        scraper = threading.Thread(target=_scrape_every_second, args=(server.admin_port, stop))
        scraper.start()
        try:
            out["on"] = fanout_against(server, "metrics-on", receivers, [], SMALL_FANOUT_RATES)
        finally:
            stop.set()
            scraper.join()
    summary = {
        "off": best_rate(out["off"]),
        "on": best_rate(out["on"]),
        "ratio": round(best_rate(out["on"]) / max(1, best_rate(out["off"])), 3),
        **cost_ratio(out["off"], out["on"], "cost"),
    }
    procs.write_result("metrics-summary", summary)
    return {**out, **summary}


def run_smoke() -> dict[str, Any]:
    """Every scenario at a tiny size, against shardchat --workers 2."""
    out: dict[str, Any] = {}
    with procs.shardchat(2, settings=FAST) as server:
        admin = ["--admin", f"http://127.0.0.1:{server.admin_port}", "--target", "smoke"]
        port = ["--port", str(server.port)]
        out["hold"] = load(["hold", *port, *admin, "--connections", "200", "--seconds", "2"])
        out["fanout"] = load(
            [
                "fanout",
                *port,
                *admin,
                "--receivers",
                "200",
                "--senders",
                "4",
                "--rates",
                "50,200",
                "--seconds",
                "2",
                "--drain",
                "1",
            ]
        )
        out["rooms"] = load(
            [
                "rooms",
                *port,
                *admin,
                "--clients",
                "200",
                "--room-size",
                "10",
                "--interval-ms",
                "200",
                "--seconds",
                "2",
                "--drain",
                "1",
            ]
        )
    return out


SETS: dict[str, Callable[[], Any]] = {
    "smoke": run_smoke,
    "fanout": run_fanout,
    "quota": run_fanout_quota,
    "rooms": run_rooms,
    "hold": run_hold,
    "reliable": run_reliable,
    "metrics": run_metrics,
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("set", choices=[*SETS, "all"])
    args = parser.parse_args()
    names = [n for n in SETS if n != "smoke"] if args.set == "all" else [args.set]
    for name in names:
        print(f"== {name}", file=sys.stderr)
        result = SETS[name]()
        print(json.dumps(result, indent=2, default=str)[:4000])


if __name__ == "__main__":
    main()
