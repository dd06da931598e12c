"""The dashboard's time series: one sample a second of the shards' stats blocks, kept
for a few minutes in the supervisor.

Each sample turns the counters' growth since the previous one into rates
(messages in/s, deliveries/s) and the latency histogram's growth into the
p50/p99 of the messages delivered in that second, so that the dashboard draws
what happened then, not averages since the start. Pure: the caller passes the
blocks and the time.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from shardchat import stats
from shardchat.stats import Counters, Slot

__all__ = ["HISTORY", "Sampler", "percentile"]

HISTORY = 300  # samples kept: five minutes at one a second
_BUCKETS = len(stats.LATENCY_BUCKETS_MS) + 1  # the bounds, then +Inf


@dataclass(frozen=True, slots=True)
class _Reading:
    """The counters a sample compares with the previous reading."""

    at: float  # seconds (the supervisor's monotonic clock)
    published: int
    delivered: int
    latency: tuple[int, ...]  # per bucket, over all shards


def percentile(counts: Sequence[int], q: float) -> float | None:
    """The ``q`` quantile (0-1) in ms of a histogram's counts per bucket, interpolated
    linearly inside its bucket (as Prometheus' histogram_quantile); None when empty.
    Past the last bound it is that bound."""
    total = sum(counts)
    if not total:
        return None
    rank = q * total
    seen = 0
    bounds = stats.LATENCY_BUCKETS_MS
    for i, count in enumerate(counts):
        if count and seen + count >= rank:
            if i >= len(bounds):
                return float(bounds[-1])
            low = bounds[i - 1] if i else 0.0
            return low + (bounds[i] - low) * (rank - seen) / count
        seen += count
    return float(bounds[-1])


class Sampler:
    """Samples taken once a second, the last ``HISTORY`` of them."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.samples: deque[tuple[int, dict[str, object]]] = deque(maxlen=HISTORY)
        self._last: _Reading | None = None

    def sample(
        self, blocks: Sequence[Counters], alive: Sequence[bool], now: float, wall: float
    ) -> None:
        """Read the blocks at ``now`` (monotonic s); ``wall`` (Unix s) labels the sample."""
        reading = _Reading(
            now,
            sum(block[Slot.MESSAGES_PUBLISHED] for block in blocks),
            sum(block[Slot.FRAMES_DELIVERED] for block in blocks),
            tuple(sum(block[stats.LATENCY_BASE + i] for block in blocks) for i in range(_BUCKETS)),
        )
        last, self._last = self._last, reading
        if last is None:
            return  # rates need two readings
        elapsed = max(1e-3, reading.at - last.at)
        # A restarted shard's block starts again at 0: clamp so that a restart does not
        # draw a negative rate.
        recent = [max(0, new - old) for new, old in zip(reading.latency, last.latency, strict=True)]
        p50, p99 = percentile(recent, 0.5), percentile(recent, 0.99)
        shards = []
        for shard, (block, up) in enumerate(zip(blocks, alive, strict=True)):
            lag = max(
                (block[stats.LAG_BASE + peer] for peer in range(self.workers) if peer != shard),
                default=0,
            )
            shards.append(
                {"connections": block[Slot.CONNECTIONS] if up else 0, "lag": lag if up else 0}
            )
        t = round(wall * 1000)
        self.samples.append(
            (
                t,
                {
                    "t": t,
                    "connections": sum(s["connections"] for s in shards),
                    "messages_in": round(max(0, reading.published - last.published) / elapsed, 1),
                    "deliveries": round(max(0, reading.delivered - last.delivered) / elapsed, 1),
                    "p50_ms": None if p50 is None else round(p50, 3),
                    "p99_ms": None if p99 is None else round(p99, 3),
                    "shards": shards,
                },
            )
        )

    def since(self, after: int) -> list[dict[str, object]]:
        """The samples newer than ``after`` (a sample's ``t``; 0: all of them)."""
        return [sample for t, sample in self.samples if t > after]
