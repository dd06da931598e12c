"""The check of every configuration key: its type and range, a clear error otherwise. Pure."""

from __future__ import annotations

import base64
import binascii
import dataclasses
import math
import re
from collections.abc import Callable

from shardchat.core.config.sections import REDACTED, SECTIONS, WEBHOOK_EVENTS
from shardchat.core.errors import ConfigError

__all__ = ["CHECKS", "NOT_A_FILE", "Check", "check_file"]

Check = Callable[[str, object], object]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int(low: int, high: int | None = None) -> Check:
    allowed = f"an integer >= {low}" if high is None else f"an integer from {low} to {high}"

    def check(key: str, value: object) -> object:
        if not _is_int(value):
            raise ConfigError(key, value, f"must be {allowed}")
        assert isinstance(value, int)
        if value < low or (high is not None and value > high):
            raise ConfigError(key, value, f"must be {allowed}")
        return value

    return check


def _number(low: float, *, strict: bool) -> Check:
    allowed = f"a number {'>' if strict else '>='} {low:g}"

    def check(key: str, value: object) -> object:
        if not (_is_int(value) or isinstance(value, float)):
            raise ConfigError(key, value, f"must be {allowed}")
        number = float(value)  # type: ignore[arg-type]
        if math.isnan(number) or math.isinf(number) or number < low or (strict and number == low):
            raise ConfigError(key, value, f"must be {allowed}")
        return number

    return check


def _choice(*choices: str) -> Check:
    allowed = "must be one of " + ", ".join(repr(c) for c in choices)

    def check(key: str, value: object) -> object:
        if not isinstance(value, str) or value.lower() not in choices:
            raise ConfigError(key, value, allowed)
        return value.lower()

    return check


def _workers(key: str, value: object) -> object:
    if value == "auto":
        return value
    if _is_int(value) and 1 <= value <= 256:  # type: ignore[operator]
        return value
    raise ConfigError(key, value, 'must be "auto" or an integer from 1 to 256')


def _host(key: str, value: object) -> object:
    if not isinstance(value, str) or not value or not re.fullmatch(r"[A-Za-z0-9.:\-\[\]]+", value):
        raise ConfigError(key, value, "must be a host name or an IP address")
    return value


def _origins(key: str, value: object) -> object:
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(
            key, value, "must be a list of origin strings, e.g. ['https://chat.example']"
        )
    return tuple(value)


def _secret(key: str, value: object) -> object:
    if not isinstance(value, str) or (value and len(value.encode()) < 32):
        raise ConfigError(key, REDACTED, "must be empty or at least 32 bytes (RFC 7518 3.2)")
    return value


NOT_A_FILE = "must be empty or the path of a readable file"


def check_file(key: str, value: object) -> object:
    """The type only: :func:`resolve` asks its ``is_file`` whether the file is there."""
    if not isinstance(value, str):
        raise ConfigError(key, value, NOT_A_FILE)
    return value


def _string(key: str, value: object) -> object:
    if not isinstance(value, str):
        raise ConfigError(key, value, "must be a string")
    return value


def _app(key: str, value: object) -> object:
    if not isinstance(value, str) or (value and not re.fullmatch(r"[\w.]+:[\w.]+", value)):
        raise ConfigError(key, value, 'must be "module:object" (e.g. "examples.moderation:app")')
    return value


def _api_key(key: str, value: object) -> object:
    if not isinstance(value, str) or (value and not re.fullmatch(r"[\x21-\x7e]{16,256}", value)):
        raise ConfigError(key, REDACTED, "must be empty or 16-256 printable ASCII characters")
    return value


def _api_host(key: str, value: object) -> object:
    return value if value == "" else _host(key, value)


def _user_name(key: str, value: object) -> object:
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9_.:\-]{1,64}", value):
        raise ConfigError(key, value, "must be 1-64 of A-Z a-z 0-9 _ . : - (a user name)")
    return value


def _power_of_two(key: str, value: object) -> object:
    low, high = 1 << 16, 1 << 30
    if not _is_int(value) or value < low or value > high or value & (value - 1):  # type: ignore[operator]
        raise ConfigError(key, value, f"must be a power of two from {low} to {high}")
    return value


def _redis_url(key: str, value: object) -> object:
    if not isinstance(value, str) or not re.match(r"(redis|rediss|unix)://.", value):
        raise ConfigError(
            key,
            value,
            'must be a redis://, rediss:// or unix:// URL, e.g. "redis://10.0.0.5:6379/0"',
        )
    return value


def _seed_nodes(key: str, value: object) -> object:
    if not isinstance(value, list | tuple) or not all(
        isinstance(v, str) and re.fullmatch(r"[A-Za-z0-9.\-]+:[0-9]{1,5}", v) for v in value
    ):
        raise ConfigError(key, value, 'must be a list of "host:port", e.g. ["10.0.0.5:7000"]')
    return tuple(value)


def _prefix(key: str, value: object) -> object:
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9_.:\-]{0,64}", value):
        raise ConfigError(key, value, "must be up to 64 of A-Z a-z 0-9 _ . : - (no braces)")
    return value


def _http_url(key: str, value: object) -> object:
    if not isinstance(value, str) or (value and not re.fullmatch(r"https?://[^\s/?#]+\S*", value)):
        raise ConfigError(
            key, value, 'must be empty or an http:// or https:// URL, e.g. "http://app:8000/ws"'
        )
    return value


def _webhook_secret(key: str, value: object) -> object:
    if not isinstance(value, str):
        raise ConfigError(key, REDACTED, 'must be "whsec_" followed by base64')
    if value:
        body = value.removeprefix("whsec_")
        try:
            raw = base64.b64decode(body + "=" * (-len(body) % 4), validate=True)
        except (ValueError, binascii.Error):
            raw = b""
        if not value.startswith("whsec_") or not 24 <= len(raw) <= 64:
            raise ConfigError(
                key, REDACTED, 'must be "whsec_" followed by base64 of 24 to 64 bytes'
            )
    return value


def _webhook_events(key: str, value: object) -> object:
    if not isinstance(value, list | tuple) or not all(v in WEBHOOK_EVENTS for v in value):
        raise ConfigError(key, value, "must be a list of " + ", ".join(WEBHOOK_EVENTS))
    return tuple(value)


CHECKS: dict[str, Check] = {
    "server.host": _host,
    "server.port": _int(1, 65535),
    "server.admin_port": _int(0, 65535),
    "server.admin_host": _host,
    "server.admin_token": _string,
    "server.tls_cert": check_file,
    "server.tls_key": check_file,
    "server.tls_client_ca": check_file,
    "server.workers": _workers,
    "server.graceful_timeout": _number(0, strict=True),
    "server.shard_timeout": _number(0, strict=False),
    "server.shard_unlisten": _number(0, strict=False),
    "server.max_connections": _int(1),
    "server.max_per_ip": _int(0),
    "server.origins": _origins,
    "server.backlog": _int(1, 65535),
    "server.app": _app,
    "limits.max_frame": _int(1024, 1 << 24),
    "limits.max_content": _int(1, 1 << 20),
    "limits.rate": _number(0, strict=True),
    "limits.burst": _int(1),
    "limits.send_queue": _int(4096),
    "limits.max_errors": _int(1),
    "limits.room_size": _int(0),
    "heartbeat.interval": _number(0, strict=True),
    "heartbeat.timeout": _number(0, strict=True),
    "heartbeat.idle_timeout": _number(0, strict=False),
    "delivery.ack_timeout": _number(0, strict=True),
    "delivery.ack_retries": _int(0),
    "delivery.history": _int(0, 1_000_000),
    "delivery.history_memory": _int(1, 1_000_000),
    "delivery.room_idle": _number(0, strict=False),
    "delivery.publish_timeout": _number(0, strict=True),
    "overload.forwards": _int(1),
    "overload.backlog": _int(4096),
    "overload.pipeline": _int(1),
    "overload.store": _int(1),
    "overload.turn_bytes": _int(4096),
    "overload.proxy": _int(1),
    "overload.retry_after": _number(0, strict=True),
    "delivery.history_ttl": _number(0, strict=False),
    "delivery.gap_give_up": _number(0, strict=True),
    "ring.bytes": _power_of_two,
    "ring.rooms": _int(16, 1 << 24),
    "presence.list_limit": _int(1),
    "presence.events_limit": _int(0),
    "presence.ttl": _number(0.5, strict=False),
    "broker.kind": _choice("shm", "redis"),
    "redis.url": _redis_url,
    "redis.cluster": _seed_nodes,
    "redis.prefix": _prefix,
    "redis.connect_timeout": _number(0, strict=True),
    "redis.timeout": _number(0, strict=True),
    "redis.history_ttl": _number(0, strict=False),
    "storage.kind": _choice("sqlite", "memory"),
    "storage.dir": _string,
    "storage.fsync": _choice("always", "batch", "off"),
    "storage.max_bytes": _int(0),
    "storage.write_every": _number(0, strict=False),
    "auth.secret": _secret,
    "auth.public_key_file": check_file,
    "auth.jwks_file": check_file,
    "auth.issuer": _string,
    "auth.audience": _string,
    "auth.leeway": _number(0, strict=False),
    "proxy.connect_url": _http_url,
    "proxy.publish_url": _http_url,
    "proxy.timeout": _number(0, strict=True),
    "proxy.connections": _int(1, 1024),
    "webhooks.url": _http_url,
    "webhooks.secret": _webhook_secret,
    "webhooks.events": _webhook_events,
    "webhooks.max_age": _number(0, strict=True),
    "webhooks.queue": _int(1),
    "webhooks.batch": _int(1, 10000),
    "webhooks.timeout": _number(0, strict=True),
    "webhooks.vacated_grace": _number(0, strict=False),
    "api.key": _api_key,
    "api.host": _api_host,
    "api.port": _int(0, 65535),
    "api.sender": _user_name,
    "log.level": _choice("debug", "info", "warning", "error"),
    "log.format": _choice("json", "console"),
}


def _check_complete() -> None:
    keys = {f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)}
    assert keys == set(CHECKS), keys ^ set(CHECKS)


_check_complete()
