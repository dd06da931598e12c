"""The example moderation app, plus hooks that fail on purpose (loaded by test_hooks)."""

from __future__ import annotations

import logging

from examples.moderation import Moderation
from shardchat.hooks import ConnectInfo, ConnInfo

log = logging.getLogger("tests.support.hookapp")


class Failing(Moderation):
    def on_connect(self, info: ConnectInfo) -> str | None:
        log.info(
            "hook_connect",
            extra={"fields": {"user": info.user, "peer": info.peer, "rooms": list(info.rooms)}},
        )
        if info.user == "connect-crasher":
            raise RuntimeError("on_connect failed on purpose")
        return super().on_connect(info)

    def on_message(self, conn: ConnInfo, room: str, content: str) -> str | None:
        if content == "crash":
            raise RuntimeError("on_message failed on purpose")
        return super().on_message(conn, room, content)


app = Failing({"ada", "grace", "connect-crasher"} | {f"h{i}" for i in range(400)})
