"""A process's /proc/PID/stat and status (Linux): what the metrics and the perf tools read.

One parser, because the command name (field 2) is in parentheses and may hold
spaces and parentheses itself: the fields are counted after its last ``)``.
"""

from __future__ import annotations

import os

__all__ = ["cpu_and_rss", "cpu_seconds", "rss_anon", "stat_fields"]

_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def stat_fields(pid: int) -> list[bytes]:
    """The fields after the command name: ``[0]`` is the state (field 3 of proc(5)),
    ``[1]`` the parent pid, ``[11]``/``[12]`` utime/stime, ``[21]`` rss in pages.

    Raises:
        OSError: the process is gone (or was never there).
    """
    with open(f"/proc/{pid}/stat", "rb") as f:
        return f.read().rsplit(b")", 1)[1].split()


def cpu_and_rss(pid: int) -> tuple[float, int]:
    """User plus system CPU seconds, and resident bytes, from one read."""
    fields = stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / _TICKS, int(fields[21]) * _PAGE


def cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds used so far."""
    return cpu_and_rss(pid)[0]


def rss_anon(pid: int) -> int:
    """Resident anonymous bytes (``RssAnon`` of /proc/PID/status): the heap's share
    of the resident size, without the mapped files and shared memory.

    Raises:
        OSError: the process is gone.
        LookupError: the kernel did not report it.
    """
    with open(f"/proc/{pid}/status", "rb") as f:
        for line in f:
            if line.startswith(b"RssAnon:"):
                return int(line.split()[1]) * 1024
    raise LookupError(f"no RssAnon for {pid}")
