"""A shard that cannot boot exits with the boot-failure code, so that the
supervisor stops instead of restarting it for ever: a segment whose header is
not a shardchat ring (a RingLayoutError) counts, as a port in use does."""

from __future__ import annotations

import multiprocessing
import os

from shardchat.brokers.segments import Fabric
from shardchat.configload import load_config
from shardchat.ring.layout import OFF_MAGIC, U64
from shardchat.shard.process import EXIT_BOOT_ERROR, ShardSpec, run_shard


def test_a_ring_with_a_bad_header_is_a_boot_failure() -> None:
    config = load_config(
        overrides={"server.workers": 1, "ring.bytes": 1 << 20, "ring.rooms": 16}, environ={}
    )
    fabric = Fabric(os.getpid(), 1, config.ring.bytes, config.ring.rooms)
    try:
        # Not a shardchat ring any more: the magic number is gone.
        U64.pack_into(fabric.segments[0].buf, OFF_MAGIC, 0)
        spec = ShardSpec(
            config=config, shard_id=0, epoch="e", supervisor_pid=os.getpid(), incarnation=0
        )
        child = multiprocessing.get_context("fork").Process(target=run_shard, args=(spec,))
        child.start()
        child.join(30)
        assert child.exitcode == EXIT_BOOT_ERROR
    finally:
        fabric.close()
