"""The configuration's sections: a frozen dataclass per section, and the whole Config. Pure."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "ENV_PREFIX",
    "HANDSHAKE_DEADLINE",
    "REDACTED",
    "SECTIONS",
    "WEBHOOK_EVENTS",
    "ApiConfig",
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
    "ServerConfig",
    "StorageConfig",
    "WebhooksConfig",
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
    history: int = 1000  # messages kept per room for resume and history (on disk with a store)
    # With a store: the latest messages per room kept in memory, once per box (by
    # the room's owner; the other shards keep a short tail and read the rest).
    history_memory: int = 1000
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
    write_every: float = 0.02  # seconds the writer gathers turns into one transaction


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
