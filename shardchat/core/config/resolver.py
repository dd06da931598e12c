"""Values of ``section.key`` resolved into a frozen Config, with the checks across keys. Pure."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping

from shardchat.core.config.checks import CHECKS, NOT_A_FILE, check_file
from shardchat.core.config.sections import ENV_PREFIX, HANDSHAKE_DEADLINE, SECTIONS, Config
from shardchat.core.errors import ConfigError

__all__ = ["env_name", "resolve"]


def env_name(key: str) -> str:
    """The environment variable of ``section.key``."""
    return ENV_PREFIX + key.replace(".", "_").upper()


def _unknown(key: str, source: str | None) -> str:
    close = difflib.get_close_matches(key, CHECKS, n=3, cutoff=0.6)
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
        check = CHECKS.get(key)
        if check is None:
            raise ConfigError(key, value, _unknown(key, source), source)
        section, _, name = key.partition(".")
        try:
            checked = check(key, value)
            if check is check_file and checked and not is_file(str(checked)):
                raise ConfigError(key, value, NOT_A_FILE)
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
