"""The latency histogram's slots: each bound is inclusive, past the last is +Inf."""

from __future__ import annotations

from shardchat import stats


def test_latency_slots_take_each_bound_inclusively() -> None:
    buckets = stats.LATENCY_BUCKETS_MS
    base = stats.LATENCY_BASE
    assert stats.latency_slot(-1.0) == base
    for i, bound in enumerate(buckets):
        assert stats.latency_slot(bound) == base + i
        assert stats.latency_slot(bound * 1.0001) == base + i + 1
    assert stats.latency_slot(1e12) == base + len(buckets)
