"""shardchat.procstat: /proc/PID/stat fields, counted after the command name even when
that name holds spaces and parentheses."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from shardchat.procstat import cpu_and_rss, cpu_seconds, stat_fields


def test_fields_of_a_process_whose_name_holds_spaces_and_parentheses(tmp_path: Path) -> None:
    # The kernel names a process after the file it executed: a link named like this.
    odd = tmp_path / "a) 1 2 (b"
    odd.symlink_to(sys.executable)
    child = subprocess.Popen(
        [str(odd), "-c", "print('up', flush=True); input()"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline() == b"up\n"  # started: its interpreter is loaded
        assert b"a) 1 2 (b" in Path(f"/proc/{child.pid}/stat").read_bytes()
        fields = stat_fields(child.pid)
        assert int(fields[1]) == os.getpid()  # the parent pid
        _, rss = cpu_and_rss(child.pid)
        assert rss > 1 << 20  # a running interpreter holds more than a MiB
    finally:
        child.communicate(b"\n")  # ends it, and closes both pipes


def test_cpu_seconds_grow_with_work() -> None:
    before = cpu_seconds(os.getpid())
    while cpu_seconds(os.getpid()) <= before:  # ticks are 10 ms: a bounded busy loop
        sum(range(100_000))
    assert cpu_seconds(os.getpid()) > before


def test_a_process_that_is_gone_raises_oserror() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    with pytest.raises(OSError):
        stat_fields(child.pid)
