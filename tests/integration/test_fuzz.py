"""Fuzz the whole server path, not only the decoder: hypothesis-generated frames
(fragmented, nested, oversized, bad UTF-8, control frames between fragments,
reserved bits and opcodes) against a live shard. Every connection must end only
with a protocol close code or stay open and answer a ping; no traceback may reach
the log; and a neighbour on the same shard (the only one) keeps receiving its
room's messages, every one, in order. Bounded: the examples stop after
FUZZ_SECONDS. tests/support/longfuzz.py runs the same frames much longer with a seed."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.fuzzframes import FUZZ_SETTINGS, Frame, examples, run_example
from tests.support.fuzzneighbour import Neighbour
from tests.support.helpers import Server, assert_no_traceback, raw_http, running_server, scaled

FUZZ_SECONDS = 25.0


class TimeUp(BaseException):
    """Ends the hypothesis run at the time bound (or at the first failure)."""


@pytest.fixture(scope="module")
def fuzzed() -> Iterator[Server]:
    with running_server(workers=1, settings=FUZZ_SETTINGS) as server:
        yield server


def test_fuzzed_frames_end_only_in_protocol_closes(fuzzed: Server) -> None:
    neighbour = Neighbour(fuzzed.url)
    deadline = time.monotonic() + FUZZ_SECONDS
    counts = {"examples": 0, "frames": 0, "closed": 0}
    # Kept rather than raised: the time bound makes a replay by hypothesis return
    # early, which it would report as flaky instead of showing the failure.
    failures: list[tuple[list[Frame], BaseException]] = []

    @settings(
        max_examples=100_000,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(examples)
    def fuzz(frames: list[Frame]) -> None:
        if time.monotonic() > deadline or failures:
            raise TimeUp  # a BaseException: hypothesis stops at once, no shrinking
        try:
            outcome = run_example(fuzzed.port, frames, scaled(10))
        except Exception as exc:
            failures.append((frames, exc))
            return
        counts["examples"] += 1
        counts["frames"] += outcome.frames_sent
        counts["closed"] += outcome.code is not None

    try:
        fuzz()
    except TimeUp:
        pass
    finally:
        neighbour.stop()
    assert not failures, f"{failures[0][1]!r} after {failures[0][0]}"
    neighbour.check()
    print(f"fuzz: {counts}")
    assert counts["examples"] >= 50, counts
    assert 0 < counts["closed"] < counts["examples"], counts
    assert_no_traceback(fuzzed)


_HEADER_NAMES = st.sampled_from(
    [
        "Host",
        "Origin",
        "Authorization",
        "Upgrade",
        "Connection",
        "Sec-WebSocket-Key",
        "Sec-WebSocket-Version",
        "Content-Length",
        "Transfer-Encoding",
        "Sec-WebSocket-Extensions",
        "X-Other",
    ]
)
_HEADER_VALUES = st.one_of(
    st.sampled_from(
        ["websocket", "Upgrade", "13", "8", "0", "5", "chunked", "dGhlIHNhbXBsZSBub25jZQ=="]
    ),
    st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=20),
)
_REQUESTS = st.builds(
    lambda method, path, headers: (
        f"{method} {path} HTTP/1.1\r\n"
        + "".join(f"{name}: {value}\r\n" for name, value in headers)
        + "\r\n"
    ).encode(),
    st.sampled_from(["GET", "GET", "HEAD", "POST", "DELETE", "OPTIONS", "get"]),
    st.sampled_from(["/ws", "/ws?user=h", "/ws?room=bad%20room", "/", "/healthz", "/x", "*"]),
    st.lists(st.tuples(_HEADER_NAMES, _HEADER_VALUES), max_size=9),
)


def test_fuzzed_requests_always_get_an_answer(fuzzed: Server) -> None:
    """Requests from random header sets (repeated, missing, odd values, bodies):
    every one gets an HTTP answer with a status line, never a silent hang-up or a
    traceback in the log."""
    statuses: set[int] = set()

    @settings(max_examples=300, deadline=None, database=None)
    @given(_REQUESTS)
    def fuzz(request: bytes) -> None:
        status, _, _ = raw_http(fuzzed.port, request)
        assert 100 <= status < 600
        statuses.add(status)

    fuzz()
    assert {400, 405} <= statuses, statuses
    assert_no_traceback(fuzzed)
