"""Lifecycle hooks: a team's own logic inside shardchat, without forking it.

``shardchat start --app module:object`` (or ``server.app``) loads ``object``
from ``module`` in the supervisor, before the shards fork, so every shard
runs the same hooks. The object may define any of:

``on_connect(info: ConnectInfo) -> str | None``
    Before the WebSocket upgrade. Return a reason to refuse the connection
    (HTTP 403 with that reason), or None to accept it.
``on_open(conn: ConnInfo) -> None``
    After the upgrade and the ``welcome`` frame.
``on_message(conn: ConnInfo, room: str, content: str) -> str | None``
    Before a message is sequenced. Return None to keep it, a string to
    replace its content, or raise :class:`Reject` to refuse it (the sender
    gets ``error`` with code ``rejected``, PROTOCOL.md's codes extended).
``on_close(conn: ConnInfo, code: int, reason: str) -> None``
    After the connection is gone, with the close code and reason.

Hooks run on the shard's event loop: they must be quick and must not block.
A hook that raises anything but :class:`Reject` is logged with the
connection and counted; the connection carries on as if the hook were not
there (a failing ``on_message`` keeps the message, a failing
``on_connect`` accepts). The shard is never harmed.
"""

from __future__ import annotations

import importlib
import logging
import os
import secrets
import sys
from collections.abc import Callable
from typing import Any

from shardchat.core.errors import HookError, Reject
from shardchat.core.interfaces import ConnectInfo, ConnInfo
from shardchat.logs import log_event

__all__ = ["ConnInfo", "ConnectInfo", "Hooks", "Reject", "load_app", "random_guest_name"]

log = logging.getLogger(__name__)


def random_guest_name() -> str:
    """``guest-XXXX`` (PROTOCOL.md, ``user``): four random hex digits."""
    return f"guest-{secrets.token_hex(2)}"


class Hooks:
    """The loaded hooks, each called through a guard that logs and counts failures
    (the core's :class:`~shardchat.core.interfaces.HookRunner`).

    ``guest_name`` names a user who gave no name (auth off): admission, in the pure
    core, takes it from here instead of drawing random numbers itself; the core's
    tests hand in a deterministic one."""

    def __init__(
        self, app: object | None, guest_name: Callable[[], str] = random_guest_name
    ) -> None:
        self.app = app
        self.guest_name = guest_name
        self.errors = 0
        self.has_connect = callable(getattr(app, "on_connect", None))
        self.has_open = callable(getattr(app, "on_open", None))
        self.has_message = callable(getattr(app, "on_message", None))
        self.has_close = callable(getattr(app, "on_close", None))

    def _failed(self, hook: str, info: ConnInfo | ConnectInfo) -> None:
        self.errors += 1
        log.error(
            "hook_failed",
            exc_info=True,
            extra={
                "fields": {"hook": hook, "user": info.user, "conn": getattr(info, "conn", None)}
            },
        )

    def on_connect(self, info: ConnectInfo) -> str | None:
        try:
            reason = self.app.on_connect(info)  # type: ignore[union-attr]
        except Exception:
            self._failed("on_connect", info)
            return None
        return None if reason is None else str(reason)

    def on_open(self, info: ConnInfo) -> None:
        try:
            self.app.on_open(info)  # type: ignore[union-attr]
        except Exception:
            self._failed("on_open", info)

    def on_message(self, info: ConnInfo, room: str, content: str) -> str:
        """The content to publish; raises :class:`Reject` to refuse it."""
        try:
            result: Any = self.app.on_message(info, room, content)  # type: ignore[union-attr]
        except Reject:
            raise
        except Exception:
            self._failed("on_message", info)
            return content
        if result is None:
            return content
        if not isinstance(result, str):
            log_event(log, logging.ERROR, "hook_bad_result", hook="on_message", user=info.user)
            self.errors += 1
            return content
        return result

    def on_close(self, info: ConnInfo, code: int, reason: str) -> None:
        try:
            self.app.on_close(info, code, reason)  # type: ignore[union-attr]
        except Exception:
            self._failed("on_close", info)


def load_app(spec: str) -> object | None:
    """Import ``module:object``; None for an empty spec.

    Raises:
        HookError: the module or the object cannot be loaded.
    """
    if not spec:
        return None
    # Like uvicorn: the app may live beside the directory the server starts in.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise HookError(f"--app {spec}: cannot import {module_name}: {exc}") from None
    obj: object = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise HookError(f"--app {spec}: {module_name} has no {attr}") from None
    hooks = ("on_connect", "on_open", "on_message", "on_close")
    if not any(callable(getattr(obj, name, None)) for name in hooks):
        raise HookError(f"--app {spec}: defines none of {', '.join(hooks)}")
    return obj
