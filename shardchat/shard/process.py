"""A shard's process: entered in the child right after the supervisor forks it.

No loop or thread exists before that (python/asyncio#347). It undoes the
supervisor's signal setup, lets go of the supervisor's descriptors, sets up
logging and runs the shard's loop (:func:`shardchat.shard.boot.serve`) under
uvloop; a shard that cannot boot exits with ``EXIT_BOOT_ERROR``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from dataclasses import dataclass

import uvloop

from shardchat.core.config import Config
from shardchat.core.errors import RingError
from shardchat.logs import configure_logging, log_event, set_process_role
from shardchat.shard.boot import serve

__all__ = ["EXIT_BOOT_ERROR", "EXIT_UNSTORED", "ShardSpec", "run_shard"]

log = logging.getLogger(__name__)

EXIT_BOOT_ERROR = 3  # the supervisor stops instead of restarting a shard that cannot boot
EXIT_UNSTORED = 4  # the room store closed with messages unstored: the rings are kept


@dataclass(frozen=True, slots=True, kw_only=True)
class ShardSpec:
    """What the supervisor hands a shard at fork."""

    config: Config
    shard_id: int
    epoch: str
    supervisor_pid: int
    incarnation: int  # 0 at first start, +1 at every restart
    app: object | None = None  # the lifecycle hooks object, loaded by the supervisor
    close_fds: tuple[int, ...] = ()  # the supervisor's descriptors (admin port, wakeup)
    store: str = ""  # this shard's room store file (storage.kind = "sqlite"); "": none


def run_shard(spec: ShardSpec) -> None:
    """Process entry point of a shard (the target of the supervisor's fork)."""
    # The child inherits the supervisor's signal setup: undo it before the loop exists.
    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    _drop_inherited(spec.close_fds)
    set_process_role(spec.shard_id)
    configure_logging(spec.config.log.level, spec.config.log.format)
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            unstored = runner.run(serve(spec))
    except (OSError, RingError) as exc:
        # A port that cannot be bound, a segment that is not a ring: restarting
        # would fail the same way, so the supervisor stops instead.
        log_event(log, logging.ERROR, "shard_boot_failed", error=str(exc))
        sys.exit(EXIT_BOOT_ERROR)
    if unstored:
        sys.exit(EXIT_UNSTORED)


def _drop_inherited(fds: tuple[int, ...]) -> None:
    """Let go of the supervisor's descriptors, the admin listening socket first:
    a shard holding it would keep the port open after the supervisor is gone.
    Each number is pointed at /dev/null rather than closed, so that the
    supervisor's socket objects copied by the fork never close a reused number."""
    if not fds:
        return
    null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    try:
        for fd in fds:
            try:
                os.dup2(null, fd)
            except OSError:
                pass
    finally:
        os.close(null)
