"""Real Redis servers for the integration tests: started on free ports in temporary
directories, stopped (and their directories removed) even when a test fails.

No fake Redis: ``redis-server`` (Debian's package, 7.x; ``scripts/system-deps.sh``
installs it) runs as a child process. Tests of one module share a server and
tell their keys apart with a per-test key prefix, which is deleted after.
"""

from __future__ import annotations

import contextlib
import random
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from shardchat.testing.wait import wait_until
from tests.support.helpers import free_port, scaled

__all__ = ["RedisCluster", "RedisServer", "delete_prefix", "redis_server"]


def cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free too: at most 55535."""
    for _ in range(200):
        port = random.randrange(20000, 55535)
        try:
            for p in (port, port + 10000):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", p))
        except OSError:
            continue
        return port
    raise AssertionError("no free port pair for a cluster node")


class RedisServer:
    """One ``redis-server`` process on 127.0.0.1, with AOF on (appendfsync always:
    an acked message is on disk before the ack)."""

    def __init__(self, *, cluster: bool = False, directory: Path | None = None) -> None:
        self.port = cluster_port() if cluster else free_port()
        self.dir = directory or Path(tempfile.mkdtemp(prefix="shardchat-redis-"))
        self.cluster = cluster
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.dir / "redis.log"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        args = [
            "redis-server",
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.dir),
            "--appendonly", "yes",
            "--appendfsync", "always",
            "--save", "",
            "--logfile", str(self.log_path),
            "--protected-mode", "no",
        ]  # fmt: skip
        if self.cluster:
            args += [
                "--cluster-enabled", "yes",
                "--cluster-config-file", str(self.dir / "nodes.conf"),
                "--cluster-node-timeout", "2000",
            ]  # fmt: skip
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def answers() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"redis-server exited:\n{self._log()}")
            return self.cli("PING", check=False) == "PONG"

        wait_until(answers, 10, lambda: f"redis-server did not start:\n{self._log()}")

    def _log(self) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text()[-2000:]
        return ""

    def cli(self, *args: str, check: bool = True) -> str:
        out = subprocess.run(
            ["redis-cli", "-p", str(self.port), *args], capture_output=True, text=True, timeout=30
        )
        if check and out.returncode:
            raise AssertionError(out.stderr)
        return out.stdout.strip()

    def stop(self) -> None:
        """A clean stop (SIGTERM: Redis flushes its AOF and exits)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(scaled(10))
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def wipe(self) -> None:
        """Delete the data on disk (a stopped server restarts empty)."""
        for path in self.dir.iterdir():
            if path.name != "redis.log":
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class RedisCluster:
    """Three masters, no replicas, made a cluster with ``redis-cli --cluster create``."""

    def __init__(self, masters: int = 3) -> None:
        self.nodes = [RedisServer(cluster=True) for _ in range(masters)]

    @property
    def seeds(self) -> list[str]:
        return [f"127.0.0.1:{node.port}" for node in self.nodes]

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        subprocess.run(
            ["redis-cli", "--cluster", "create", *self.seeds, "--cluster-replicas", "0",
             "--cluster-yes"],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        wait_until(
            lambda: all("cluster_state:ok" in n.cli("CLUSTER", "INFO") for n in self.nodes),
            20,
            "the cluster up",
        )

    def close(self) -> None:
        for node in self.nodes:
            node.close()


def delete_prefix(servers: Sequence[RedisServer], prefix: str) -> None:
    """Remove a test's keys (every key under its prefix) from every server."""
    for server in servers:
        if server.proc is None or server.proc.poll() is not None:
            continue
        with contextlib.suppress(Exception):
            keys = server.cli("--scan", "--pattern", prefix + "*").split()
            for i in range(0, len(keys), 500):
                for key in keys[i : i + 500]:
                    server.cli("DEL", key, check=False)


@contextlib.contextmanager
def redis_server() -> Iterator[RedisServer]:
    """A started server, stopped (its directory removed) however the block ends."""
    server = RedisServer()
    try:
        server.start()
        yield server
    finally:
        server.close()
