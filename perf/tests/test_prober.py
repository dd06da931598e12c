"""perf.lib.prober's pure parts: the ping frame, the pong's
stamp, the percentile, the schedule's arithmetic, and when it calls itself the limit."""

from __future__ import annotations

import math

import orjson

from perf.lib.prober import (
    LAGGING_MS,
    Samples,
    Schedule,
    percentile,
    ping_frame,
    pong_stamp,
    summarise,
)


def test_ping_frame_is_a_masked_text_frame_carrying_its_due_time_and_connection() -> None:
    frame = ping_frame(1_234_567_890_123, 42)
    assert frame[0] == 0x81  # FIN, text
    assert frame[1] & 0x80  # masked, as a client's frame must be
    n = frame[1] & 0x7F
    mask, payload = frame[2:6], frame[6:]
    assert len(payload) == n
    unmasked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    assert orjson.loads(unmasked) == {"type": "ping", "t": 1_234_567_890_123, "c": 42}


def test_pong_stamp_reads_both_servers_spacing_and_ignores_other_frames() -> None:
    assert pong_stamp(b'{"type":"pong","t":123456,"c":7}') == (123456, 7)
    assert pong_stamp(b'{"type": "pong", "t": 123456, "c": 7}') == (123456, 7)
    assert pong_stamp(b'{"type":"welcome","user":"probe","shard":0}') is None
    assert pong_stamp(b'{"type":"pong","id":"x"}') is None  # not one of ours


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]  # 1..100
    assert percentile(values, 50) == 51.0
    assert percentile(values, 99) == 100.0
    assert percentile(values, 100) == 100.0
    assert percentile(values, 0) == 1.0
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0  # unsorted input
    assert math.isnan(percentile([], 99))


def test_schedule_spreads_each_connections_pings_over_the_period() -> None:
    s = Schedule(start_ns=1_000, conns=1000, period_s=1.0)
    assert s.interval_ns == 1_000_000  # 1,000 pings/s: one every millisecond
    assert [s.due(k) for k in (0, 1, 999, 1000)] == [1_000, 1_001_000, 999_001_000, 1_000_001_000]
    assert [s.conn(k) for k in (0, 1, 999, 1000, 1001)] == [0, 1, 999, 0, 1]
    assert s.total(30) == 30_000
    odd = Schedule(start_ns=0, conns=3, period_s=1.0)  # a third of a second apart
    assert [odd.due(k) for k in range(4)] == [0, 333_333_333, 666_666_667, 1_000_000_000]
    assert odd.total(2) == 6


def test_summary_counts_missing_pongs_and_says_when_the_prober_is_late() -> None:
    on_time = Samples(rtts_ms=[0.1] * 99, lags_ms=[0.001] * 100, sent=100)
    out = summarise(on_time, cpu_share=0.2, seconds=1)
    assert out["missing"] == 1 and out["pongs"] == 99
    assert out["rtt_ms"]["p99"] == 0.1 and not out["client_limited"]
    late = Samples(rtts_ms=[1.0] * 100, lags_ms=[LAGGING_MS * 4] * 100, sent=100)
    assert summarise(late, cpu_share=0.2, seconds=1)["client_limited"]
    busy = Samples(rtts_ms=[0.1] * 100, lags_ms=[0.001] * 100, sent=100)
    assert summarise(busy, cpu_share=0.95, seconds=1)["client_limited"]


def test_summary_lists_the_slowest_pings_first() -> None:
    s = Samples(rtts_ms=[0.1, 5.0, 2.0], lags_ms=[0.0] * 3, sent=3)
    s.worst = [(0.1, 0.0, 0), (2.0, 0.002, 2), (5.0, 0.001, 1)]
    worst = summarise(s, cpu_share=0.1, seconds=1)["worst"]
    assert [w["rtt_ms"] for w in worst] == [5.0, 2.0, 0.1]
    assert worst[0] == {"rtt_ms": 5.0, "at_s": 0.001, "conn": 1}
