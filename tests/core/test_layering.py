"""The pure core imports no I/O: each module is imported in a fresh interpreter."""

from __future__ import annotations

import subprocess
import sys

import pytest

CORE = [
    "shardchat.core.errors",
    "shardchat.core.messages",
    "shardchat.core.wire",
    "shardchat.core.roomlog",
    "shardchat.core.ratelimit",
    "shardchat.core.config",
    "shardchat.ring.layout",
    "shardchat.core.presence",
    "shardchat.core.reliable",
    "shardchat.ring.seqtable",
    "shardchat.ring.records",
    "shardchat.core.auth",
    "shardchat.ring.ring",
]
IO = ["asyncio", "websockets", "uvloop", "posix_ipc", "multiprocess", "mmap", "socket"]


@pytest.mark.parametrize("module", CORE)
def test_core_module_imports_no_io(module: str) -> None:
    code = (
        f"import sys, {module}\nbad = [m for m in {IO!r} if m in sys.modules]\nprint(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
