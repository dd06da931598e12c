"""The configuration printed as TOML, every key, with its secrets redacted. Pure."""

from __future__ import annotations

import dataclasses
import re

from shardchat.core.config.sections import REDACTED, SECTIONS, Config

__all__ = ["SECRET_KEYS", "redact_url", "to_toml"]


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)


SECRET_KEYS = frozenset({"auth.secret", "server.admin_token", "webhooks.secret", "api.key"})
# A Redis URL may hold a password (redis://:secret@host): printed without it.
_URL_PASSWORD = re.compile(r"(?<=://)([^@/]*:)?[^@/:]+@")


def redact_url(url: str) -> str:
    """``url`` with its credentials replaced, for logs, status and ``shardchat config``."""
    return _URL_PASSWORD.sub(REDACTED + "@", url)


def to_toml(config: Config, *, redact: bool = True) -> str:
    """The effective configuration as TOML, every key of every section.

    Secrets that are set print as ``<redacted>``, unless ``redact`` is False.
    """
    lines: list[str] = []
    for section in SECTIONS:
        if lines:
            lines.append("")
        lines.append(f"[{section}]")
        table = getattr(config, section)
        for f in dataclasses.fields(table):
            value = getattr(table, f.name)
            if redact and value and f"{section}.{f.name}" in SECRET_KEYS:
                value = REDACTED
            if redact and f"{section}.{f.name}" == "redis.url":
                value = redact_url(value)
            lines.append(f"{f.name} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"
