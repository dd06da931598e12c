"""Silent shards: take a quiet one's listener out of the port, SIGKILL a stuck one."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import time

from shardchat.brokers import segments
from shardchat.core.config import ServerConfig
from shardchat.logs import log_event
from shardchat.stats import Slot, StatsView
from shardchat.supervisor.slots import ShardSlot

__all__ = ["kill_stuck"]

# The supervisor's logger: these events keep the name they always had.
log = logging.getLogger("shardchat.supervisor.supervisor")


def kill_stuck(
    slots: list[ShardSlot],
    fabric: segments.Fabric,
    stats: StatsView | None,
    server: ServerConfig,
) -> None:
    """SIGKILL a shard whose loop has not beaten for ``shard_timeout`` (gunicorn's
    worker timeout): a blocked loop serves nobody, and a restart does. Long before
    that (``shard_unlisten``), take its listening socket out of the port's accept
    group, so that the kernel stops queueing new clients where nobody accepts."""
    limit = server.shard_timeout
    unlisten = server.shard_unlisten
    if not limit and not unlisten:
        return
    now_ns = time.monotonic_ns()
    for slot in slots:
        if slot.process is None or slot.killed_stuck:
            continue
        # A new incarnation counts from its start until its first beat.
        last = max(fabric.heartbeat_ns(slot.shard_id), slot.started_ns)
        silent = now_ns - last
        if unlisten and silent > unlisten * 1e9 and not slot.unlistened:
            slot.unlistened = True
            _unlisten(stats, slot, silent, server.port)
        elif slot.unlistened and silent < unlisten * 1e9:
            slot.unlistened = False  # it beats again (and listens again by itself)
        if limit and silent > limit * 1e9:
            log_event(
                log,
                logging.ERROR,
                "shard_stuck",
                shard_id=slot.shard_id,
                pid=slot.pid,
                silent_s=round((now_ns - last) / 1e9, 1),
            )
            slot.killed_stuck = True
            os.kill(slot.process.pid, signal.SIGKILL)


def _unlisten(stats: StatsView | None, slot: ShardSlot, silent_ns: int, port: int) -> None:
    """Shut down a silent shard's listening socket (through a duplicate taken with
    pidfd_getfd): Linux then drops it from the SO_REUSEPORT group, resets the
    connections queued on it, and sends new ones to the other shards."""
    if stats is None or slot.process is None:
        return
    block = stats.blocks[slot.shard_id]
    fd = int(block[Slot.LISTEN_FD])
    if not fd:
        slot.unlistened = False  # not listening yet (still recovering): later
        return
    try:
        dup = _pidfd_getfd(int(slot.process.pid), fd)
    except OSError as exc:
        log_event(
            log,
            logging.WARNING,
            "shard_unlisten_failed",
            shard_id=slot.shard_id,
            error=str(exc),
        )
        return
    try:
        sock = socket.socket(fileno=dup)
    except OSError:
        os.close(dup)  # not a socket: the shard has moved on
        return
    with sock:
        try:
            # The descriptor must still be that shard's listener on our port.
            if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                return
            if sock.getsockname()[1] != port:
                return
            sock.shutdown(socket.SHUT_RD)
        except OSError:
            return
    block[Slot.UNLISTENED] = 1
    log_event(
        log,
        logging.ERROR,
        "shard_unlisten",
        shard_id=slot.shard_id,
        pid=slot.pid,
        silent_s=round(silent_ns / 1e9, 1),
    )


_SYS_PIDFD_GETFD = 438  # the same number on x86-64 and aarch64 (Linux 5.6)


def _pidfd_getfd(pid: int, fd: int) -> int:
    """A duplicate of process ``pid``'s descriptor ``fd`` (pidfd_getfd(2); Python has
    no wrapper). Needs ptrace rights over the child, which its parent has."""
    pidfd = os.pidfd_open(pid)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        dup = int(libc.syscall(_SYS_PIDFD_GETFD, pidfd, fd, 0))
        if dup < 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))
        return dup
    finally:
        os.close(pidfd)
