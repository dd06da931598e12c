"""What the parts of one shard's room logic share: its config, identity, bus and loop."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from shardchat.brokers.shm import Bus
from shardchat.core.config import Config

__all__ = ["ShardContext"]


@dataclass(frozen=True, slots=True)
class ShardContext:
    config: Config
    shard_id: int
    epoch: str  # this run of the server's room sequences (PROTOCOL.md, epoch)
    bus: Bus
    loop: asyncio.AbstractEventLoop
    counters: memoryview  # this shard's block of stats slots
