"""The configuration: its dataclasses, and the validation of its values. Pure.

:func:`resolve` turns ``section.key`` values into a frozen :class:`Config`;
every wrong value raises :class:`ConfigError` naming the key, the value and
what is allowed. What it needs of the machine is handed in: the CPU count
(for ``server.workers = "auto"``) and a test of whether a path is a file.
The loader that reads the config file, the environment and the CPU count is
:mod:`shardchat.configload`.
"""

from shardchat.core.config.render import SECRET_KEYS, redact_url, to_toml
from shardchat.core.config.resolver import env_name, resolve
from shardchat.core.config.sections import (
    ENV_PREFIX,
    HANDSHAKE_DEADLINE,
    REDACTED,
    SECTIONS,
    WEBHOOK_EVENTS,
    ApiConfig,
    AuthConfig,
    BrokerConfig,
    Config,
    DeliveryConfig,
    HeartbeatConfig,
    LimitsConfig,
    LogConfig,
    OverloadConfig,
    PresenceConfig,
    ProxyConfig,
    RedisConfig,
    RingConfig,
    ServerConfig,
    StorageConfig,
    WebhooksConfig,
)

__all__ = [
    "ApiConfig",
    "AuthConfig",
    "BrokerConfig",
    "Config",
    "DeliveryConfig",
    "ENV_PREFIX",
    "HANDSHAKE_DEADLINE",
    "HeartbeatConfig",
    "LimitsConfig",
    "LogConfig",
    "OverloadConfig",
    "PresenceConfig",
    "ProxyConfig",
    "REDACTED",
    "RedisConfig",
    "RingConfig",
    "SECRET_KEYS",
    "SECTIONS",
    "ServerConfig",
    "StorageConfig",
    "WEBHOOK_EVENTS",
    "WebhooksConfig",
    "env_name",
    "redact_url",
    "resolve",
    "to_toml",
]
