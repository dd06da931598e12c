"""The connect proxy (the backend admits by its own session cookie, refuses with its
status and reason, 503 when it is slow; a JWT wins) and the publish proxy (the
backend keeps, rewrites or refuses each message, `unavailable` when it is slow)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
from collections.abc import Iterator
from typing import Any

import jwt
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from examples.backend import Backend
from shardchat.testing.wait import await_until
from tests.support.helpers import Client, assert_no_traceback, running_server, scaled

SECRET = "whsec_" + base64.b64encode(b"p" * 32).decode()
JWT_KEY = "j" * 32


@contextlib.contextmanager
def backend() -> Iterator[Backend]:
    receiver = Backend(SECRET).start()
    try:
        yield receiver
    finally:
        receiver.stop()


async def open_client(url: str, **headers: str) -> Client:
    ws = await connect(url, additional_headers=headers, open_timeout=scaled(10))
    welcome = json.loads(await asyncio.wait_for(ws.recv(), scaled(5)))
    assert welcome["type"] == "welcome", welcome
    return Client(ws, welcome)


async def refused(url: str, **headers: str) -> tuple[int, str]:
    with pytest.raises(InvalidStatus) as info:
        await connect(url, additional_headers=headers, open_timeout=scaled(10))
    response = info.value.response
    return response.status_code, response.body.decode()


async def test_connect_proxy_admits_by_cookie_refuses_with_the_backends_reason() -> None:
    with (
        backend() as app,
        running_server(
            2,
            [
                f"proxy.connect_url={app.url('/connect')}",
                "proxy.timeout=0.5",
                f"auth.secret={JWT_KEY}",
            ],
        ) as srv,
    ):
        # The backend's session cookie names the user; the ?user= parameter does not.
        ada = await open_client(srv.url + "?user=mallory&room=lobby", Cookie="session=ada")
        assert ada.user == "ada"
        assert (await ada.recv_type("joined"))["room"] == "lobby"
        asked = app.connects[-1]
        assert asked["headers"]["cookie"] == "session=ada"
        assert asked["query"] == "user=mallory&room=lobby" and asked["peer"] == "127.0.0.1"
        # Its refusal, with its status and reason, is what the client sees.
        assert await refused(srv.url, Cookie="session=banned-bob") == (
            403,
            "banned-bob is banned\n",
        )
        assert await refused(srv.url) == (401, "no session cookie\n")
        # A JWT, when the client sends one, wins: the backend is not asked.
        token = jwt.encode({"sub": "tokenuser"}, JWT_KEY, algorithm="HS256")
        calls = len(app.connects)
        by_token = await open_client(srv.url + f"?token={token}", Cookie="session=ada")
        assert by_token.user == "tokenuser" and len(app.connects) == calls
        # A backend slower than proxy.timeout: 503 with a clear reason, quickly.
        app.connect_delay = 2.0
        status, text = await refused(srv.url, Cookie="session=ada")
        assert status == 503 and "backend did not answer (timed out)" in text
        app.connect_delay = 0.0
        # Connections already open were never touched.
        assert (await ada.request("ping", "pong", id="p"))["id"] == "p"
        await ada.close()
        await by_token.close()
        log = srv.log_events()
        assert [e for e in log if e.get("event") == "connect_proxy_failing"]
        assert_no_traceback(srv)


async def test_publish_proxy_keeps_rewrites_and_refuses() -> None:
    with (
        backend() as app,
        running_server(
            2,
            [
                f"proxy.publish_url={app.url('/publish')}",
                "proxy.timeout=0.5",
                "overload.proxy=3",
                # The same backend hears the sequenced messages as webhooks.
                f"webhooks.url={app.url('/webhooks')}",
                f"webhooks.secret={SECRET}",
                'webhooks.events=["message"]',
            ],
        ) as srv,
    ):
        a = await open_client(srv.url + "?user=a&room=r")
        b = await open_client(srv.url + "?user=b&room=r")
        for client in (a, b):
            await client.recv_type("joined")
        await a.send(type="message", room="r", content="well darn", id="1")
        await a.send(type="message", room="r", content="STOP IT", id="2")
        await a.send(type="message", room="r", content="plain", id="3")
        got: list[dict[str, Any]] = [await b.recv_type("message") for _ in range(2)]
        assert [m["content"] for m in got] == ["well d**n", "plain"]
        replies = [await a.recv() for _ in range(5)]  # two acks, an error, two messages
        errors = [r for r in replies if r["type"] == "error"]
        assert errors == [{"type": "error", "code": "rejected", "reason": "no shouting", "id": "2"}]
        assert sorted(r["id"] for r in replies if r["type"] == "ack") == ["1", "3"]
        # One turn's publishes go in one request (three in one batch or more).
        assert sum(len(p["messages"]) for p in app.publishes) == 3
        # The message webhook carries what was sequenced: the rewritten content.
        await await_until(lambda: len(app.of_type("message")) == 2, 10, "message events")
        events = sorted(app.of_type("message"), key=lambda e: e["seq"])
        assert [(e["content"], e["user"], e["room"]) for e in events] == [
            ("well d**n", "a", "r"),
            ("plain", "a", "r"),
        ]
        assert [e["seq"] for e in events] == [m["seq"] for m in got]
        # A slow backend: `unavailable`, never sequenced; past overload.proxy (3)
        # waiting for it, `overloaded` at once.
        app.publish_delay = 1.5
        for i in range(5):
            await a.send(type="message", room="r", content="too slow", id=f"slow{i}")
        errors = [await a.recv_type("error") for _ in range(5)]
        refused = [e for e in errors if e["code"] == "overloaded"]
        assert [e["id"] for e in refused] == ["slow3", "slow4"]
        assert refused[0]["retry_after"] == 1 and "application's backend" in refused[0]["reason"]
        late = [e for e in errors if e["code"] == "unavailable"]
        assert [e["id"] for e in late] == ["slow0", "slow1", "slow2"]
        assert "did not answer" in late[0]["reason"]
        app.publish_delay = 0.0
        await a.send(type="message", room="r", content="after", id="5")
        assert (await b.recv_type("message"))["content"] == "after"  # not "too slow"
        await await_until(lambda: len(app.of_type("message")) == 3, 10, "the last event")
        assert "too slow" not in {e["content"] for e in app.of_type("message")}
        await a.close()
        await b.close()
        assert_no_traceback(srv)
