"""Fixtures of the process-level tests: a real Redis, a storage.dir of a test's own."""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.redis_helpers import RedisServer, delete_prefix, redis_server

_names = itertools.count()


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisServer]:
    """A redis-server of the test module's own, on a free port."""
    with redis_server() as server:
        yield server


@pytest.fixture
def prefix(redis: RedisServer) -> Iterator[str]:
    """A key prefix of the test's own, whose keys are deleted after it."""
    name = f"t{os.getpid()}x{next(_names)}:"
    try:
        yield name
    finally:
        delete_prefix([redis], name)


@pytest.fixture
def store_dir() -> Iterator[Path]:
    """A storage.dir of the test's own, removed after it."""
    path = Path(tempfile.mkdtemp(prefix="shardchat-store-test-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
