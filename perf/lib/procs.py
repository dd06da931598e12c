"""Starting and measuring the servers under test, shared by the benchmarks."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

ROOT = Path(__file__).resolve().parent.parent.parent
SHARDCHAT = str(Path(sys.executable).with_name("shardchat"))
RESULTS = ROOT / "perf" / "results"


def free_port() -> int:
    """A port free on every address, from below the kernel's ephemeral range.

    The load clients open tens of thousands of connections, each from an
    ephemeral port: a port picked from that range (``bind(0)``) was seen taken
    by one of them between the pick and the server's bind, or still held (a
    server's shard then failed with EADDRINUSE). Ports below the range are
    never handed to a connecting socket. The wildcard address: the port is then
    free on every address, not only on 127.0.0.1."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for _ in range(1000):
        port = random.randrange(10000, max(10001, low))
        with socket.socket() as sock:
            try:
                sock.bind(("", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in 10000-{low}")


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def shard_pids(admin: str) -> list[int]:
    """The live shards' pids, from a shardchat supervisor's /status."""
    with urllib.request.urlopen(admin + "/status", timeout=5) as response:
        status = json.loads(response.read())
    return [s["pid"] for s in status["shards"] if s["alive"]]


def wait_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


@dataclass
class Running:
    name: str
    proc: subprocess.Popen[bytes]
    port: int
    admin_port: int | None

    def server_pids(self) -> list[int]:
        """The processes that hold connections (the shards, or the baseline itself)."""
        if self.admin_port is None:
            # shardchat without its admin port: the supervisor's children.
            children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
            pids = [int(p) for p in children.read_text().split()] if children.exists() else []
            return pids or [self.proc.pid]
        return shard_pids(f"http://127.0.0.1:{self.admin_port}")

    def rss(self) -> int:
        return sum(rss_bytes(pid) for pid in self.server_pids())


def _stop(proc: subprocess.Popen[bytes], timeout: float) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _taskset(cpus: str | None) -> list[str]:
    return ["taskset", "-c", cpus] if cpus else []


CGROUP_V1_CPU = Path("/sys/fs/cgroup/cpu")
CGROUP_V2 = Path("/sys/fs/cgroup")
QUOTA_PERIOD_US = 10_000  # short, so that a throttled server stalls for 10 ms at most


@contextlib.contextmanager
def cpu_quota(share: float | None) -> Iterator[list[str]]:
    """A cgroup holding what runs in it to ``share`` of one core (CFS quota over a
    10 ms period); yields the command prefix that starts a program inside it.

    cgroup v1's cpu controller where it is mounted, else cgroup v2's cpu.max.
    Children (the shards) inherit the group. Needs root."""
    if share is None:
        yield []
        return
    quota = max(1000, int(share * QUOTA_PERIOD_US))
    name = f"shardchat-perf-{os.getpid()}"
    if (CGROUP_V1_CPU / "cpu.cfs_quota_us").exists():
        group = CGROUP_V1_CPU / name
        group.mkdir()
        (group / "cpu.cfs_period_us").write_text(str(QUOTA_PERIOD_US))
        (group / "cpu.cfs_quota_us").write_text(str(quota))
    else:
        group = CGROUP_V2 / name
        group.mkdir()
        (group / "cpu.max").write_text(f"{quota} {QUOTA_PERIOD_US}")
    procs_file = group / "cgroup.procs"
    try:
        yield ["sh", "-c", f'echo $$ > {procs_file} && exec "$@"', "sh"]
    finally:
        deadline = time.monotonic() + 10
        while procs_file.read_text().strip() and time.monotonic() < deadline:
            time.sleep(0.05)
        with contextlib.suppress(OSError):
            group.rmdir()


@contextlib.contextmanager
def shardchat(
    workers: int,
    settings: Sequence[str] = (),
    cpus: str | None = None,
    prefix: Sequence[str] = (),
    program: str = SHARDCHAT,
) -> Iterator[Running]:
    """``shardchat start`` (``program``: another checkout's, for a comparison)."""
    port, admin = free_port(), free_port()
    args = [*prefix, *_taskset(cpus), program, "start", "--workers", str(workers)]
    args += ["--port", str(port)]
    args += ["--set", f"server.admin_port={admin}", "--set", "log.level=warning"]
    for setting in settings:
        args += ["--set", setting]
    store_dir: str | None = None
    if program == SHARDCHAT and not any(s.startswith("storage.dir=") for s in settings):
        if "storage.kind=memory" not in settings:
            # The room store in a directory of this run's own, removed after it.
            store_dir = tempfile.mkdtemp(prefix="shardchat-perf-store-")
            args += ["--set", f"storage.dir={store_dir}"]
    # In the program's own checkout, so that it reads its own config.toml (another
    # version's file may name keys this one does not know).
    root = Path(program).parent.parent.parent if program != SHARDCHAT else ROOT
    proc = subprocess.Popen(args, cwd=root)
    admin_off = "server.admin_port=0" in settings
    try:
        wait_port(port)
        if not admin_off:
            wait_port(admin)
        running = Running(
            f"shardchat --workers {workers}", proc, port, None if admin_off else admin
        )
        deadline = time.monotonic() + 10
        while len(running.server_pids()) < workers and time.monotonic() < deadline:
            time.sleep(0.05)
        yield running
    finally:
        _stop(proc, 30)
        if store_dir is not None:
            shutil.rmtree(store_dir, ignore_errors=True)


@contextlib.contextmanager
def baseline(cpus: str | None = None, prefix: Sequence[str] = ()) -> Iterator[Running]:
    port = free_port()
    args = [*prefix, *_taskset(cpus), sys.executable, "-m", "perf.lib.baseline_server"]
    args += ["--port", str(port)]
    proc = subprocess.Popen(args, cwd=ROOT)
    try:
        wait_port(port)
        yield Running("websockets.asyncio (baseline)", proc, port, None)
    finally:
        _stop(proc, 10)


# Settings under which a server never refuses a benchmark's load by rate, drops an
# idle connection or sends presence events: what is measured is the path itself.
UNLIMITED = [
    "limits.rate=1000000",
    "limits.burst=1000000",
    "heartbeat.interval=600",
    "heartbeat.idle_timeout=0",
    "presence.events_limit=0",
]
BASELINE = "baseline"  # as a program: the single-process websockets server


def server(
    program: str, workers: int, settings: Sequence[str] = (), cpus: str | None = None
) -> AbstractContextManager[Running]:
    """``program``'s server: a ``shardchat`` (this checkout's or another's), or
    :data:`BASELINE` (one process whatever ``workers`` and ``settings`` say)."""
    if program == BASELINE:
        return baseline(cpus=cpus)
    return shardchat(workers, settings=list(settings), cpus=cpus, program=program)


def write_result(name: str, data: object) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def cpu_count() -> int:
    return os.cpu_count() or 1


def retried(measure: Callable[..., T], *args: Any, attempts: int = 3) -> T:
    """``measure(*args)``, again if its server did not come up (a port taken
    between the pick and the bind, on a shared machine)."""
    for attempt in range(attempts):
        try:
            return measure(*args)
        except (RuntimeError, OSError) as exc:
            if attempt == attempts - 1:
                raise
            print(f"retrying ({exc!r})", file=sys.stderr)
    raise AssertionError("unreachable")
