"""The webhook tests' receiver: examples/backend.py's Backend on a free port, and
the settings that point a server at it."""

from __future__ import annotations

import base64
import contextlib
from collections.abc import Iterator
from typing import Any

from examples.backend import Backend

SECRET = "whsec_" + base64.b64encode(b"k" * 32).decode()


@contextlib.contextmanager
def backend(**kwargs: Any) -> Iterator[Backend]:
    receiver = Backend(SECRET, **kwargs).start()
    try:
        yield receiver
    finally:
        receiver.stop()


def hook_settings(receiver: Backend, *extra: str) -> list[str]:
    return [
        f"webhooks.url={receiver.url('/webhooks')}",
        f"webhooks.secret={SECRET}",
        "webhooks.vacated_grace=0.3",
        *extra,
    ]
