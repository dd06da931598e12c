"""The layout of a shard's counters: its slots, and the interface to count through.

A shard's block of u64 slots lives in shared memory (:mod:`shardchat.stats`
maps it); the pure core counts into whatever it is handed as
:class:`Counters` (a ``memoryview.cast('Q')`` in a shard, a list in a test),
at the fixed slots defined here.
"""

from __future__ import annotations

import enum
from bisect import bisect_left
from typing import Protocol

from shardchat.core.apicalls import METHODS
from shardchat.core.errors import API_ERRORS, ErrorCode
from shardchat.core.overload import Queue

__all__ = [
    "API_CALLS_BASE",
    "API_ERRORS_BASE",
    "API_ERROR_CODES",
    "API_LATENCY_BASE",
    "API_LATENCY_COUNT",
    "API_LATENCY_SUM_US",
    "API_METHODS",
    "BLOCK_SLOTS",
    "CLOSES_BASE",
    "CLOSE_CODES",
    "Counters",
    "ERRORS_BASE",
    "ERROR_CODES",
    "LAG_BASE",
    "LATENCY_BASE",
    "LATENCY_BUCKETS_MS",
    "OVERLOAD_BASE",
    "OVERLOAD_QUEUES",
    "Slot",
    "close_code_slot",
    "error_slot",
    "latency_slot",
    "overload_slot",
]

BLOCK_SLOTS = 512  # u64 slots per shard: 4 KiB


class Slot(enum.IntEnum):
    """Fixed slots of a shard's block. Gauges are set, the rest only grow."""

    # /status: the pid says the block is the live incarnation's, the time its uptime
    PID = 0  # gauge
    STARTED_NS = 1  # gauge: CLOCK_REALTIME ns of this incarnation's start
    CONNECTIONS = 2  # gauge: open WebSocket connections
    ROOMS = 3  # gauge: rooms with local members
    CONNECTIONS_OPENED = 4
    JOINS = 5
    LEAVES = 6
    MESSAGES_PUBLISHED = 7  # accepted from this shard's clients
    MESSAGES_SEQUENCED = 8  # sequenced here as the rooms' owner
    FRAMES_DELIVERED = 9  # room message frames written to members
    BYTES_OUT = 10  # bytes of room message frames written to members
    RATE_LIMITED = 11
    SLOW_CONSUMER_CLOSES = 12
    RESENDS = 13
    RING_RECORDS_WRITTEN = 14
    RING_RECORDS_READ = 15
    RING_LAPS = 16
    RING_RECORDS_LOST = 17
    GAPS_LOST = 18
    FORWARDS_RETRIED = 19
    HOOK_ERRORS = 20
    LATENCY_COUNT = 21  # with the sum: /status's per-shard mean delivery latency
    LATENCY_SUM_US = 22
    HTTP_REFUSED = 23  # upgrades refused before the handshake (403/400/401/503)
    LISTEN_FD = 24  # gauge: the shard's listening socket's descriptor (for the supervisor)
    UNLISTENED = 25  # set by the supervisor: it shut that socket down; the shard re-listens
    # broker.kind = "redis" (brokers/redis/)
    REDIS_UP = 26  # gauge: 1 while the shard's Redis connection works
    REDIS_ROUND_TRIPS = 27  # pipelines and commands sent
    REDIS_BATCHES = 28  # publish pipelines
    REDIS_BATCHED_MESSAGES = 29  # publishes they carried (batch size = this / batches)
    REDIS_ERRORS = 30  # failed calls (connection lost, timeout, script error)
    REDIS_SUBSCRIBED_ROOMS = 31  # gauge: rooms whose channel the shard subscribes to
    REDIS_MESSAGES_RECEIVED = 32  # room messages that came from Redis pub/sub
    REDIS_STREAM_READS = 33  # stream reads (room open, gap fill, resume)
    REDIS_RECONNECTS = 34
    # The application's backend over HTTP (shardchat/backend/)
    WEBHOOK_QUEUED = 56  # gauge: events waiting for delivery
    WEBHOOK_EVENTS_SENT = 57  # events the receiver took (2xx)
    WEBHOOK_EVENTS_DROPPED = 58  # events given up: queue full or older than webhooks.max_age
    WEBHOOK_POSTS_FAILED = 59  # POSTs that failed (timeout, no connection, not 2xx)
    PROXY_CALLS = 60  # connect and publish proxy requests
    PROXY_FAILURES = 61  # ... that timed out or failed (503 / unavailable)
    WEBHOOK_HELD_PEAK = 62  # gauge: most events held at once (queued and in flight)
    WEBHOOK_HELD_BYTES_PEAK = 63  # gauge: most bytes of events held at once


OVERLOAD_QUEUES = tuple(Queue)  # publishes refused `overloaded`, one slot per full queue
OVERLOAD_BASE = 40
assert not {int(s) for s in Slot} & set(
    range(OVERLOAD_BASE, OVERLOAD_BASE + len(OVERLOAD_QUEUES))
), "fixed slots overlap the overload ones"

ERROR_CODES = tuple(ErrorCode)  # one counter slot per code, in the enum's order
ERRORS_BASE = 64
assert OVERLOAD_BASE + len(OVERLOAD_QUEUES) <= ERRORS_BASE, "overload slots overlap the error ones"

CLOSE_CODES = (
    1000,
    1001,
    1002,
    1003,
    1006,
    1007,
    1008,
    1009,
    1011,
    1012,
    4400,
    4401,
    4403,
    4408,
    4409,
    4429,
    0,
)
CLOSES_BASE = 96  # the last, 0, counts every other code

LATENCY_BUCKETS_MS = (0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000)
LATENCY_BASE = 128  # cumulative-free counts per bucket, then one for +Inf
assert CLOSES_BASE + len(CLOSE_CODES) <= LATENCY_BASE, "close-code slots overlap the latency ones"

LAG_BASE = 192  # ring lag in bytes behind each peer (gauge), slot per peer shard
assert LAG_BASE + 256 <= BLOCK_SLOTS, "a lag slot for each of server.workers' 256 shards"

# The server API: calls per method (an unknown one counts as "other"), ok then
# refused; refusals per error code; the latency histogram, its count and sum.
API_METHODS = (*METHODS, "other")
API_ERROR_CODES = tuple(API_ERRORS)
API_CALLS_BASE = LAG_BASE + 256
API_ERRORS_BASE = API_CALLS_BASE + 2 * len(API_METHODS)
API_LATENCY_BASE = API_ERRORS_BASE + len(API_ERROR_CODES)
API_LATENCY_COUNT = API_LATENCY_BASE + len(LATENCY_BUCKETS_MS) + 1
API_LATENCY_SUM_US = API_LATENCY_COUNT + 1
assert API_LATENCY_SUM_US < BLOCK_SLOTS, "the API's slots overflow the block"


class Counters(Protocol):
    """One shard's block of slots: a ``memoryview.cast('Q')`` in a shard, a list in
    a test."""

    def __getitem__(self, slot: int, /) -> int: ...

    def __setitem__(self, slot: int, value: int, /) -> None: ...


def error_slot(code: ErrorCode) -> int:
    return ERRORS_BASE + ERROR_CODES.index(code)


def overload_slot(queue: Queue) -> int:
    return OVERLOAD_BASE + OVERLOAD_QUEUES.index(queue)


def close_code_slot(code: int | None) -> int:
    try:
        return CLOSES_BASE + CLOSE_CODES.index(code or 0)
    except ValueError:
        return CLOSES_BASE + len(CLOSE_CODES) - 1


def latency_slot(ms: float) -> int:
    """The slot of the first bucket whose bound is >= ``ms`` (+Inf past the last).

    Once per delivered message: a binary search, not a walk of the buckets."""
    return LATENCY_BASE + bisect_left(LATENCY_BUCKETS_MS, ms)
