"""Prometheus metrics, summed over the shards' stats blocks (served by the supervisor).

A prometheus-client collector reads the stats segment when /metrics is
scraped; the exposition format is prometheus-client's. Per-shard values keep
a ``shard`` label where they matter (connections, rooms, ring lag); the rest
are summed over the shards.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Callable, Iterator, Sequence

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from shardchat import __version__, stats
from shardchat.procstat import cpu_and_rss
from shardchat.stats import Slot, StatsView

__all__ = ["ShardchatCollector", "make_registry"]

_COUNTERS: tuple[tuple[Slot, str, str], ...] = (
    (Slot.CONNECTIONS_OPENED, "connections_opened", "WebSocket connections opened"),
    (Slot.JOINS, "joins", "Room joins"),
    (Slot.LEAVES, "leaves", "Room leaves (explicit or by disconnect)"),
    (Slot.MESSAGES_PUBLISHED, "messages_published", "Messages accepted from clients"),
    (Slot.MESSAGES_SEQUENCED, "messages_sequenced", "Messages sequenced by their room's owner"),
    (Slot.FRAMES_DELIVERED, "frames_delivered", "Room message frames written to members"),
    (Slot.BYTES_OUT, "delivered_bytes", "Bytes of room message frames written to members"),
    (Slot.RATE_LIMITED, "rate_limited", "Messages refused by the rate limit"),
    (Slot.SLOW_CONSUMER_CLOSES, "slow_consumer_closes", "Connections closed with 4429"),
    (Slot.RESENDS, "resends", "Messages resent to reliable clients"),
    (Slot.RING_RECORDS_WRITTEN, "ring_records_written", "Records written to the shard's ring"),
    (Slot.RING_RECORDS_READ, "ring_records_read", "Records read from peers' rings"),
    (Slot.RING_LAPS, "ring_laps", "Times a reader was lapped by a peer's writer"),
    (Slot.RING_RECORDS_LOST, "ring_records_lost", "Records lost to laps (approximate)"),
    (Slot.GAPS_LOST, "gaps_lost", "Seq ranges lost to laps that the owner no longer held"),
    (Slot.FORWARDS_RETRIED, "forwards_retried", "Publishes forwarded to an owner again"),
    (Slot.HOOK_ERRORS, "hook_errors", "Lifecycle hooks that raised"),
    (Slot.HTTP_REFUSED, "upgrades_refused", "Upgrades refused before the handshake"),
    (Slot.REDIS_ROUND_TRIPS, "redis_round_trips", "Redis pipelines and commands sent"),
    (Slot.REDIS_BATCHES, "redis_publish_batches", "Publish pipelines sent to Redis"),
    (Slot.REDIS_BATCHED_MESSAGES, "redis_batched_messages", "Publishes those pipelines carried"),
    (Slot.REDIS_ERRORS, "redis_errors", "Redis calls that failed"),
    (Slot.REDIS_MESSAGES_RECEIVED, "redis_messages_received", "Room messages from Redis pub/sub"),
    (Slot.REDIS_STREAM_READS, "redis_stream_reads", "Reads of rooms' Redis streams"),
    (Slot.REDIS_RECONNECTS, "redis_reconnects", "Reconnections to Redis"),
    (Slot.WEBHOOK_EVENTS_SENT, "webhook_events_sent", "Webhook events the receiver took"),
    (Slot.WEBHOOK_EVENTS_DROPPED, "webhook_events_dropped", "Webhook events given up"),
    (Slot.WEBHOOK_POSTS_FAILED, "webhook_posts_failed", "Webhook POSTs that failed"),
    (Slot.PROXY_CALLS, "proxy_calls", "Connect and publish proxy requests"),
    (Slot.PROXY_FAILURES, "proxy_failures", "Proxy requests that timed out or failed"),
)

# Gauges kept per shard (a ``shard`` label), in the order they are exposed.
_SHARD_GAUGES: tuple[tuple[Slot, str, str], ...] = (
    (Slot.CONNECTIONS, "connections", "Open WebSocket connections"),
    (Slot.ROOMS, "rooms", "Rooms with members"),
    (Slot.REDIS_UP, "redis_up", "1 while the shard's Redis connection works"),
    (
        Slot.REDIS_SUBSCRIBED_ROOMS,
        "redis_subscribed_rooms",
        "Rooms whose Redis channel the shard subscribes to",
    ),
    (Slot.WEBHOOK_QUEUED, "webhook_queued", "Webhook events waiting for delivery"),
    (
        Slot.WEBHOOK_HELD_PEAK,
        "webhook_held_peak",
        "Most webhook events a shard held at once (queued and in flight)",
    ),
    (
        Slot.WEBHOOK_HELD_BYTES_PEAK,
        "webhook_held_bytes_peak",
        "Most bytes of webhook events a shard held at once",
    ),
)

Processes = Callable[[], Sequence[tuple[str, int]]]


def process_sample(pid: int) -> tuple[float, float, int] | None:
    """(CPU seconds, resident bytes, open fds) of a live process, from /proc."""
    try:
        cpu, rss = cpu_and_rss(pid)
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None  # gone between the listing and the read
    return cpu, rss, fds


class ShardchatCollector(Collector):
    def __init__(
        self, view: StatsView, restarts: Callable[[], list[int]], processes: Processes
    ) -> None:
        self.view = view
        self.restarts = restarts  # per shard, from the supervisor
        self.processes = processes  # ("supervisor" | "shard-N", pid) of the live ones

    def collect(self) -> Iterator[Metric]:
        view = self.view
        blocks = view.blocks
        shards = [str(i) for i in range(len(blocks))]
        for slot, name, doc in _SHARD_GAUGES:
            gauge = GaugeMetricFamily(f"shardchat_{name}", doc, labels=["shard"])
            for shard, block in zip(shards, blocks, strict=True):
                gauge.add_metric([shard], block[slot])
            yield gauge
        for slot, name, doc in _COUNTERS:
            yield CounterMetricFamily(f"shardchat_{name}", doc, value=view.total(slot))
        closed = CounterMetricFamily(
            "shardchat_connections_closed", "Connections closed, by close code", labels=["code"]
        )
        for code in stats.CLOSE_CODES:
            label = str(code) if code else "other"
            closed.add_metric([label], view.total(stats.close_code_slot(code)))
        yield closed
        errors = CounterMetricFamily(
            "shardchat_errors", "Error frames sent, by code", labels=["code"]
        )
        for error_code in stats.ERROR_CODES:
            errors.add_metric([error_code], view.total(stats.error_slot(error_code)))
        yield errors
        overloaded = CounterMetricFamily(
            "shardchat_overloaded",
            "Publishes refused `overloaded`, by the bounded queue that was full",
            labels=["queue"],
        )
        for queue in stats.OVERLOAD_QUEUES:
            overloaded.add_metric([queue], view.total(stats.overload_slot(queue)))
        yield overloaded
        restarts = CounterMetricFamily(
            "shardchat_shard_restarts", "Shard restarts", labels=["shard"]
        )
        for shard, count in zip(shards, self.restarts(), strict=True):
            restarts.add_metric([shard], count)
        yield restarts
        lag = GaugeMetricFamily(
            "shardchat_ring_lag_bytes",
            "Bytes of a peer's ring a shard has not read yet",
            labels=["shard", "peer"],
        )
        for shard, block in zip(shards, blocks, strict=True):
            for peer in shards:
                if peer != shard:
                    lag.add_metric([shard, peer], block[stats.LAG_BASE + int(peer)])
        yield lag
        yield self._latency()
        yield from self._api()
        yield InfoMetricFamily(
            "shardchat_build",
            "The running shardchat",
            value={"version": __version__, "python": platform.python_version()},
        )
        yield from self._process_metrics()

    def _process_metrics(self) -> Iterator[Metric]:
        """process_* of the supervisor and of each shard, labelled by process."""
        cpu = CounterMetricFamily(
            "process_cpu_seconds", "User and system CPU time", labels=["process"]
        )
        rss = GaugeMetricFamily(
            "process_resident_memory_bytes", "Resident memory size", labels=["process"]
        )
        fds = GaugeMetricFamily("process_open_fds", "Open file descriptors", labels=["process"])
        for name, pid in self.processes():
            sample = process_sample(pid)
            if sample is not None:
                cpu.add_metric([name], sample[0])
                rss.add_metric([name], sample[1])
                fds.add_metric([name], sample[2])
        yield cpu
        yield rss
        yield fds

    def _latency(self) -> Metric:
        return self._histogram(
            "shardchat_delivery_latency_seconds",
            "Publish-to-delivery time of room messages, across shards",
            stats.LATENCY_BASE,
            Slot.LATENCY_SUM_US,
        )

    def _histogram(self, name: str, doc: str, base: int, sum_slot: int) -> Metric:
        """A latency histogram: ``LATENCY_BUCKETS_MS`` counts from slot ``base``
        (and one over the last bound), their sum in microseconds at ``sum_slot``."""
        view = self.view
        buckets: list[tuple[str, float]] = []
        cumulative = 0
        for i, bound in enumerate(stats.LATENCY_BUCKETS_MS):
            cumulative += view.total(base + i)
            buckets.append((repr(bound / 1000), cumulative))
        cumulative += view.total(base + len(stats.LATENCY_BUCKETS_MS))
        buckets.append(("+Inf", cumulative))
        return HistogramMetricFamily(
            name, doc, buckets=buckets, sum_value=view.total(sum_slot) / 1e6
        )

    def _api(self) -> Iterator[Metric]:
        """The server API: calls by method and outcome, refusals by code, latency."""
        view = self.view
        calls = CounterMetricFamily(
            "shardchat_api_calls",
            "Server API calls, by method and outcome (ok or refused)",
            labels=["method", "outcome"],
        )
        for i, method in enumerate(stats.API_METHODS):
            calls.add_metric([method, "ok"], view.total(stats.API_CALLS_BASE + 2 * i))
            calls.add_metric([method, "refused"], view.total(stats.API_CALLS_BASE + 2 * i + 1))
        yield calls
        refused = CounterMetricFamily(
            "shardchat_api_refused", "Server API calls refused, by error code", labels=["code"]
        )
        for i, code in enumerate(stats.API_ERROR_CODES):
            refused.add_metric([code], view.total(stats.API_ERRORS_BASE + i))
        yield refused
        yield self._histogram(
            "shardchat_api_latency_seconds",
            "Server API calls, from the request's body to the answer",
            stats.API_LATENCY_BASE,
            stats.API_LATENCY_SUM_US,
        )


def make_registry(
    view: StatsView, restarts: Callable[[], list[int]], processes: Processes
) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ShardchatCollector(view, restarts, processes))
    return registry
