"""The per-address connection tables (pure): counts over every shard match a plain
model through adds, removes and reuse of emptied entries, in a table small enough
for long probe chains."""

from __future__ import annotations

import collections

from hypothesis import given
from hypothesis import strategies as st

from shardchat.addrtable import AddrTable, addr_key, table_capacity

ADDRESSES = [f"10.0.0.{i}" for i in range(40)] + ["::1", "2001:db8::7"]


def tables(workers: int, capacity: int) -> list[AddrTable]:
    buf = memoryview(bytearray(8 * AddrTable.slots_needed(workers, capacity))).cast("Q")
    return [AddrTable(buf, workers, capacity, shard) for shard in range(workers)]


@given(
    st.lists(st.tuples(st.integers(0, 2), st.sampled_from(ADDRESSES), st.booleans()), max_size=300)
)
def test_counts_match_a_model(ops: list[tuple[int, str, bool]]) -> None:
    shards = tables(3, 64)
    model: collections.Counter[tuple[int, str]] = collections.Counter()
    for shard, address, add in ops:
        key = addr_key(address)
        if add:
            assert shards[shard].add(key)
            model[shard, address] += 1
        elif model[shard, address]:
            shards[shard].remove(key)
            model[shard, address] -= 1
        for other in ADDRESSES[:5] + [address]:
            want = sum(model[s, other] for s in range(3))
            assert shards[(shard + 1) % 3].total(addr_key(other)) == want


def test_full_table_refuses_and_emptied_entries_are_reused() -> None:
    (table,) = tables(1, 1024)
    keys = [addr_key(f"10.1.{i // 256}.{i % 256}") for i in range(1024)]
    assert all(table.add(key) for key in keys)
    assert not table.add(addr_key("192.0.2.1"))
    table.remove(keys[5])
    assert table.add(addr_key("192.0.2.1"))
    assert table.total(addr_key("192.0.2.1")) == 1 and table.total(keys[5]) == 0
    assert all(table.total(key) == 1 for key in keys if key != keys[5])


def test_capacity() -> None:
    assert table_capacity(0, 100_000, 2) == 0
    assert table_capacity(2, 100, 2) == 1024
    assert table_capacity(2, 100_000, 2) == 131_072
    assert table_capacity(2, 10**9, 1) == 1 << 20
