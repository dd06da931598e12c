"""The configuration: its dataclasses, and the validation of its values. Pure.

:func:`resolve` turns ``section.key`` values into a frozen :class:`Config`;
every wrong value raises :class:`ConfigError` naming the key, the value and
what is allowed. What it needs of the machine is handed in: the CPU count
(for ``server.workers = "auto"``) and a test of whether a path is a file.
The loader that reads the config file, the environment and the CPU count is
:mod:`shardchat.configload`.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import difflib
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from shardchat.core.errors import ConfigError

__all__ = [
    "AuthConfig",
    "BrokerConfig",
    "Config",
    "DeliveryConfig",
    "HeartbeatConfig",
    "LimitsConfig",
    "LogConfig",
    "OverloadConfig",
    "PresenceConfig",
    "ProxyConfig",
    "RedisConfig",
    "RingConfig",
    "SECTIONS",
    "ServerConfig",
    "WebhooksConfig",
    "env_name",
    "redact_url",
    "resolve",
    "to_toml",
]

ENV_PREFIX = "SHARDCHAT_"
# Seconds a client has to finish the opening handshake (shard/connection.py's
# HANDSHAKE_TIMEOUT): the connect proxy's answer must come before it.
HANDSHAKE_DEADLINE = 5.0
REDACTED = "<redacted>"


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerConfig:
    host: str = "127.0.0.1"  # listen address of the WebSocket/HTTP port
    port: int = 8080  # WebSocket + HTTP port, shared by every shard (SO_REUSEPORT)
    admin_port: int = 9090  # metrics/status port served by the supervisor; 0 = off
    admin_host: str = "127.0.0.1"  # listen address of the admin port, not server.host's
    admin_token: str = ""  # bearer token /status and /metrics require; empty = none
    tls_cert: str = ""  # PEM certificate chain: serve wss:// and https:// on server.port
    tls_key: str = ""  # PEM private key of tls_cert
    tls_client_ca: str = ""  # PEM CA bundle: require client certificates signed by it
    workers: int | str = "auto"  # shards; "auto" = CPU count
    graceful_timeout: float = 10.0  # seconds a drain may take before shards are killed
    shard_timeout: float = 30.0  # a shard whose loop is stuck this long is killed; 0 = off
    shard_unlisten: float = 2.0  # ... this long, leaves the port's accept group; 0 = off
    max_connections: int = 100_000  # whole server; over it, HTTP 503
    max_per_ip: int = 0  # per client address, whole server; 0 = off
    origins: tuple[str, ...] = ()  # allowed Origin values; empty = any
    backlog: int = 4096  # listen backlog of each shard's socket
    app: str = ""  # lifecycle hooks to load, "module:object"; empty = none


@dataclass(frozen=True, slots=True, kw_only=True)
class LimitsConfig:
    max_frame: int = 65536  # bytes of one incoming WebSocket frame
    max_content: int = 4096  # bytes of a message's content
    rate: float = 20.0  # messages per second, sustained (token bucket refill)
    burst: int = 40  # token bucket size
    send_queue: int = 1_048_576  # bytes buffered for one client before close 4429
    max_errors: int = 20  # consecutive errors before close 1008
    room_size: int = 0  # members (users) a room may have; 0 = no limit


@dataclass(frozen=True, slots=True, kw_only=True)
class HeartbeatConfig:
    interval: float = 30.0  # seconds between WebSocket pings
    timeout: float = 10.0  # seconds a pong may take before close 4408
    idle_timeout: float = 90.0  # seconds of silence before close 4408; 0 = off


@dataclass(frozen=True, slots=True, kw_only=True)
class DeliveryConfig:
    ack_timeout: float = 2.0  # seconds before an unacked message is resent
    ack_retries: int = 5  # resends before close 4409
    history: int = 1000  # messages held per room for resume and history
    room_idle: float = 600.0  # seconds before a non-owner shard drops an idle room's log
    publish_timeout: float = 30.0  # seconds before a forwarded publish is answered `unavailable`
    history_ttl: float = 0.0  # seconds a stored message is kept at most; 0 = by count alone
    gap_give_up: float = 10.0  # seconds a missed range may go unfilled before it is a `gap`


@dataclass(frozen=True, slots=True, kw_only=True)
class OverloadConfig:
    # Admission control (PROTOCOL.md, Extensions, Overload): past any of these
    # bounds a publish is refused at once with `overloaded`, never queued.
    forwards: int = 1024  # publishes in flight from one shard to one room's owner
    backlog: int = 1_048_576  # bytes of the peers' rings an owner found unread at its last read
    pipeline: int = 1000  # broker.kind = "redis": publishes waiting for or in a Redis pipeline
    store: int = 4096  # storage.kind = "sqlite": messages an owner sequenced and not yet stored
    turn_bytes: int = 33_554_432  # bytes of room frames one loop turn of a shard may queue
    proxy: int = 1000  # publishes one shard has waiting for the publish proxy's verdict
    retry_after: float = 1.0  # seconds an `overloaded` client is told to wait before retrying


@dataclass(frozen=True, slots=True, kw_only=True)
class RingConfig:
    bytes: int = 16_777_216  # data area of each shard's ring; a power of two
    rooms: int = 65536  # rooms each shard's shared seq table holds (96 bytes each)


@dataclass(frozen=True, slots=True, kw_only=True)
class PresenceConfig:
    list_limit: int = 1000  # users listed in joined/presence at most
    events_limit: int = 200  # join/leave events only in rooms up to this size
    ttl: float = 10.0  # broker.kind = "redis": seconds before a silent box's users leave everywhere


@dataclass(frozen=True, slots=True, kw_only=True)
class BrokerConfig:
    kind: str = "shm"  # "shm": one box, shared-memory rings; "redis": several boxes through Redis


@dataclass(frozen=True, slots=True, kw_only=True)
class RedisConfig:
    url: str = (
        "redis://127.0.0.1:6379/0"  # redis://, rediss:// (TLS) or unix:// (ignored with cluster)
    )
    cluster: tuple[str, ...] = ()  # Redis Cluster seed nodes, "host:port"; empty = one Redis at url
    prefix: str = "shardchat:"  # put before every key and channel, so services can share a Redis
    connect_timeout: float = 2.0  # seconds to connect to Redis
    timeout: float = 2.0  # seconds a command or a pipeline may take before it counts as failed
    history_ttl: float = 0.0  # seconds an unused room's stream and seq live on; 0 = for ever


@dataclass(frozen=True, slots=True, kw_only=True)
class StorageConfig:
    kind: str = "sqlite"  # "sqlite": rooms outlive the processes, in dir; "memory": only the run's
    dir: str = ""  # the stores' directory; "" = data/ beside the configuration file
    fsync: str = "batch"  # "always" (acked = synced), "batch" (synced every second), "off"
    max_bytes: int = 0  # the stores' size limit, all shards together; 0 = the disk's


@dataclass(frozen=True, slots=True, kw_only=True)
class AuthConfig:
    secret: str = ""  # HS256 key for JWTs (at least 32 bytes)
    public_key_file: str = ""  # PEM public key: RS256 (RSA) or ES256/384/512 (EC)
    jwks_file: str = ""  # a JWKS file (JSON): the token's kid picks the key
    issuer: str = ""  # required `iss` claim; empty = not checked
    audience: str = ""  # required `aud` claim; empty = not checked
    leeway: float = 30.0  # seconds of clock skew allowed on exp and nbf


@dataclass(frozen=True, slots=True, kw_only=True)
class ProxyConfig:
    connect_url: str = ""  # the backend admits upgrades (POST, cookie and all); empty = off
    publish_url: str = ""  # the backend sees client publishes before sequencing; empty = off
    timeout: float = 1.0  # seconds a proxy call may take (then 503, or `unavailable`)
    connections: int = 8  # keep-alive connections to each backend URL, per shard


WEBHOOK_EVENTS = (
    "connect",
    "disconnect",
    "join",
    "leave",
    "room_occupied",
    "room_vacated",
    "message",
)


@dataclass(frozen=True, slots=True, kw_only=True)
class WebhooksConfig:
    url: str = ""  # where signed event batches are POSTed; empty = off
    secret: str = ""  # Standard Webhooks secret, "whsec_" + base64 of 24-64 random bytes
    events: tuple[str, ...] = WEBHOOK_EVENTS[:-1]  # which to send ("message" too if listed)
    max_age: float = 60.0  # seconds an event is retried for before it is dropped
    queue: int = 10000  # events a shard holds for delivery at most (then dropped, counted)
    batch: int = 100  # events per POST at most
    timeout: float = 5.0  # seconds a POST may take
    vacated_grace: float = 2.0  # seconds a room stays empty before room_vacated is sent


@dataclass(frozen=True, slots=True, kw_only=True)
class ApiConfig:
    key: str = ""  # the server API's key (better: SHARDCHAT_API_KEY); empty = the API is off
    host: str = ""  # a separate listener for the API only (e.g. an internal address)
    port: int = 0  # ... and its port; 0 = the API is served on server.port under /api/
    sender: str = "system"  # the sender of an API publish that names none


@dataclass(frozen=True, slots=True, kw_only=True)
class LogConfig:
    level: str = "info"  # debug, info, warning, error
    format: str = "json"  # json (one object per line) or console


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    heartbeat: HeartbeatConfig = field(default_factory=HeartbeatConfig)
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    overload: OverloadConfig = field(default_factory=OverloadConfig)
    ring: RingConfig = field(default_factory=RingConfig)
    presence: PresenceConfig = field(default_factory=PresenceConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    log: LogConfig = field(default_factory=LogConfig)
    broker: BrokerConfig = field(default_factory=BrokerConfig)
    redis: RedisConfig = field(default_factory=RedisConfig)
    proxy: ProxyConfig = field(default_factory=ProxyConfig)
    webhooks: WebhooksConfig = field(default_factory=WebhooksConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    api: ApiConfig = field(default_factory=ApiConfig)
    cpu_count: int = 1  # the machine's, read by the loader: server.workers = "auto"

    @property
    def workers(self) -> int:
        """The number of shards, with "auto" resolved to the CPU count."""
        if self.server.workers == "auto":
            return self.cpu_count
        assert isinstance(self.server.workers, int)
        return self.server.workers


SECTIONS: dict[str, type[Any]] = {
    "server": ServerConfig,
    "limits": LimitsConfig,
    "heartbeat": HeartbeatConfig,
    "delivery": DeliveryConfig,
    "overload": OverloadConfig,
    "ring": RingConfig,
    "presence": PresenceConfig,
    "auth": AuthConfig,
    "log": LogConfig,
    "broker": BrokerConfig,
    "redis": RedisConfig,
    "proxy": ProxyConfig,
    "webhooks": WebhooksConfig,
    "storage": StorageConfig,
    "api": ApiConfig,
}

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


_NOT_A_FILE = "must be empty or the path of a readable file"


def _file(key: str, value: object) -> object:
    """The type only: :func:`resolve` asks its ``is_file`` whether the file is there."""
    if not isinstance(value, str):
        raise ConfigError(key, value, _NOT_A_FILE)
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


_CHECKS: dict[str, Check] = {
    "server.host": _host,
    "server.port": _int(1, 65535),
    "server.admin_port": _int(0, 65535),
    "server.admin_host": _host,
    "server.admin_token": _string,
    "server.tls_cert": _file,
    "server.tls_key": _file,
    "server.tls_client_ca": _file,
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
    "auth.secret": _secret,
    "auth.public_key_file": _file,
    "auth.jwks_file": _file,
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
    assert keys == set(_CHECKS), keys ^ set(_CHECKS)


_check_complete()


def env_name(key: str) -> str:
    """The environment variable of ``section.key``."""
    return ENV_PREFIX + key.replace(".", "_").upper()


def _unknown(key: str, source: str | None) -> str:
    close = difflib.get_close_matches(key, _CHECKS, n=3, cutoff=0.6)
    if close:
        names = [env_name(k) if source else k for k in close]
        return "unknown key; did you mean " + " or ".join(names) + "?"
    return "unknown key; sections: " + ", ".join(SECTIONS) + " (`shardchat config` lists every key)"


def resolve(
    values: Mapping[str, object],
    *,
    sources: Mapping[str, str] | None = None,
    cpu_count: int,
    is_file: Callable[[str], bool],
) -> Config:
    """The configuration of ``values`` (``section.key`` -> value) over the defaults.

    Args:
        sources: the environment variable that set a key, for the error message.
        cpu_count: the machine's CPUs, the number of shards ``"auto"`` means.
        is_file: whether a path names a readable file (the TLS and key files).

    Raises:
        ConfigError: an unknown key, a wrong type or an out-of-range value.
    """
    sources = sources or {}
    sections: dict[str, dict[str, object]] = {name: {} for name in SECTIONS}
    for key, value in values.items():
        source = sources.get(key)
        check = _CHECKS.get(key)
        if check is None:
            raise ConfigError(key, value, _unknown(key, source), source)
        section, _, name = key.partition(".")
        try:
            checked = check(key, value)
            if check is _file and checked and not is_file(str(checked)):
                raise ConfigError(key, value, _NOT_A_FILE)
            sections[section][name] = checked
        except ConfigError as exc:
            if source is None:
                raise
            raise ConfigError(exc.key, exc.value, exc.allowed, source) from None
    config = Config(
        **{name: SECTIONS[name](**kw) for name, kw in sections.items()}, cpu_count=cpu_count
    )
    if config.limits.max_content + 1024 > config.limits.max_frame:
        raise ConfigError(
            "limits.max_content",
            config.limits.max_content,
            f"must leave 1024 bytes of room under limits.max_frame ({config.limits.max_frame})",
        )
    server = config.server
    if bool(server.tls_cert) != bool(server.tls_key):
        raise ConfigError(
            "server.tls_key" if server.tls_cert else "server.tls_cert",
            "",
            "server.tls_cert and server.tls_key must be set together",
        )
    if server.tls_client_ca and not server.tls_cert:
        raise ConfigError(
            "server.tls_client_ca", server.tls_client_ca, "needs server.tls_cert and tls_key"
        )
    if config.proxy.connect_url and config.proxy.timeout >= HANDSHAKE_DEADLINE:
        raise ConfigError(
            "proxy.timeout",
            config.proxy.timeout,
            f"must be under {HANDSHAKE_DEADLINE:g} s with proxy.connect_url (the handshake's"
            " deadline: the client would be cut before the backend's answer)",
        )
    if config.webhooks.url and not config.webhooks.secret:
        raise ConfigError("webhooks.secret", "", "must be set when webhooks.url is (signatures)")
    api = config.api
    if bool(api.host) != bool(api.port):
        raise ConfigError(
            "api.port" if api.host else "api.host",
            api.port if api.host else api.host,
            "api.host and api.port must be set together (or neither: the main port)",
        )
    if api.port and api.port == server.port and api.host == server.host:
        raise ConfigError("api.port", api.port, "must differ from server.port")
    if config.limits.max_frame > config.ring.bytes // 8:
        raise ConfigError(
            "limits.max_frame",
            config.limits.max_frame,
            f"must be at most ring.bytes / 8 ({config.ring.bytes // 8}), the largest ring record",
        )
    return config


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
