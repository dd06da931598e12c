"""The JavaScript client (shardchat/static/shardchat.js) under Node's own test runner.

This test starts the real servers, then runs ``node --test`` on the ``*.test.mjs``
files next to it with their addresses in the environment; node's output is shown
whatever the outcome, and the test passes only when node exits 0. The node tests
drive the servers through a small control port served here (kill -9 of a shard,
a full restart on the same port), so that every process is started and cleaned
up by pytest even when node fails. Node 20 has no global WebSocket: the tests use
the ``ws`` package, installed from tests/js/package-lock.json into
tests/js/node_modules (gitignored) on first use with ``npm ci``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from shardchat.brokers.sequencer import owner_of
from tests.js.nodetools import install_ws
from tests.support.helpers import FAST, Server, cleanup_server, scaled, start_server

HERE = Path(__file__).parent
API_KEY = "node-tests-api-key"
TOKEN_SECRET = "node-tests-token-secret-of-32-bytes-at-least"
NODE_TIMEOUT = 120  # seconds for one file's node run
# The shared server: rate limits out of the way, a small send queue so that a paused
# reader is cut (4429) after a few MB, history deep enough to resume all of it, and
# rooms in memory only (the full restart shows a lost history; see durable.test.mjs).
SETTINGS = [
    *FAST,
    "limits.send_queue=65536",
    "delivery.history=5000",
    "storage.kind=memory",
    f"api.key={API_KEY}",
    "overload.forwards=256",  # the flood test's bound (FAST lifts it)
]


class Control:
    """The servers the node tests use, and what they may do to them."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.servers: dict[str, Server] = {}
        self.settings: dict[str, list[str]] = {}
        self.store = Path(tempfile.mkdtemp(prefix="shardchat-js-store-"))

    def start(
        self, name: str, workers: int, port: int | None = None, settings: list[str] | None = None
    ) -> Server:
        settings = self.settings.setdefault(name, settings or SETTINGS)
        server = start_server(workers=workers, settings=settings, port=port)
        self.servers[name] = server
        return server

    def describe(self) -> dict[str, Any]:
        return {
            name: {
                "url": server.url,
                "http": f"http://127.0.0.1:{server.port}",
                "admin": f"http://127.0.0.1:{server.admin_port}",
                "workers": server.workers,
                "api_key": API_KEY,
                "token_secret": TOKEN_SECRET,
            }
            for name, server in self.servers.items()
        }

    def act(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            server = self.servers[body.get("server", "main")]
            if path == "/kill":
                # kill -9 of one shard: the supervisor restarts it.
                pid = server.shard_pids()[int(body["shard"])]
                starts = len(server.shard_starts())
                os.kill(pid, signal.SIGKILL)
                return {"pid": pid, "starts": starts}
            if path == "/signal":
                # SIGSTOP / SIGCONT of one shard: a shard that stops answering for a moment.
                pid = server.shard_pids()[int(body["shard"])]
                os.kill(pid, getattr(signal, f"SIG{body['signal']}"))
                return {"pid": pid}
            if path == "/owner":
                return {"shard": owner_of(str(body["room"]), server.workers)}
            if path == "/wait_started":
                server.wait_started(int(body["count"]), timeout=30)
                return {"starts": len(server.shard_starts())}
            if path == "/restart":
                # A full restart: the supervisor stops (1001 to every client), a new one
                # starts on the same port with a new epoch.
                name = body.get("server", "main")
                port = server.port
                cleanup_server(server)
                self.start(name, server.workers, port=port)
                return self.describe()
            if path == "/servers":
                return self.describe()
        raise KeyError(path)

    def close(self) -> None:
        for server in self.servers.values():
            cleanup_server(server)
        shutil.rmtree(self.store, ignore_errors=True)


def serve_control(control: Control) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length) or b"{}")
            try:
                status, answer = 200, control.act(self.path, body)
            except Exception as exc:  # reported to node, which fails its test with it
                status, answer = 500, {"error": f"{type(exc).__name__}: {exc}"}
            data = json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd


@pytest.fixture(scope="module")
def control() -> Iterator[Control]:
    control = Control()
    try:
        control.start("main", workers=2)
        # Rooms in a store (storage.dir): a full restart keeps their history and seqs.
        durable = [s for s in SETTINGS if not s.startswith("storage.")]
        durable += ["storage.kind=sqlite", f"storage.dir={control.store}"]
        control.start("durable", workers=2, settings=durable)
        # Tokens required, no clock-skew leeway: a token's exp ends its connection at once.
        tokens = [*SETTINGS, f"auth.secret={TOKEN_SECRET}", "auth.leeway=0"]
        control.start("tokens", workers=1, settings=tokens)
        yield control
    finally:
        control.close()


@pytest.mark.timeout(600)
def test_node_client_tests_pass_against_the_real_server(control: Control) -> None:
    install_ws()
    node = shutil.which("node")
    assert node is not None, "node is missing: run scripts/system-deps.sh"
    httpd = serve_control(control)
    try:
        files = sorted(str(path) for path in HERE.glob("*.test.mjs"))
        assert files, "no node test files"
        env = {
            **os.environ,
            "SHARDCHAT_CONTROL": f"http://127.0.0.1:{httpd.server_address[1]}",
            "SHARDCHAT_TEST_TIMEOUT_FACTOR": str(scaled(1)),
        }
        # One file at a time (they share the servers, and some kill or restart them:
        # each file is told where they are now), each under its own deadline.
        runs = []
        for file in files:
            env["SHARDCHAT_SERVERS"] = json.dumps(control.describe())
            runs.append(
                subprocess.run(
                    [node, "--test", "--test-reporter=spec", file],
                    cwd=HERE,
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=scaled(NODE_TIMEOUT),
                )
            )
    finally:
        httpd.shutdown()
        httpd.server_close()
    output = "\n".join(
        f"{file}:\n{run.stdout}{run.stderr}" for file, run in zip(files, runs, strict=True)
    )
    print(output)
    assert all(run.returncode == 0 for run in runs), f"node --test failed:\n{output}"
    for run in runs:
        assert "ℹ fail 0" in run.stdout and "ℹ pass 0" not in run.stdout, run.stdout
