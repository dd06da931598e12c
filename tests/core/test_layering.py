"""The pure core imports no I/O and nothing of shardchat outside core/ and ring/.

Each module is imported in a fresh interpreter (without ``site``, so that
almost nothing is loaded before it), and what its import added to
``sys.modules`` is checked: no ``shardchat`` module outside ``shardchat.core``
and ``shardchat.ring`` (hooks, logs, stats, the address table come in as the
interfaces of ``shardchat.core.interfaces``), and no module of sockets,
processes, shared memory, event loops, Redis, logging or randomness. The
standard library itself loads ``os`` (``inspect``, via ``dataclasses``) and
the interpreter loads ``time``, so for those each module's own import lines
are read as well.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import pkgutil
import subprocess
import sys

import pytest

import shardchat.core
import shardchat.ring


def _modules(package: object) -> list[str]:
    prefix = package.__name__ + "."  # type: ignore[attr-defined]
    return [m.name for m in pkgutil.walk_packages(package.__path__, prefix)]  # type: ignore[attr-defined]


# Every module of the core and of the ring layout, found, not listed: a new one
# is checked without anyone remembering to add it.
CORE = sorted([*_modules(shardchat.core), *_modules(shardchat.ring)])
# The shared-memory and Redis brokers' pure parts: no I/O either, though they
# may use shardchat modules outside the core.
PURE_PARTS = [
    "shardchat.brokers.sequencer",
    "shardchat.brokers.forwarding",
    "shardchat.brokers.redis.wire",
    "shardchat.addrtable",
]
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
    "threading",
    "redis",
]
# The core is handed an EventLog (shardchat.core.interfaces) instead of logging,
# and its callers draw its random parts (message id prefixes, guest names).
IMPURE_LOADED = ["logging", "random", "secrets"]
INSIDE = ("shardchat.core", "shardchat.ring")


def _loaded_by(module: str) -> list[str]:
    """What importing ``module`` adds to a fresh interpreter's ``sys.modules``."""
    code = (
        "import sys\nbefore = set(sys.modules)\n"
        f"import {module}\nprint('\\n'.join(sorted(set(sys.modules) - before)))"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    out = subprocess.run(
        [sys.executable, "-S", "-c", code], capture_output=True, text=True, check=True, env=env
    )
    return out.stdout.split()


def test_the_core_is_every_module_it_should_be() -> None:
    assert {
        "shardchat.core.engine",
        "shardchat.core.engine.facade",
        "shardchat.core.broker",
        "shardchat.ring.ring",
    } <= set(CORE)
    assert len(CORE) >= 24


@pytest.mark.parametrize("module", CORE)
def test_core_module_loads_only_the_core_and_no_io(module: str) -> None:
    loaded = _loaded_by(module)
    outside = [
        m
        for m in loaded
        if m.startswith("shardchat.") and not m.startswith(INSIDE) and m != "shardchat"
    ]
    assert outside == []
    assert [m for m in loaded if m.split(".")[0] in IO + IMPURE_LOADED] == []


@pytest.mark.parametrize("module", PURE_PARTS)
def test_pure_part_loads_no_io(module: str) -> None:
    assert [m for m in _loaded_by(module) if m.split(".")[0] in IO] == []


# Loaded before any module by the interpreter or the standard library, so that
# sys.modules cannot tell: each core module's own imports are read.
IMPURE = {"os", "secrets", "time", "random", "logging"}


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
    assert _imports(module) & IMPURE == set()
