"""Per-shard counters in shared memory: the layout, and a view to count with.

Each shard owns one block of u64 slots in the stats segment and is the only
writer of it; the supervisor sums the blocks for /metrics and /status, and
shards read each other's connection gauges to enforce
``server.max_connections`` across the whole server. After the blocks, when
``server.max_per_ip`` is set, each shard's table of connections per client
address (:mod:`shardchat.addrtable`) does the same for that limit. A slot is one native
8-byte store (``memoryview.cast('Q')``), so counting costs no lock and no
syscall; hot paths count once per batch (a flush, a read of the rings).
"""

from __future__ import annotations

from shardchat.addrtable import AddrTable
from shardchat.core import counters
from shardchat.core.counters import *  # noqa: F403 (the layout, for the I/O side to count with)
from shardchat.core.counters import BLOCK_SLOTS

__all__ = ["StatsView"]
__all__ += counters.__all__


class StatsView:
    """All shards' blocks over one buffer; ``mine`` is the block this process writes."""

    __slots__ = ("addrs", "blocks", "mine", "workers")

    def __init__(
        self, buf: memoryview, workers: int, shard: int | None, addr_capacity: int = 0
    ) -> None:
        slots = buf.cast("Q")
        self.blocks = [slots[i * BLOCK_SLOTS : (i + 1) * BLOCK_SLOTS] for i in range(workers)]
        self.mine = self.blocks[shard] if shard is not None else None
        # Connections per address on every shard; None when max_per_ip is off.
        self.addrs: AddrTable | None = None
        if addr_capacity:
            self.addrs = AddrTable(slots[workers * BLOCK_SLOTS :], workers, addr_capacity, shard)

    @staticmethod
    def segment_size(workers: int, addr_capacity: int) -> int:
        """Bytes of the stats segment: the blocks, then the address tables."""
        return 8 * (workers * BLOCK_SLOTS + AddrTable.slots_needed(workers, addr_capacity))

    def total(self, slot: int) -> int:
        return sum(block[slot] for block in self.blocks)

    def release(self) -> None:
        self.mine = None
        self.blocks = []
        if self.addrs is not None:
            self.addrs.release()
            self.addrs = None
