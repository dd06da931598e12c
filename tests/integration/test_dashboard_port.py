"""The admin port's dashboard routes: the page and its script (no token needed, the
page has no data), its CSP, the one-a-second samples behind the token, and the
forward of /api/<method> to the server API, with what it refuses."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from shardchat.testing.pki import make_pki
from shardchat.testing.wait import wait_until
from tests.support.helpers import Server, raw_http, running_server

TOKEN = "dashboard-port-token"
AUTH = f"Authorization: Bearer {TOKEN}\r\n"
JSON = "Content-Type: application/json; charset=utf-8\r\n"


@pytest.fixture(scope="module")
def admin() -> Iterator[Server]:
    with running_server(workers=2, settings=[f"server.admin_token={TOKEN}"]) as srv:
        yield srv


def call(
    server: Server, method: str, path: str, head: str = "", body: bytes = b""
) -> tuple[int, dict[str, str], bytes]:
    sized = body or (method == "POST" and "Content-Length" not in head)
    length = f"Content-Length: {len(body)}\r\n" if sized else ""
    request = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{head}{length}\r\n".encode() + body
    return raw_http(server.admin_port, request)


def test_the_page_and_its_script_need_no_token_and_carry_a_csp(admin: Server) -> None:
    status, headers, body = call(admin, "GET", "/")
    assert status == 200 and headers["content-type"] == "text/html; charset=utf-8"
    assert b'<script type="module" src="/dashboard.js">' in body
    csp = headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp
    assert "connect-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert headers["x-content-type-options"] == "nosniff"
    status, headers, body = call(admin, "GET", "/dashboard.js")
    assert status == 200 and headers["content-type"] == "text/javascript; charset=utf-8"
    assert b"sessionStorage" in body and b"localStorage" not in body


def test_samples_come_once_a_second_behind_the_token(admin: Server) -> None:
    assert call(admin, "GET", "/series")[0] == 401
    assert call(admin, "GET", "/series", "Authorization: Bearer wrong\r\n")[0] == 401

    def two_samples() -> list[dict[str, object]]:
        status, headers, body = call(admin, "GET", "/series", AUTH)
        assert status == 200 and headers["content-type"] == "application/json"
        samples: list[dict[str, object]] = json.loads(body)
        return samples if len(samples) >= 2 else []

    samples = wait_until(two_samples, 10, "two samples", poll=0.2)
    first, second = samples[:2]
    assert 500 <= second["t"] - first["t"] <= 1500
    assert set(first) == {
        "t",
        "connections",
        "messages_in",
        "deliveries",
        "p50_ms",
        "p99_ms",
        "shards",
    }
    assert len(first["shards"]) == 2
    # Only the newer ones after a time.
    newer = json.loads(call(admin, "GET", f"/series?after={first['t']}", AUTH)[2])
    assert newer and all(s["t"] > first["t"] for s in newer)


def test_api_calls_are_refused_clearly(admin: Server) -> None:
    assert call(admin, "POST", "/api/rooms", body=b"{}")[0] == 401
    status, _, body = call(admin, "POST", "/api/rooms", AUTH + JSON, b"{}")
    assert status == 503 and json.loads(body)["error"]["code"] == "api_off"
    # What a page of another origin may send without a CORS preflight (a form,
    # text/plain) never reaches the API, token or not.
    for typed in (
        "",
        "Content-Type: text/plain\r\n",
        "Content-Type: application/x-www-form-urlencoded\r\n",
    ):
        status, headers, _ = call(admin, "POST", "/api/rooms", AUTH + typed, b"{}")
        assert status == 415 and headers["connection"] == "close"
    assert call(admin, "GET", "/api/rooms", AUTH)[0] == 405
    assert call(admin, "POST", "/status", AUTH, b"{}")[0] == 405
    assert call(admin, "POST", "/", body=b"{}")[0] == 405
    # Told by Content-Length, before any of the body is read.
    too_large = AUTH + JSON + "Content-Length: 70000\r\n"
    assert call(admin, "POST", "/api/rooms", too_large)[0] == 413
    assert call(admin, "POST", "/api/Bad-Name", AUTH + JSON, b"{}")[0] == 404
    # The port still answers after all that.
    assert call(admin, "GET", "/status", AUTH)[0] == 200


def test_behind_tls_the_dashboard_says_why_it_cannot_call_the_api(tmp_path: Path) -> None:
    """The forward speaks plain HTTP: with TLS on the main port it answers 503 and says
    so (the page shows the message), instead of failing in the middle of a handshake."""
    pki = make_pki(tmp_path)
    settings = [
        f'server.tls_cert="{pki.cert}"',
        f'server.tls_key="{pki.key}"',
        "api.key=dashboard-tls-api-key-1234",
    ]
    with running_server(workers=1, settings=settings) as srv:
        head = "Content-Type: application/json\r\n"
        status, _, body = call(srv, "POST", "/api/rooms", head, b"{}")
        error = json.loads(body)["error"]
        assert status == 503 and error["code"] == "api_off" and "TLS" in error["message"]


def test_without_a_token_only_this_ports_own_names_may_call_the_api() -> None:
    """DNS rebinding: a page of another site whose name now resolves here is
    same-origin with the port, so without an admin token the forward answers only
    requests that name the port by an address, localhost or server.admin_host."""
    with running_server(workers=1, settings=["api.key=dashboard-rebinding-key"]) as srv:

        def rooms(host: str) -> int:
            request = (
                f"POST /api/rooms HTTP/1.1\r\nHost: {host}\r\n{JSON}Content-Length: 2\r\n\r\n{{}}"
            ).encode()
            return raw_http(srv.admin_port, request)[0]

        port = srv.admin_port
        assert rooms(f"evil.example:{port}") == 403
        assert rooms("evil.example") == 403
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", "127.0.0.1", f"[::1]:{port}"):
            assert rooms(host) == 200, host
