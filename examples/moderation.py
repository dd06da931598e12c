"""A moderation app for shardchat: an allow-list of users and a profanity filter.

    SHARDCHAT_ALLOWED_USERS=ada,grace shardchat start --app examples.moderation:app

- ``on_connect`` refuses users not in ``SHARDCHAT_ALLOWED_USERS`` (comma
  separated; unset = everyone) with HTTP 403 and a reason.
- ``on_message`` masks banned words with asterisks, and refuses messages that
  are nothing but capitals (shouting): the sender gets an ``error`` with code
  ``rejected`` and the reason.
- ``on_open`` and ``on_close`` log who came and went, with the shard.
"""

from __future__ import annotations

import logging
import os
import re

from shardchat.hooks import ConnectInfo, ConnInfo, Reject

log = logging.getLogger("examples.moderation")

BANNED = ("darn", "heck", "frak")
_BANNED_RE = re.compile(r"\b(" + "|".join(BANNED) + r")\b", re.IGNORECASE)


class Moderation:
    def __init__(self, allowed_users: set[str] | None) -> None:
        self.allowed_users = allowed_users

    def on_connect(self, info: ConnectInfo) -> str | None:
        if self.allowed_users is not None and info.user not in self.allowed_users:
            return f"user {info.user} is not on the allow-list"
        return None

    def on_open(self, conn: ConnInfo) -> None:
        log.info("moderation_open", extra={"fields": {"user": conn.user, "conn": conn.conn}})

    def on_message(self, conn: ConnInfo, room: str, content: str) -> str | None:
        letters = [c for c in content if c.isalpha()]
        if len(letters) >= 8 and all(c.isupper() for c in letters):
            raise Reject("no shouting, please")
        masked = _BANNED_RE.sub(lambda m: "*" * len(m.group(0)), content)
        return masked if masked != content else None

    def on_close(self, conn: ConnInfo, code: int, reason: str) -> None:
        log.info(
            "moderation_close",
            extra={
                "fields": {"user": conn.user, "conn": conn.conn, "code": code, "reason": reason}
            },
        )


def _allowed_from_env() -> set[str] | None:
    raw = os.environ.get("SHARDCHAT_ALLOWED_USERS", "")
    return {name.strip() for name in raw.split(",") if name.strip()} or None


app = Moderation(_allowed_from_env())
