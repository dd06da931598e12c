"""The reliable-delivery state machine: timers, backoff, cumulative acks."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from shardchat.core.reliable import Reliable


def test_clock_starts_on_send_and_stops_on_full_ack() -> None:
    r = Reliable(acked=3)
    r.sent(latest=3, now=0.0, timeout=2.0)
    assert r.deadline == 0.0  # nothing outstanding
    r.sent(latest=5, now=1.0, timeout=2.0)
    assert r.deadline == 3.0 and not r.due(2.9) and r.due(3.0)
    r.ack(5, latest=5, now=2.0, timeout=2.0)
    assert r.acked == 5 and r.deadline == 0.0


def test_backoff_doubles_until_exhausted() -> None:
    r = Reliable(acked=0)
    r.sent(latest=1, now=0.0, timeout=1.0)
    deadlines = []
    now = r.deadline
    while not r.exhausted(3):
        r.resent(now, 1.0)
        deadlines.append(r.deadline - now)
        now = r.deadline
    assert deadlines == [2.0, 4.0, 8.0]


def test_progress_resets_retries() -> None:
    r = Reliable(acked=0)
    r.sent(latest=10, now=0.0, timeout=1.0)
    r.resent(1.0, 1.0)
    r.ack(4, latest=10, now=1.5, timeout=1.0)
    assert r.retries == 0 and r.deadline == 2.5
    r.ack(2, latest=10, now=1.6, timeout=1.0)  # old ack: nothing changes
    assert r.acked == 4 and r.deadline == 2.5


def test_ack_beyond_what_was_sent_is_clamped() -> None:
    r = Reliable(acked=0)
    r.ack(99, latest=5, now=0.0, timeout=1.0)
    assert r.acked == 5 and r.deadline == 0.0


@given(st.lists(st.tuples(st.sampled_from(["send", "ack", "tick"]), st.integers(0, 30))))
def test_acked_never_decreases_nor_passes_latest(steps: list[tuple[str, int]]) -> None:
    r = Reliable(acked=0)
    latest, now = 0, 0.0
    for op, n in steps:
        now += 0.5
        if op == "send":
            latest += n
            r.sent(latest, now, 1.0)
        elif op == "ack":
            before = r.acked
            r.ack(n, latest, now, 1.0)
            assert r.acked >= before
            if r.acked > before:
                assert r.retries == 0  # progress resets the backoff
        elif r.due(now):
            r.resent(now, 1.0)
        assert r.acked <= latest
        # A clock runs exactly while something is outstanding.
        assert (r.deadline != 0.0) == (latest > r.acked)
