"""Connections per client address over the whole server, in the stats segment.

``server.max_per_ip`` is a whole-server limit, like ``max_connections``: each
shard counts its own open connections per address in its own table, and
admission sums that address over every shard's table. Pure: a view over a
memoryview of u64 slots, no I/O.

Each shard's table is ``capacity`` entries of two u64 (key, count), open
addressing with linear probing. The key is a 64-bit hash of the address,
never 0 (0 = never used). An entry whose count fell to 0 keeps its key, so
that probe chains never break, and is reused by the next new address that
probes past it. One writer per table (its shard): a new entry's key is stored
before its count; a reader of another shard's table that sees an entry being
reused sees count 0 or 1, which is right either way. Two shards admitting
the same address at the same instant may each let one connection over,
as with ``max_connections``.
"""

from __future__ import annotations

import hashlib

__all__ = ["AddrTable", "PeerTable", "addr_key", "table_capacity"]

ENTRY_SLOTS = 2  # key, count


def addr_key(address: str) -> int:
    return int.from_bytes(hashlib.blake2b(address.encode(), digest_size=8).digest(), "little") | 1


def table_capacity(max_per_ip: int, max_connections: int, workers: int) -> int:
    """Entries per shard: 0 when ``max_per_ip`` is off, else a power of two at
    least twice a shard's share of ``max_connections`` (so probe chains stay
    short), from 1,024 to 2**20."""
    if not max_per_ip:
        return 0
    share = -(-max_connections // workers)
    capacity = 1024
    while capacity < 2 * share and capacity < 1 << 20:
        capacity *= 2
    return capacity


class AddrTable:
    """Every shard's table over ``slots``; ``shard`` is the one this process writes."""

    __slots__ = ("capacity", "mask", "shard", "tables")

    def __init__(self, slots: memoryview, workers: int, capacity: int, shard: int | None) -> None:
        assert capacity & (capacity - 1) == 0
        size = capacity * ENTRY_SLOTS
        self.tables = [slots[i * size : (i + 1) * size] for i in range(workers)]
        self.capacity = capacity
        self.mask = capacity - 1
        self.shard = shard

    @staticmethod
    def slots_needed(workers: int, capacity: int) -> int:
        return workers * capacity * ENTRY_SLOTS

    def _find(self, table: memoryview, key: int) -> int:
        """The entry holding ``key``, or -1."""
        mask = self.mask
        i = key & mask
        for _ in range(self.capacity):
            k = table[i * 2]
            if k == key:
                return i
            if k == 0:
                return -1
            i = (i + 1) & mask
        return -1

    def total(self, key: int) -> int:
        """Open connections of this address on every shard."""
        count = 0
        for table in self.tables:
            i = self._find(table, key)
            if i >= 0:
                count += table[i * 2 + 1]
        return count

    def add(self, key: int) -> bool:
        """Count one more connection of ``key`` here; False when the table is full."""
        assert self.shard is not None
        table = self.tables[self.shard]
        mask = self.mask
        i = key & mask
        free = -1
        for _ in range(self.capacity):
            k = table[i * 2]
            if k == key:
                table[i * 2 + 1] += 1
                return True
            if k == 0 or (free < 0 and table[i * 2 + 1] == 0):
                if free < 0:
                    free = i
                if k == 0:
                    break
            i = (i + 1) & mask
        if free < 0:
            return False
        table[free * 2] = key  # the key first: a reader never sees a count under a wrong key
        table[free * 2 + 1] = 1
        return True

    def remove(self, key: int) -> None:
        assert self.shard is not None
        table = self.tables[self.shard]
        i = self._find(table, key)
        if i >= 0 and table[i * 2 + 1]:
            table[i * 2 + 1] -= 1

    def clear(self, shard: int) -> None:
        """Forget a shard's counts: its connections died with it."""
        table = self.tables[shard]
        for i in range(len(table)):
            table[i] = 0

    def release(self) -> None:
        self.tables = []


class PeerTable:
    """The room engine's :class:`~shardchat.core.interfaces.PeerCounts` over an
    :class:`AddrTable`: addresses in, their keys hashed here."""

    __slots__ = ("table",)

    def __init__(self, table: AddrTable) -> None:
        self.table = table

    def total(self, peer: str) -> int:
        return self.table.total(addr_key(peer))

    def add(self, peer: str) -> bool:
        return self.table.add(addr_key(peer))

    def remove(self, peer: str) -> None:
        self.table.remove(addr_key(peer))
