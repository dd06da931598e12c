"""Fixtures of the process-level tests that need a real Redis."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator

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
