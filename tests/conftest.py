from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.helpers import Server, running_server


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    """A 3-shard server shared by the tests of one module that do not disturb it."""
    with running_server(workers=3) as srv:
        yield srv
