"""The pure core imports no I/O: each module is imported in a fresh interpreter.

shardchat.auth is not in it: it reads key files, and PyJWT imports urllib (so
socket) for a JWKS client that shardchat does not use."""

from __future__ import annotations

import subprocess
import sys

import pytest

CORE = [
    "shardchat.errors",
    "shardchat.messages",
    "shardchat.wire",
    "shardchat.rooms",
    "shardchat.ratelimit",
    "shardchat.config",
    "shardchat.ringlayout",
    "shardchat.presence",
    "shardchat.delivery",
    "shardchat.roomtable",
    "shardchat.records",
    "shardchat.addrtable",
    "shardchat.ring",
]
IO = ["asyncio", "websockets", "uvloop", "posix_ipc", "multiprocess", "mmap", "socket"]


@pytest.mark.parametrize("module", CORE)
def test_core_module_imports_no_io(module: str) -> None:
    code = (
        f"import sys, {module}\nbad = [m for m in {IO!r} if m in sys.modules]\nprint(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
