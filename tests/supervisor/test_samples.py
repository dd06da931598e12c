"""The dashboard's samples: rates and latency quantiles of each second, from the
growth of the shards' counters."""

from __future__ import annotations

from shardchat import stats
from shardchat.stats import BLOCK_SLOTS, Slot
from shardchat.supervisor.samples import HISTORY, Sampler, percentile


def blocks(workers: int = 2) -> list[list[int]]:
    return [[0] * BLOCK_SLOTS for _ in range(workers)]


def test_percentile_interpolates_inside_the_bucket() -> None:
    counts = [0] * (len(stats.LATENCY_BUCKETS_MS) + 1)
    assert percentile(counts, 0.5) is None
    counts[2] = 10  # (0.5, 1] ms
    assert percentile(counts, 0.5) == 0.75
    assert percentile(counts, 1.0) == 1.0
    counts[-1] = 1000  # past the last bound: that bound
    assert percentile(counts, 0.99) == stats.LATENCY_BUCKETS_MS[-1]


def test_a_sample_is_the_growth_of_one_second() -> None:
    sampler = Sampler(2)
    b = blocks()
    sampler.sample(b, [True, True], now=10.0, wall=1000.0)
    assert sampler.since(0) == []  # rates need two readings
    b[0][Slot.CONNECTIONS] = 3
    b[1][Slot.CONNECTIONS] = 4
    b[0][Slot.MESSAGES_PUBLISHED] += 50
    b[1][Slot.MESSAGES_PUBLISHED] += 50
    b[1][Slot.FRAMES_DELIVERED] += 400
    b[0][stats.latency_slot(0.3)] += 99  # (0.25, 0.5] ms
    b[1][stats.latency_slot(40)] += 1  # (25, 50] ms
    b[1][stats.LAG_BASE + 0] = 4096
    sampler.sample(b, [True, True], now=12.0, wall=1002.0)
    (sample,) = sampler.since(0)
    assert sample["t"] == 1_002_000
    assert sample["connections"] == 7
    assert sample["messages_in"] == 50.0  # 100 in two seconds
    assert sample["deliveries"] == 200.0
    assert 0.25 < sample["p50_ms"] <= 0.5  # type: ignore[operator]
    assert 0.25 < sample["p99_ms"] <= 0.5  # type: ignore[operator]
    assert sample["shards"] == [{"connections": 3, "lag": 0}, {"connections": 4, "lag": 4096}]
    # A dead shard counts nothing; a restarted one's counters start at 0 again: no
    # negative rate. Nothing delivered: no latency.
    b[1] = [0] * BLOCK_SLOTS
    sampler.sample(b, [True, False], now=13.0, wall=1003.0)
    (later,) = sampler.since(1_002_000)
    assert later["connections"] == 3 and later["messages_in"] == 0
    assert later["p50_ms"] is None and later["p99_ms"] is None


def test_five_minutes_are_kept() -> None:
    sampler = Sampler(1)
    b = blocks(1)
    for second in range(HISTORY + 10):
        sampler.sample(b, [True], now=float(second), wall=float(second))
    assert len(sampler.since(0)) == HISTORY
    assert sampler.since(0)[-1]["t"] == (HISTORY + 9) * 1000
