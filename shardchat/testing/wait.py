"""Waiting for a condition with a deadline: the one poll loop of the tests and benchmarks.

A predicate is polled until it returns something truthy, which is returned; at
the deadline it raises ``AssertionError`` naming what never happened. The
predicate's own exceptions propagate at once: a check that fails is not retried.
Every deadline is multiplied by ``SHARDCHAT_TEST_TIMEOUT_FACTOR`` (default 1),
for slow or shared machines: :func:`scaled`.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

__all__ = ["FACTOR", "await_until", "scaled", "wait_until"]

FACTOR = float(os.environ.get("SHARDCHAT_TEST_TIMEOUT_FACTOR", "1"))

T = TypeVar("T")
# What never happened, for the error: a text, or a function that makes it at the
# deadline (a server's log tail, say, which is worth reading only then).
What = str | Callable[[], str]

POLL = 0.02  # seconds between two looks: short next to every deadline, cheap to evaluate


def scaled(seconds: float) -> float:
    """A deadline of ``seconds`` on this machine."""
    return seconds * FACTOR


def wait_until(
    predicate: Callable[[], T], timeout: float, what: What = "the condition", poll: float = POLL
) -> T:
    """Poll ``predicate`` (blocking) until it is truthy, for ``timeout`` seconds
    (scaled); its value."""
    deadline = time.monotonic() + scaled(timeout)
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(_said(what, timeout))
        time.sleep(poll)


async def await_until(
    predicate: Callable[[], T | Awaitable[T]],
    timeout: float,
    what: What = "the condition",
    poll: float = POLL,
) -> T:
    """Poll ``predicate`` (a function or a coroutine function) from the event loop
    until it is truthy, for ``timeout`` seconds (scaled); its value."""
    deadline = time.monotonic() + scaled(timeout)
    while True:
        value = predicate()
        if isinstance(value, Awaitable):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(_said(what, timeout))
        await asyncio.sleep(poll)


def _said(what: What, timeout: float) -> str:
    return f"not within {scaled(timeout):g} s: {what() if callable(what) else what}"
