"""The perf scenarios at a tiny size: correctness only (nothing lost, nothing duplicated,
seq in order), never a time. The load generator runs as a program, as people run it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.support.helpers import FAST, Server, running_server, scaled

ROOT = Path(__file__).resolve().parent.parent.parent


def load(server: Server, tmp_path: Path, *args: str) -> dict[str, Any]:
    out = tmp_path / "result.json"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "perf.lib.load",
            *args,
            "--port",
            str(server.port),
            "--admin",
            f"http://127.0.0.1:{server.admin_port}",
            "--output",
            str(out),
        ],
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=scaled(120),
    )
    result: dict[str, Any] = json.loads(out.read_text())
    return result


@pytest.fixture(scope="module")
def perf_server() -> Any:
    with running_server(workers=2, settings=FAST) as server:
        yield server


def test_hold_smoke(perf_server: Server, tmp_path: Path) -> None:
    result = load(perf_server, tmp_path, "hold", "--connections", "200", "--seconds", "2")
    assert result["up"] == 200 and result["open_after_hold"] == 200
    assert result["hold"]["failures"] == {} and result["hold"]["dropped"] == 0
    assert result["rss_per_connection"] is not None


def test_hold_smoke_with_the_prober(perf_server: Server, tmp_path: Path) -> None:
    """The prober's connections are part of the total; every ping gets its pong;
    the connect phase reports the kernel's queue counters."""
    result = load(
        perf_server, tmp_path, "hold", "--connections", "200", "--prober", "20", "--seconds", "2"
    )
    assert result["up"] == 200 and result["open_after_hold"] == 200
    probe = result["probe"]
    assert probe["pings"] == 40 and probe["pongs"] == 40 and probe["missing"] == 0
    assert probe["closed_by_server"] == 0
    assert result["hold"]["rtt_ms"] == probe["rtt_ms"]
    assert probe["connect"]["up"] == 20 and probe["connect"]["failures"] == {}
    assert result["connect"]["connect_ms"] == probe["connect"]["connect_ms"]
    assert set(result["connect"]["tcp"]) >= {"ListenOverflows", "TCPSynRetrans"}


def test_fanout_smoke(perf_server: Server, tmp_path: Path) -> None:
    result = load(
        perf_server,
        tmp_path,
        "fanout",
        "--receivers",
        "200",
        "--senders",
        "4",
        "--rates",
        "50,100",
        "--seconds",
        "1",
        "--drain",
        "1",
        "--reliable",
        "0.5",
    )
    assert len(result["steps"]) == 2
    for step in result["steps"]:
        assert step["sent"] > 0 and step["acked"] == step["sent"]
        assert step["delivered"] == step["expected_deliveries"] and step["lost"] == 0
        assert step["duplicates"] == 0 and step["out_of_order_or_gap"] == 0


def test_rooms_smoke(perf_server: Server, tmp_path: Path) -> None:
    result = load(
        perf_server,
        tmp_path,
        "rooms",
        "--clients",
        "200",
        "--room-size",
        "10",
        "--interval-ms",
        "250",
        "--seconds",
        "1",
        "--drain",
        "1",
    )
    assert result["sent"] > 0
    assert result["delivered"] == result["expected_deliveries"]
    assert result["run"]["duplicates"] == 0 and result["run"]["out_of_order_or_gap"] == 0
