"""Structured logs: one JSON object per line on stderr, or readable lines.

Every record carries ``ts``, ``level``, ``process`` (``"supervisor"`` or
``"shard"``), ``shard`` (an integer, the shard id: only on a shard's lines, so
that the field has one type in a log store), ``event`` (a stable name to
filter on) and ``message`` (the line for people: the event and its fields);
:func:`log_event` adds the fields that apply (``conn``, ``user``, ``room``,
``msg``, ``code`` ...).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from typing import Any

import orjson

__all__ = ["EventLogger", "configure_logging", "log_event", "set_process_role"]

_shard: int | None = None  # None: the supervisor
_MESSAGE_FIELD_MAX = 80  # longer field values (a whole config) stay out of `message`


def set_process_role(shard: int | None) -> None:
    """Name this process in every log line: its shard id, or None for the supervisor."""
    global _shard
    _shard = shard


def _role() -> str:
    return "sup" if _shard is None else str(_shard)


def _message(event: str, fields: dict[str, Any] | None) -> str:
    parts = [event]
    for key, value in (fields or {}).items():
        text = str(value)
        if len(text) <= _MESSAGE_FIELD_MAX:
            parts.append(f"{key}={text}")
    return " ".join(parts)


def _timestamp(created: float) -> str:
    return (
        time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
        + f".{int(created % 1 * 1000):03d}Z"
    )


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        event = record.getMessage()
        fields = getattr(record, "fields", None)
        obj: dict[str, Any] = {
            "ts": _timestamp(record.created),
            "level": record.levelname.lower(),
            "process": "supervisor" if _shard is None else "shard",
        }
        if _shard is not None:
            obj["shard"] = _shard
        obj["event"] = event
        obj["message"] = _message(event, fields)
        if fields:
            obj.update(fields)
        if record.exc_info:
            obj["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(obj, default=str).decode()


class ConsoleFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = (
            f"{_timestamp(record.created)} {record.levelname:<7} [{_role()}] {record.getMessage()}"
        )
        fields = getattr(record, "fields", None)
        if fields:
            text += " " + " ".join(f"{k}={v}" for k, v in fields.items())
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def configure_logging(level: str, fmt: str) -> None:
    """Send every log record to stderr in the configured format."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else ConsoleFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # websockets logs every connection at info; shardchat logs its own events.
    logging.getLogger("websockets").setLevel(logging.WARNING)


def log_event(logger: logging.Logger, level: int, event: str, **fields: object) -> None:
    """Log ``event`` with structured ``fields``, only when the level is enabled."""
    if logger.isEnabledFor(level):
        logger.log(level, event, extra={"fields": fields})


class EventLogger:
    """The pure core's :class:`~shardchat.core.interfaces.EventLog` over a logger."""

    __slots__ = ("enabled", "logger")

    def __init__(self, name: str) -> None:
        self.logger = logging.getLogger(name)
        # EventLog.enabled: the logger's own, bound (asked once per publish).
        self.enabled: Callable[[int], bool] = self.logger.isEnabledFor

    def event(self, level: int, name: str, **fields: object) -> None:
        if self.logger.isEnabledFor(level):
            self.logger.log(level, name, extra={"fields": fields})
