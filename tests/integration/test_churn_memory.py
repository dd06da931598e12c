"""No leak under connection churn: 50,000 connect/join/ping/close cycles,
and each shard's anonymous memory comes back to within 5 MiB of where it started."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from shardchat.procstat import rss_anon
from shardchat.testing.wait import wait_until
from tests.support.helpers import running_server, scaled

ROOT = Path(__file__).resolve().parent.parent.parent


def churn(port: int, count: int, processes: int = 3, concurrency: int = 300) -> int:
    """``count`` cycles from several client processes (the client side is CPU-bound too)."""
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.support.churn",
                str(port),
                str(-(-count // processes)),
                str(concurrency),
            ],
            stdout=subprocess.PIPE,
            cwd=ROOT,
        )
        for _ in range(processes)
    ]
    try:
        return sum(int(p.communicate(timeout=scaled(300))[0]) for p in procs)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
            if p.stdout is not None:
                p.stdout.close()  # else an interrupted run leaks the pipe into a later test


@pytest.mark.timeout(scaled(300))  # 50,000 real connections: about a minute on 2 cores
def test_fifty_thousand_connections_leave_no_memory_behind() -> None:
    """Closed connections must be freed even when the shard's periodic gc.freeze() ran
    while they were open (it used to move their reference cycles to the permanent
    generation for good: about 20 MiB per shard here). The start is measured after a
    warm-up round, so that allocator pools and the rooms' state exist already."""
    with running_server(workers=3) as srv:
        assert churn(srv.port, 2700) >= 2600  # warm-up
        pids = srv.shard_pids()
        start = {shard: rss_anon(pid) for shard, pid in pids.items()}
        done = churn(srv.port, 50_000)
        assert done >= 49_000, done
        wait_until(
            lambda: srv.status()["totals"]["connections"] == 0, 30, "every connection closed"
        )
        assert srv.shard_pids() == pids, "a shard restarted"
        grown = {shard: rss_anon(pid) - start[shard] for shard, pid in pids.items()}
        assert all(g < 5 * 2**20 for g in grown.values()), grown
