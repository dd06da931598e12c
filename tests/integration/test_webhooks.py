"""Webhooks: signed batches of connect, join, leave, disconnect, room_occupied and
room_vacated events, delivered at least once through a failing receiver, bounded
when the receiver never answers, and reported when a shard dies."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import standardwebhooks

from examples.backend import Backend
from tests.support.helpers import (
    assert_no_traceback,
    clients_on_shards,
    closing,
    room_owned_by,
    running_server,
    scaled,
)

SECRET = "whsec_" + base64.b64encode(b"k" * 32).decode()


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + scaled(timeout)
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


async def await_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + scaled(timeout)
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


@contextlib.contextmanager
def backend(**kwargs: Any) -> Iterator[Backend]:
    receiver = Backend(SECRET, **kwargs).start()
    try:
        yield receiver
    finally:
        receiver.stop()


def hook_settings(receiver: Backend, *extra: str) -> list[str]:
    return [
        f"webhooks.url={receiver.url('/webhooks')}",
        f"webhooks.secret={SECRET}",
        "webhooks.vacated_grace=0.3",
        *extra,
    ]


def kinds(receiver: Backend, user: str) -> list[tuple[str, str | None]]:
    with receiver.lock:
        events = sorted(receiver.events.values(), key=lambda e: (e["time"], e["id"]))
    return [(e["type"], e.get("room")) for e in events if e["user"] == user]


async def test_events_arrive_signed_and_verify_with_standardwebhooks() -> None:
    with backend() as receiver, running_server(2, hook_settings(receiver)) as srv:
        a, b = await clients_on_shards(srv.url, [0, 1], prefix="wh")
        room = room_owned_by(0, 2, "whroom")
        async with closing([a, b]):
            await a.join(room)
            await b.join(room)
            await b.request("leave", "left", room=room)
            await b.close()
            await await_until(
                lambda: ("disconnect", None) in kinds(receiver, b.user), 10, "b's disconnect"
            )
        await await_until(
            lambda: ("disconnect", None) in kinds(receiver, a.user), 10, "a's disconnect"
        )
        assert kinds(receiver, b.user) == [
            ("connect", None),
            ("join", room),
            ("leave", room),
            ("disconnect", None),
        ]
        assert kinds(receiver, a.user) == [
            ("connect", None),
            ("join", room),
            ("leave", room),
            ("disconnect", None),
        ]
        # Every batch verifies with the Standard Webhooks library itself.
        verifier = standardwebhooks.Webhook(SECRET)
        assert receiver.batches and receiver.bad_signatures == 0
        for headers, body in receiver.batches:
            assert isinstance(verifier.verify(body, headers), list)
        # The fields each event carries.
        leave = next(e for e in receiver.of_type("leave") if e["user"] == b.user)
        assert leave["shard"] == b.shard and leave["reason"] == "leave"
        assert isinstance(leave["conn"], int) and leave["box"] and leave["id"]
        gone = next(e for e in receiver.of_type("disconnect") if e["user"] == b.user)
        assert gone["code"] == 1000
        connect = next(e for e in receiver.of_type("connect") if e["user"] == a.user)
        assert connect["peer"] == "127.0.0.1" and connect["shard"] == a.shard
        assert_no_traceback(srv)
