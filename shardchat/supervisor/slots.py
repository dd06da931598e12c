"""One shard id's slot in the supervisor: its current process and restart state."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["ShardSlot"]


@dataclass(slots=True)
class ShardSlot:
    """One shard id and the process that currently serves it."""

    shard_id: int
    process: Any = None  # multiprocess.Process while running
    started_at: float = 0.0  # monotonic
    started_ns: int = 0  # monotonic ns, against the ring's heartbeat
    killed_stuck: bool = False  # SIGKILLed for a stuck loop; the exit restarts it
    unlistened: bool = False  # its listening socket was shut down for a silent loop
    incarnation: int = -1
    restarts: int = 0
    backoff: float = 0.0
    restart_at: float | None = None  # monotonic time of a scheduled restart

    @property
    def pid(self) -> int | None:
        return None if self.process is None else int(self.process.pid)
