"""Lifecycle hooks loaded with --app: each fires on every shard with the right
arguments; refusing, rewriting and failing hooks."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from tests.support.helpers import (
    SHARDCHAT,
    clients_on_shards,
    closing,
    connect_client,
    running_server,
)

ROOT = str(Path(__file__).resolve().parent.parent.parent)
APP = ["--app", "tests.support.hookapp:app"]


def events_named(events: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in events if e.get("event") == name]


async def test_hooks_fire_on_every_shard() -> None:
    with running_server(workers=3, extra_args=APP, env={"PYTHONPATH": ROOT}) as srv:
        # on_connect refuses users off the allow-list, with the hook's reason.
        with pytest.raises(InvalidStatus) as info:
            await connect(srv.url + "?user=mallory")
        assert info.value.response.status_code == 403
        assert b"mallory is not on the allow-list" in info.value.response.body
        clients = await clients_on_shards(srv.url, [0, 1, 2], prefix="h")
        async with closing(clients):
            for client in clients:
                await client.join("mod")
            a, b, _ = clients
            # on_message rewrites ...
            await a.send(type="message", room="mod", content="what the heck", id="w")
            assert (await b.recv_type("message"))["content"] == "what the ****"
            # ... refuses with a reason ...
            await b.send(type="message", room="mod", content="STOP SHOUTING NOW", id="s")
            error = await b.recv_type("error")
            assert error == {
                "type": "error",
                "code": "rejected",
                "reason": "no shouting, please",
                "id": "s",
            }
            # ... and a hook that raises leaves the message and the connection alone.
            await b.send(type="message", room="mod", content="crash", id="c")
            seen = [(await a.recv_type("message"))["content"] for _ in range(2)]
            assert seen == ["what the ****", "crash"]
            assert (await b.request("ping", "pong", id="fine"))["id"] == "fine"
        users = {c.user for c in clients}
        log = srv.wait_for_log(
            lambda ev: {e["user"] for e in events_named(ev, "moderation_close")} >= users
        )
        opens = events_named(log, "moderation_open")
        assert {e["shard"] for e in opens} >= {0, 1, 2}
        assert {(e["shard"], e["user"]) for e in opens} >= {(c.shard, c.user) for c in clients}
        closes = [
            e
            for e in events_named(log, "moderation_close")
            if e["user"] in {c.user for c in clients}
        ]
        assert {(e["shard"], e["user"], e["code"]) for e in closes} == {
            (c.shard, c.user, 1000) for c in clients
        }
        connects = events_named(log, "hook_connect")
        assert any(e["user"] == "mallory" for e in connects)
        failed = events_named(log, "hook_failed")
        assert any(e["hook"] == "on_message" and e["user"] == b.user for e in failed)


async def test_failing_on_connect_accepts() -> None:
    with running_server(workers=2, extra_args=APP, env={"PYTHONPATH": ROOT}) as srv:
        client = await connect_client(srv.url, user="connect-crasher")
        async with closing([client]):
            assert (await client.request("ping", "pong", id="x"))["id"] == "x"
        assert any(e["hook"] == "on_connect" for e in events_named(srv.log_events(), "hook_failed"))


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ("nosuchmodule:app", "cannot import nosuchmodule"),
        ("examples.moderation:nothing", "has no nothing"),
        ("examples.moderation:BANNED", "defines none of"),
        ("not a spec", "module:object"),
    ],
)
def test_bad_app_exits_2(spec: str, words: str) -> None:
    result = subprocess.run(
        [SHARDCHAT, "start", "--workers", "1", "--app", spec],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=30,
    )
    assert result.returncode == 2
    assert words in result.stderr and "Traceback" not in result.stderr
