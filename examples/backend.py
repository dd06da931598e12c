"""An application backend for shardchat's HTTP hooks, on the standard library only.

    python -m examples.backend --port 8000 --secret whsec_... [--fail-for 3]

    shardchat start --set proxy.connect_url=http://127.0.0.1:8000/connect \\
        --set proxy.publish_url=http://127.0.0.1:8000/publish \\
        --set webhooks.url=http://127.0.0.1:8000/webhooks --set webhooks.secret=whsec_...

- ``POST /connect`` admits a connection by its ``session`` cookie
  (``session=<user>``); a user named ``banned-*`` is refused with 403 and a
  reason, one without a cookie with 401.
- ``POST /publish`` masks the word ``darn`` and refuses messages that are all
  capitals (shouting).
- ``POST /webhooks`` checks each batch's Standard Webhooks signature (HMAC-SHA256
  of ``id.timestamp.body``, a 5-minute timestamp tolerance), keeps every event
  once per event id (a retried batch repeats ids) and prints them.

The tests start :class:`Backend` in a thread and read what it kept; ``fail_for``
answers webhooks with 500 for that many seconds, ``hang`` never answers them,
``connect_delay`` and ``publish_delay`` hold those answers (a slow backend).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["Backend", "verify_signature"]

TOLERANCE = 300  # seconds a signature's timestamp may be off


def verify_signature(secret: str, headers: dict[str, str], body: bytes) -> bool:
    """Standard Webhooks: ``webhook-signature`` holds ``v1,<base64 HMAC-SHA256 of
    "id.timestamp.body">`` (space-separated, several during a key rotation)."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    msg_id = headers.get("webhook-id", "")
    stamp = headers.get("webhook-timestamp", "")
    if not msg_id or not stamp.isdigit() or abs(time.time() - int(stamp)) > TOLERANCE:
        return False
    signed = f"{msg_id}.{stamp}.".encode() + body
    expected = "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    return any(
        hmac.compare_digest(expected, sig) for sig in headers.get("webhook-signature", "").split()
    )


class Backend:
    """The backend's state; :meth:`start` serves it on a thread."""

    def __init__(self, secret: str, *, port: int = 0, fail_for: float = 0.0) -> None:
        self.secret = secret
        self.fail_until = time.monotonic() + fail_for if fail_for else 0.0
        self.hang = False  # webhooks: never answer
        self.echo = False  # print each new event (the command line does)
        self.connect_delay = 0.0  # seconds before a connect answer
        self.publish_delay = 0.0  # seconds before a publish answer
        self.lock = threading.Lock()
        self.events: dict[str, dict[str, Any]] = {}  # id -> event, the first copy
        self.duplicates = 0  # events received again (a retried batch)
        self.batches: list[tuple[dict[str, str], bytes]] = []  # every accepted POST, raw
        self.bad_signatures = 0
        self.failed_posts = 0  # answered 500 on purpose
        self.connects: list[dict[str, Any]] = []
        # user -> the ``info`` its connect answer carries (None: none); the
        # others get {"via": "cookie"}.
        self.infos: dict[str, object] = {}
        self.publishes: list[dict[str, Any]] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", port), _handler(self))
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]

    def fail_for(self, seconds: float) -> None:
        """Answer webhooks with 500 from now on for ``seconds``."""
        self.fail_until = time.monotonic() + seconds

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def start(self) -> Backend:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.hang = False
        self.server.shutdown()
        self.server.server_close()

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        with self.lock:
            return [e for e in self.events.values() if e["type"] == kind]

    # The three endpoints: each returns a status and a JSON body.

    def webhooks(self, headers: dict[str, str], body: bytes) -> tuple[int, object]:
        if not verify_signature(self.secret, headers, body):
            self.bad_signatures += 1
            return 401, {"error": "bad signature"}
        if time.monotonic() < self.fail_until:
            self.failed_posts += 1
            return 500, {"error": "failing on purpose"}
        with self.lock:
            self.batches.append((headers, body))
            for event in json.loads(body):
                if event["id"] in self.events:
                    self.duplicates += 1
                else:
                    self.events[event["id"]] = event
                    if self.echo:
                        print(json.dumps(event), flush=True)
        return 204, None

    def connect(self, request: dict[str, Any]) -> tuple[int, object]:
        if self.connect_delay:
            time.sleep(self.connect_delay)
        self.connects.append(request)
        cookies = dict(
            part.strip().partition("=")[::2]
            for part in request["headers"].get("cookie", "").split(";")
            if "=" in part
        )
        user = cookies.get("session")
        if not user:
            return 401, {"reason": "no session cookie"}
        if user.startswith("banned-"):
            return 403, {"reason": f"{user} is banned"}
        info = self.infos.get(user, {"via": "cookie"})
        if info is None:
            return 200, {"user": user}
        return 200, {"user": user, "info": info}

    def publish(self, request: dict[str, Any]) -> tuple[int, object]:
        if self.publish_delay:
            time.sleep(self.publish_delay)
        self.publishes.append(request)
        results = []
        for message in request["messages"]:
            content = message["content"]
            if content.isupper():
                results.append({"id": message["id"], "reject": "no shouting"})
            elif "darn" in content:
                results.append({"id": message["id"], "content": content.replace("darn", "d**n")})
            else:
                results.append({"id": message["id"]})  # kept as it is
        return 200, {"results": results}


def _handler(backend: Backend) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as shardchat's client expects

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            headers = {k.lower(): v for k, v in self.headers.items()}
            if self.path == "/webhooks":
                while backend.hang:
                    time.sleep(0.05)
                status, answer = backend.webhooks(headers, body)
            elif self.path == "/connect":
                status, answer = backend.connect(json.loads(body))
            elif self.path == "/publish":
                status, answer = backend.publish(json.loads(body))
            else:
                status, answer = 404, {"error": "not found"}
            data = b"" if answer is None else json.dumps(answer).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except OSError:
                self.close_connection = True  # the caller gave up waiting (its timeout)

        def log_message(self, format: str, *args: object) -> None:
            pass  # quiet: events are printed instead

    return Handler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--secret", required=True, help="webhooks.secret (whsec_...)")
    parser.add_argument("--fail-for", type=float, default=0.0, help="answer 500 this long")
    args = parser.parse_args()
    backend = Backend(args.secret, port=args.port, fail_for=args.fail_for)
    backend.echo = True
    print(f"listening on http://127.0.0.1:{backend.port}", flush=True)
    backend.server.serve_forever()


if __name__ == "__main__":
    main()
