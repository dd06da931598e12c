"""shardchat.brokers.segments: named shared memory and doorbells, and the sweep
that unlinks what a supervisor that is gone left behind (and only that)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from shardchat.brokers.segments import (
    Doorbell,
    Segment,
    bell_name,
    leftover_names,
    ring_name,
    stored_name,
    sweep_stale,
    unlink_all,
)


def gone_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.fixture
def owner() -> Iterator[int]:
    """A supervisor pid that no live process has: every name made under it is unlinked."""
    pid = gone_pid()
    try:
        yield pid
    finally:
        unlink_all(pid)


def test_a_segment_is_shared_by_name(owner: int) -> None:
    made = Segment.create(ring_name(owner, 0), 4096)
    seen = Segment.attach(ring_name(owner, 0))
    try:
        made.buf[100:105] = b"hello"
        assert seen.buf[100:105] == b"hello" and len(seen.buf) == 4096
        with pytest.raises(Exception, match="exists"):
            Segment.create(ring_name(owner, 0), 4096)  # a name is created once
    finally:
        made.close()
        seen.close()


def test_a_doorbell_wakes_once_per_ring_and_drain_absorbs_the_rest(owner: int) -> None:
    bell = Doorbell(bell_name(owner, 0), create=True)
    try:
        assert not bell.wait(0)
        for _ in range(3):
            bell.ring()
        assert bell.wait(0)
        bell.absorb()
        assert not bell.wait(0)
    finally:
        bell.close()


def test_the_sweep_unlinks_a_gone_supervisors_names_and_keeps_a_live_ones(owner: int) -> None:
    live = os.getpid()  # the sweep never takes the names of the process that runs it
    made = [Segment.create(ring_name(owner, 1), 4096), Segment.create(ring_name(live, 1), 4096)]
    bell = Doorbell(bell_name(owner, 1), create=True)
    try:
        assert len(leftover_names(owner)) == 2  # the ring and the semaphore
        removed = sweep_stale()
        assert set(leftover_names(owner)) == set()
        assert {f"shardchat.{owner}.ring.1", f"sem.shardchat.{owner}.bell.1"} <= set(removed)
        assert leftover_names(live) == [f"shardchat.{live}.ring.1"]
    finally:
        for segment in made:
            segment.close()
        bell.close()
        with contextlib.suppress(Exception):
            unlink_all(live)


def test_the_sweep_keeps_the_rings_of_a_run_with_a_room_store(owner: int) -> None:
    """A gone supervisor's rings marked as a room store's (acked messages its store
    may lack) are left to that store's next start; `cleanup --all` takes them."""
    made = [Segment.create(ring_name(owner, 0), 4096), Segment.create(stored_name(owner), 8)]
    for segment in made:
        segment.close()
    names = {f"shardchat.{owner}.ring.0", f"shardchat.{owner}.stored"}
    assert set(leftover_names(owner)) == names
    assert not names & set(sweep_stale())
    assert set(leftover_names(owner)) == names
    assert names <= set(sweep_stale(keep_stored=False))
    assert leftover_names(owner) == []
