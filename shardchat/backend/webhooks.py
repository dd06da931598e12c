"""The webhook sender: a shard's events, batched, signed, retried, bounded.

docs/WEBHOOKS.md. Events are queued as encoded JSON objects in a bounded
queue (``webhooks.queue``); one task takes up to ``webhooks.batch`` of them,
POSTs them as one JSON array signed the Standard Webhooks way
(:mod:`shardchat.backend.signing`), and on a failure (no answer within
``webhooks.timeout``, or a status other than 2xx) sends the same batch again
after an exponential backoff with jitter, until it is taken or its oldest
events are older than ``webhooks.max_age``: those are dropped, counted and
logged, and the rest go on. A full queue drops the new event the same way, so
a receiver that never answers costs the shard at most the queue's bound.
One batch is in flight at a time: a shard's events reach the receiver in
order, and a retried batch carries the same ``webhook-id``.
"""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
import time
from collections import deque
from collections.abc import Callable
from typing import NamedTuple

import orjson

from shardchat import stats
from shardchat.backend.http import HttpClient
from shardchat.backend.signing import secret_key, signed_headers
from shardchat.core.config import WebhooksConfig
from shardchat.core.errors import BackendError
from shardchat.core.wire import compact
from shardchat.logs import log_event

__all__ = ["BACKOFF_CAP", "BACKOFF_FIRST", "WebhookSender"]

log = logging.getLogger(__name__)

BACKOFF_FIRST = 0.1  # seconds before the first retry; doubled at each, up to the cap
BACKOFF_CAP = 5.0
_S_QUEUED = int(stats.Slot.WEBHOOK_QUEUED)
_S_SENT = int(stats.Slot.WEBHOOK_EVENTS_SENT)
_S_DROPPED = int(stats.Slot.WEBHOOK_EVENTS_DROPPED)
_S_FAILED = int(stats.Slot.WEBHOOK_POSTS_FAILED)
_S_HELD_PEAK = int(stats.Slot.WEBHOOK_HELD_PEAK)
_S_HELD_BYTES_PEAK = int(stats.Slot.WEBHOOK_HELD_BYTES_PEAK)


class _Queued(NamedTuple):
    at: float  # monotonic seconds when it was queued (for webhooks.max_age)
    json: bytes


class WebhookSender:
    """One shard's outgoing events. :meth:`emit` never blocks nor raises."""

    def __init__(
        self,
        config: WebhooksConfig,
        shard: int,
        box: str,
        counters: stats.Counters,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.shard = shard
        self.box = box
        self.kinds = frozenset(config.events)
        self.counters = counters
        self.clock = clock
        self.wall = wall
        self.client = HttpClient(config.url, connections=1, timeout=config.timeout)
        self.key = secret_key(config.secret)
        self.queue: deque[_Queued] = deque()
        self._prefix = f"{shard}-{secrets.token_hex(4)}-"
        self._counter = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._failing = False  # in a burst of failures: logged at its start and end only
        self._dropping = 0  # drops since the last drop log line
        # Events held (queued and in the batch in flight) and their bytes: the
        # queue's bound, webhooks.queue, counts both.
        self.held = 0
        self.held_bytes = 0

    def new_id(self) -> str:
        self._counter += 1
        return f"evt_{self._prefix}{self._counter}"

    def emit(
        self,
        kind: str,
        user: str,
        room: str | None = None,
        fields: dict[str, object] | None = None,
        *,
        event_id: str | None = None,
        when: float | None = None,
    ) -> None:
        """Queue one event (if ``kind`` is among ``webhooks.events``)."""
        if kind not in self.kinds:
            return
        if self.held >= self.config.queue:
            self._drop(1, "queue_full")
            return
        event: dict[str, object] = {
            "id": event_id or self.new_id(),
            "type": kind,
            "time": int((self.wall() if when is None else when) * 1000),
            "user": user,
        }
        if room is not None:
            event["room"] = room
        event["shard"] = self.shard
        event["box"] = self.box
        if fields:
            event.update(fields)  # a death's report names the dead shard and box here
        # Queued for up to webhooks.max_age: right-sized, not orjson's 4 KB buffer.
        data = compact(orjson.dumps(event))
        self.queue.append(_Queued(self.clock(), data))
        self._hold(1, len(data))
        self._wake.set()

    def _hold(self, count: int, size: int) -> None:
        counters = self.counters
        self.held += count
        self.held_bytes += size
        counters[_S_QUEUED] = len(self.queue)
        if self.held > counters[_S_HELD_PEAK]:
            counters[_S_HELD_PEAK] = self.held
        if self.held_bytes > counters[_S_HELD_BYTES_PEAK]:
            counters[_S_HELD_BYTES_PEAK] = self.held_bytes

    def _drop(self, count: int, why: str) -> None:
        self.counters[_S_DROPPED] += count
        if not self._dropping:
            log_event(log, logging.WARNING, "webhook_events_dropped", why=why, count=count)
        self._dropping += count

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self, timeout: float = 0.0) -> None:
        """Stop; with ``timeout``, first try that long to deliver what is queued."""
        if timeout and self.held:
            deadline = self.clock() + timeout
            # Queued or in flight: the last batch may be on its way.
            while self.held and self.clock() < deadline and not self._failing:
                await asyncio.sleep(0.01)
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self.client.close()

    async def _run(self) -> None:
        while True:
            if not self.queue:
                self._wake.clear()
                await self._wake.wait()
            try:
                await self._deliver_batch()
            except Exception as exc:  # a bug must not stop the shard's webhooks for good
                log_event(log, logging.ERROR, "webhook_sender_error", error=repr(exc)[:200])
                # The batch it held is gone: count what is left from the queue again.
                self.held = len(self.queue)
                self.held_bytes = sum(len(q.json) for q in self.queue)
                await asyncio.sleep(BACKOFF_FIRST)

    async def _deliver_batch(self) -> None:
        config = self.config
        queue = self.queue
        limit = self.clock() - config.max_age
        expired = 0
        while queue and queue[0].at <= limit:  # waited behind a failing batch too long
            expired += 1
            self._hold(-1, -len(queue.popleft().json))
        if expired:
            self._drop(expired, "max_age")
        if not queue:
            return
        batch = [queue.popleft() for _ in range(min(config.batch, len(queue)))]
        self.counters[_S_QUEUED] = len(queue)
        batch_id = "msg_" + secrets.token_hex(12)
        body = b"[" + b",".join(q.json for q in batch) + b"]"
        attempt = 0
        while True:
            try:
                response = await self.client.post(
                    body, signed_headers(self.key, batch_id, int(self.wall()), body)
                )
                if 200 <= response.status < 300:
                    break
                error = f"HTTP {response.status}"
            except BackendError as exc:
                error = str(exc)
            self.counters[_S_FAILED] += 1
            if not self._failing:
                self._failing = True
                log_event(
                    log, logging.WARNING, "webhook_failing", error=error, url=self.client.target
                )
            attempt += 1
            delay = min(BACKOFF_CAP, BACKOFF_FIRST * 2 ** (attempt - 1))
            delay *= 0.5 + random.random() / 2  # jitter: shards do not retry in step
            await asyncio.sleep(delay)
            # Events past webhooks.max_age are given up; the rest go as a new batch.
            limit = self.clock() - config.max_age
            kept = [q for q in batch if q.at > limit]
            if len(kept) < len(batch):
                gone = [q for q in batch if q.at <= limit]
                self._drop(len(gone), "max_age")
                self._hold(-len(gone), -sum(len(q.json) for q in gone))
                if not kept:
                    return
                batch = kept
                batch_id = "msg_" + secrets.token_hex(12)
                body = b"[" + b",".join(q.json for q in batch) + b"]"
        self._hold(-len(batch), -sum(len(q.json) for q in batch))
        self.counters[_S_SENT] += len(batch)
        if self._failing or self._dropping:
            log_event(log, logging.WARNING, "webhook_recovered", dropped_meanwhile=self._dropping)
            self._failing = False
            self._dropping = 0
