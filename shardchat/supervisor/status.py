"""The supervisor's /status document: each shard, the broker's health, the totals."""

from __future__ import annotations

import time
from typing import Any

from shardchat.core.config import Config, redact_url
from shardchat.stats import Slot, StatsView
from shardchat.supervisor.slots import ShardSlot

__all__ = ["status_document"]


def status_document(
    config: Config,
    slots: list[ShardSlot],
    stats: StatsView | None,
    *,
    pid: int,
    epoch: str,
    started_wall: float,
    stopping: bool,
) -> dict[str, object]:
    """The document the admin port serves at /status."""
    now = time.time()
    assert stats is not None
    blocks = stats.blocks
    shards: list[dict[str, object]] = []
    connections = 0
    for slot, block in zip(slots, blocks, strict=True):
        alive = slot.process is not None
        # The shard writes its pid and start time into its block once it has
        # attached: until then (and after it died) the block's gauges are not
        # this process's, and it has no uptime yet.
        attached = alive and block[Slot.PID] == slot.pid
        connections += block[Slot.CONNECTIONS] if alive else 0
        delivered = block[Slot.LATENCY_COUNT]
        shards.append(
            {
                "id": slot.shard_id,
                "pid": slot.pid,
                "alive": alive,
                "uptime": round(now - block[Slot.STARTED_NS] / 1e9, 3) if attached else 0,
                "restarts": slot.restarts,
                "connections": block[Slot.CONNECTIONS] if alive else 0,
                "rooms": block[Slot.ROOMS] if alive else 0,
                # Mean publish-to-delivery time of the messages this shard id
                # delivered since the server started (/metrics sums the shards).
                "latency_ms": (
                    round(block[Slot.LATENCY_SUM_US] / delivered / 1000, 3) if delivered else 0
                ),
            }
        )
    total = stats.total
    return {
        "pid": pid,
        "epoch": epoch,
        "uptime": round(now - started_wall, 3),
        "stopping": stopping,
        "broker": _broker_status_of(config, blocks, [slot.process is not None for slot in slots]),
        "shards": shards,
        "totals": {
            "connections": connections,
            "messages_published": total(Slot.MESSAGES_PUBLISHED),
            "frames_delivered": total(Slot.FRAMES_DELIVERED),
            "restarts": sum(slot.restarts for slot in slots),
        },
    }


def _broker_status_of(config: Config, blocks: list[Any], alive: list[bool]) -> dict[str, object]:
    """The broker and its health: for Redis, where, whether every live shard's
    connection works, and its counters over the box."""
    kind = config.broker.kind
    if kind != "redis":
        return {"kind": kind, "healthy": True}
    live = [block for block, up in zip(blocks, alive, strict=True) if up]
    up = [bool(block[Slot.REDIS_UP]) for block in live]
    redis = config.redis
    where = "cluster " + ",".join(redis.cluster) if redis.cluster else redact_url(redis.url)

    def total(slot: Slot) -> int:
        return sum(block[slot] for block in blocks)

    batches = total(Slot.REDIS_BATCHES)
    return {
        "kind": kind,
        "redis": where,
        "healthy": bool(live) and all(up),
        "shards_connected": sum(up),
        "subscribed_rooms": sum(block[Slot.REDIS_SUBSCRIBED_ROOMS] for block in live),
        "round_trips": total(Slot.REDIS_ROUND_TRIPS),
        "batch_size": round(total(Slot.REDIS_BATCHED_MESSAGES) / batches, 2) if batches else 0,
        "messages_received": total(Slot.REDIS_MESSAGES_RECEIVED),
        "stream_reads": total(Slot.REDIS_STREAM_READS),
        "errors": total(Slot.REDIS_ERRORS),
        "reconnects": total(Slot.REDIS_RECONNECTS),
    }
