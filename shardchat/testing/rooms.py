"""Room names with a chosen owner shard: how the tests and benchmarks place a room."""

from __future__ import annotations

import itertools

from shardchat.brokers.sequencer import owner_of

__all__ = ["room_owned_by"]


def room_owned_by(shard: int, workers: int = 3, prefix: str = "room") -> str:
    """The first of ``prefix``0, ``prefix``1, ... whose owner (``owner_of``: crc32
    modulo ``workers``) is ``shard``."""
    return next(
        f"{prefix}{i}" for i in itertools.count() if owner_of(f"{prefix}{i}", workers) == shard
    )
