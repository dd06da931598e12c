"""The token bucket: burst, sustained rate, and never more than it allows."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from shardchat.core.ratelimit import TokenBucket


def test_burst_then_refill() -> None:
    bucket = TokenBucket(burst=3, now=0.0)
    assert [bucket.take(0.0, rate=2.0, burst=3) for _ in range(4)] == [True, True, True, False]
    assert not bucket.take(0.4, rate=2.0, burst=3)  # 0.8 token
    assert bucket.take(0.5, rate=2.0, burst=3)  # 1.0 token
    assert bucket.take(100.0, rate=2.0, burst=3) and bucket.tokens == 2.0  # capped at burst


def test_a_refused_take_costs_nothing() -> None:
    bucket = TokenBucket(burst=1, now=0.0)
    assert bucket.take(0.0, 1.0, 1)
    for _ in range(10):
        assert not bucket.take(0.5, 1.0, 1)
    assert bucket.take(1.0, 1.0, 1)


@given(
    rate=st.floats(0.1, 100),
    burst=st.integers(1, 50),
    gaps=st.lists(st.floats(0, 2), min_size=1, max_size=200),
)
def test_never_more_than_burst_plus_rate_times_time(
    rate: float, burst: int, gaps: list[float]
) -> None:
    bucket = TokenBucket(burst, 0.0)
    now = 0.0
    taken = 0
    for gap in gaps:
        now += gap
        taken += bucket.take(now, rate, burst)
    assert taken <= burst + rate * now + 1e-6
