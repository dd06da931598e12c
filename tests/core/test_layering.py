"""The pure core imports no I/O: each module is imported in a fresh interpreter, and
its source imports no source of time, randomness or the machine (os)."""

from __future__ import annotations

import ast
import importlib.util
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
        "shardchat.brokers.redis.wire",
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


# Imported by the interpreter itself or by much of the standard library, so that a
# fresh interpreter's sys.modules cannot tell: each module's own imports are read.
IMPURE = {"os", "secrets", "time", "random"}
# What still imports one of them, and why; each entry must still be true (below), so
# that it is dropped when the import goes.
STILL_IMPURE = {
    # The message ids' random part when no id_prefix is given.
    "shardchat.core.engine": {"secrets"},
}


def _imports(module: str) -> set[str]:
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin is not None
    with open(spec.origin, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("module", CORE)
def test_core_module_imports_no_clock_randomness_or_os(module: str) -> None:
    assert _imports(module) & IMPURE == STILL_IMPURE.get(module, set())
