"""The shard's sweep: a pass ticks every connection once, a slice at a time, and a
slice in chunks of SWEEP_CHUNK, each on its own loop turn (so that I/O that arrives
meanwhile waits for one chunk, not the slice)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

from shardchat.core.config import Config
from shardchat.shard.handler import Shard
from shardchat.shard.sweep import SWEEP_CHUNK, SWEEP_SLICES


class Ticked:
    def __init__(self) -> None:
        self.ticks = 0

    def tick(self, now: float, interval: float, timeout: float, idle: float) -> None:
        self.ticks += 1


class Quiet:
    """An engine's inbox and command queue with nothing in them."""

    queue: list[Any] = []
    commands: list[Any] = []


class Engine:
    inbox = Quiet()
    broker = Quiet()
    turn_due = False
    proxied_due = False

    def take_outputs(self) -> list[Any]:
        return []

    def take_events(self) -> list[Any]:
        return []

    def advance(self, mono: float, wall: float) -> None:
        pass

    def tick(self) -> None:
        pass


class Broker:
    commit_due = False

    def tick(self, now: float) -> None:
        pass


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def shard_with(loop: asyncio.AbstractEventLoop, n: int) -> tuple[Shard, list[Ticked]]:
    shard = Shard(Config(), 0, Engine(), Broker(), None, loop)  # type: ignore[arg-type]
    conns = [Ticked() for _ in range(n)]
    for conn in conns:
        shard.add(conn)  # type: ignore[arg-type]
    return shard, conns


def a_pass(shard: Shard, loop: asyncio.AbstractEventLoop, now: float) -> None:
    for _ in range(SWEEP_SLICES):
        shard.sweep(now)
        run_turns(loop, 5)


def run_turns(loop: asyncio.AbstractEventLoop, turns: int) -> None:
    for _ in range(turns):
        loop.run_until_complete(asyncio.sleep(0))


def test_a_slice_ticks_one_chunk_now_and_the_rest_on_later_turns(
    loop: asyncio.AbstractEventLoop,
) -> None:
    n = SWEEP_SLICES * SWEEP_CHUNK * 3  # a slice is three chunks
    shard, conns = shard_with(loop, n)
    shard.sweep(1.0)
    assert sum(c.ticks for c in conns) == SWEEP_CHUNK  # nothing more before the loop turns
    run_turns(loop, 5)
    assert sum(c.ticks for c in conns) == 3 * SWEEP_CHUNK  # the slice, no more


def test_a_pass_ticks_every_connection_once(loop: asyncio.AbstractEventLoop) -> None:
    shard, conns = shard_with(loop, 5003)  # not a multiple of anything
    a_pass(shard, loop, 1.0)
    assert [c.ticks for c in conns] == [1] * len(conns)
    shard.sweep(2.0)  # the next pass starts from the first again
    run_turns(loop, 5)
    assert conns[0].ticks == 2 and conns[-1].ticks == 1


def test_a_connection_added_mid_pass_is_ticked_from_the_next_and_a_closed_one_no_more(
    loop: asyncio.AbstractEventLoop,
) -> None:
    shard, conns = shard_with(loop, 2000)
    shard.sweep(1.0)  # the first pass starts
    run_turns(loop, 5)
    late, gone = Ticked(), conns[-1]
    shard.add(late)  # type: ignore[arg-type]
    shard.connections.discard(gone)  # type: ignore[arg-type]  # as Shard.closed does
    for _ in range(SWEEP_SLICES - 1):
        shard.sweep(1.0)
        run_turns(loop, 5)
    assert late.ticks == 0 and gone.ticks == 0
    assert [c.ticks for c in conns[:-1]] == [1] * (len(conns) - 1)
    a_pass(shard, loop, 2.0)
    assert late.ticks == 1 and gone.ticks == 0
    assert [c.ticks for c in conns[:-1]] == [2] * (len(conns) - 1)
    assert len(shard.sweeper.listed) == len(conns)  # the closed one is not carried


def test_a_sweep_while_chunks_are_pending_extends_the_slice(
    loop: asyncio.AbstractEventLoop,
) -> None:
    n = SWEEP_SLICES * SWEEP_CHUNK * 2
    shard, conns = shard_with(loop, n)
    shard.sweep(1.0)
    shard.sweep(1.0)  # before the first slice's second chunk ran
    run_turns(loop, 10)
    assert sum(c.ticks for c in conns) == 4 * SWEEP_CHUNK
    assert max(c.ticks for c in conns) == 1
