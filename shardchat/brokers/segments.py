"""POSIX shared memory and semaphores: names, create/attach/unlink, and the sweep.

The only module that uses posix_ipc and mmap. Every name starts with
``shardchat.<supervisor pid>.``, so anyone can find them in /dev/shm and a
later start can tell a live owner's names from a dead one's.
"""

from __future__ import annotations

import logging
import mmap
import os
from dataclasses import dataclass
from pathlib import Path

import posix_ipc

from shardchat.core.errors import SeqTableError
from shardchat.logs import log_event
from shardchat.ring.layout import HEADER_SIZE, segment_size
from shardchat.ring.ring import init_ring, ring_heartbeat_ns
from shardchat.ring.seqtable import SLOT_SIZE, SeqTable
from shardchat.stats import StatsView

__all__ = [
    "PREFIX",
    "Doorbell",
    "Fabric",
    "Segment",
    "bell_name",
    "leftover_names",
    "ring_name",
    "stats_name",
    "stored_name",
    "sweep_stale",
    "unlink_all",
]

log = logging.getLogger(__name__)

PREFIX = "shardchat"
SHM_DIR = Path("/dev/shm")


def ring_name(owner_pid: int, shard: int) -> str:
    return f"/{PREFIX}.{owner_pid}.ring.{shard}"


def bell_name(owner_pid: int, shard: int) -> str:
    return f"/{PREFIX}.{owner_pid}.bell.{shard}"


def stats_name(owner_pid: int) -> str:
    return f"/{PREFIX}.{owner_pid}.stats"


def stored_name(owner_pid: int) -> str:
    """A mark beside a run's rings: a room store takes from them what it lacks
    after a crash (storage/rescue.py), so only that store's next holder sweeps them."""
    return f"/{PREFIX}.{owner_pid}.stored"


@dataclass(slots=True)
class Segment:
    """A mapped shared-memory segment; ``buf`` is the mapping."""

    name: str
    buf: mmap.mmap

    @classmethod
    def create(cls, name: str, size: int) -> Segment:
        shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o600, size=size)
        try:
            buf = mmap.mmap(shm.fd, size)
        finally:
            shm.close_fd()  # the mapping survives the fd
        return cls(name, buf)

    @classmethod
    def attach(cls, name: str) -> Segment:
        shm = posix_ipc.SharedMemory(name)
        try:
            buf = mmap.mmap(shm.fd, shm.size)
        finally:
            shm.close_fd()
        return cls(name, buf)

    def close(self) -> None:
        try:
            self.buf.close()
        except BufferError:
            # A memoryview still refers to the mapping; it goes with the process.
            pass


class Doorbell:
    """A semaphore used only as a wake-up signal, never as a lock."""

    __slots__ = ("name", "sem")

    def __init__(self, name: str, *, create: bool = False) -> None:
        self.name = name
        flags = posix_ipc.O_CREX if create else 0
        self.sem = posix_ipc.Semaphore(name, flags, mode=0o600, initial_value=0)

    def ring(self) -> None:
        try:
            self.sem.release()
        except OSError:
            # EOVERFLOW: a reader that is gone let its count grow to the maximum.
            pass

    def wait(self, timeout: float) -> bool:
        """Block (GIL released) until rung or ``timeout``; True when rung."""
        try:
            self.sem.acquire(timeout)
        except posix_ipc.BusyError:
            return False
        return True

    def absorb(self) -> None:
        """Absorb posts that piled up, without blocking."""
        while True:
            try:
                self.sem.acquire(0)
            except posix_ipc.BusyError:
                return

    def close(self) -> None:
        self.sem.close()


def _unlink(entry: str) -> None:
    try:
        if entry.startswith("sem."):
            posix_ipc.unlink_semaphore("/" + entry[len("sem.") :])
        else:
            posix_ipc.unlink_shared_memory("/" + entry)
    except posix_ipc.ExistentialError:
        pass


def _owner_pid(entry: str) -> int | None:
    name = entry[len("sem.") :] if entry.startswith("sem.") else entry
    parts = name.split(".")
    if len(parts) < 3 or parts[0] != PREFIX or not parts[1].isdigit():
        return None
    return int(parts[1])


def leftover_names(owner_pid: int | None = None) -> list[str]:
    """The /dev/shm entries named by shardchat (of one owner, or of all)."""
    try:
        entries = os.listdir(SHM_DIR)
    except FileNotFoundError:
        return []
    out = []
    for entry in sorted(entries):
        pid = _owner_pid(entry)
        if pid is not None and (owner_pid is None or pid == owner_pid):
            out.append(entry)
    return out


def attach_if_present(name: str) -> Segment | None:
    """The segment named ``name``, or None when there is none."""
    try:
        return Segment.attach(name)
    except posix_ipc.ExistentialError:
        return None


def is_live(pid: int) -> bool:
    """Whether ``pid`` is a running shardchat (a reused pid that is not one is not)."""
    return _is_live_shardchat(pid)


def _is_live_shardchat(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    # A reused pid that is not a shardchat supervisor does not own the names.
    return b"shardchat" in cmdline


def sweep_stale(keep_stored: bool = True) -> list[str]:
    """Unlink the names of supervisors that are gone (but, with ``keep_stored``,
    not those of a run with a room store: its next start stores from its rings
    what the store lacks, then removes them); return what was removed."""
    removed = []
    entries = leftover_names()
    stored = {_owner_pid(e) for e in entries if e.endswith(".stored")} if keep_stored else set()
    for entry in entries:
        pid = _owner_pid(entry)
        assert pid is not None
        if pid != os.getpid() and pid not in stored and not _is_live_shardchat(pid):
            _unlink(entry)
            removed.append(entry)
    if removed:
        log_event(log, logging.WARNING, "shm_swept", names=removed)
    return removed


def unlink_all(owner_pid: int) -> None:
    """Unlink every name this owner created."""
    for entry in leftover_names(owner_pid):
        _unlink(entry)


class Fabric:
    """The supervisor's shared memory: one segment and one doorbell per shard.

    The supervisor creates every name before the first fork, writes ring
    headers, and unlinks everything at exit. Shards attach by name.
    """

    def __init__(
        self,
        owner_pid: int,
        workers: int,
        ring_bytes: int,
        table_slots: int,
        addr_capacity: int = 0,
        *,
        stored: bool = False,
    ) -> None:
        """``stored``: a room store takes from these rings after a crash (:func:`stored_name`)."""
        self.owner_pid = owner_pid
        self.segments: list[Segment] = []
        self.bells: list[Doorbell] = []
        self.stats: Segment | None = None
        size = segment_size(ring_bytes, table_slots, SLOT_SIZE)
        try:
            self.stats = Segment.create(
                stats_name(owner_pid), StatsView.segment_size(workers, addr_capacity)
            )
            for shard in range(workers):
                segment = Segment.create(ring_name(owner_pid, shard), size)
                self.segments.append(segment)
                init_ring(memoryview(segment.buf), ring_bytes, table_slots)
                self.bells.append(Doorbell(bell_name(owner_pid, shard), create=True))
            if stored:
                Segment.create(stored_name(owner_pid), 8).close()
        except BaseException:
            self.close()
            raise

    def seed_table(self, shard: int, seqs: dict[str, int], ring_bytes: int, slots: int) -> int:
        """Write ``seqs`` (room -> seq) into ``shard``'s seq table before it starts
        (the room store's rooms, so that every shard knows where each room is from
        its first request); the rooms that did not fit."""
        buf = memoryview(self.segments[shard].buf)
        start = HEADER_SIZE + ring_bytes
        table = SeqTable(buf[start : start + slots * SLOT_SIZE], slots)
        left = 0
        for room, seq in seqs.items():
            try:
                offset = table.slot(room)
            except SeqTableError:
                offset = None
            if offset is None:
                left += 1
            else:
                table.set_seq(offset, seq)
        return left  # the views go with this frame: the segment can be closed

    def heartbeat_ns(self, shard: int) -> int:
        """When the shard's loop last beat (CLOCK_MONOTONIC ns, one clock per box)."""
        return ring_heartbeat_ns(memoryview(self.segments[shard].buf))

    def close(self, keep: bool = False) -> None:
        """Let go of everything; unlink the names unless ``keep`` (the next start
        stores from our rings what a room store could not, then sweeps them)."""
        for segment in self.segments:
            segment.close()
        if self.stats is not None:
            self.stats.close()
        for bell in self.bells:
            bell.close()
        if not keep:
            unlink_all(self.owner_pid)
