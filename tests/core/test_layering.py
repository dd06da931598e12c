"""The pure core imports no I/O: each module is imported in a fresh interpreter."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import pytest

import shardchat.core
import shardchat.ring

# Every module of the core and of the ring layout, found, not listed: a new one
# is checked without anyone remembering to add it. The shared-memory broker's
# pure parts too (its sequencing and forwarding logic).
CORE = sorted(
    [
        *(f"shardchat.core.{m.name}" for m in pkgutil.iter_modules(shardchat.core.__path__)),
        *(f"shardchat.ring.{m.name}" for m in pkgutil.iter_modules(shardchat.ring.__path__)),
        "shardchat.brokers.sequencer",
        "shardchat.brokers.forwarding",
        "shardchat.brokers.redis_wire",
        "shardchat.addrtable",
    ]
)
IO = [
    "asyncio",
    "selectors",
    "socket",
    "mmap",
    "posix_ipc",
    "websockets",
    "uvloop",
    "multiprocess",
    "multiprocessing",
]


def test_the_core_is_every_module_it_should_be() -> None:
    assert {"shardchat.core.engine", "shardchat.core.broker", "shardchat.ring.ring"} <= set(CORE)
    assert len(CORE) >= 18


@pytest.mark.parametrize("module", CORE)
def test_core_module_imports_no_io(module: str) -> None:
    code = (
        f"import sys, {module}\nbad = [m for m in {IO!r} if m in sys.modules]\nprint(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
