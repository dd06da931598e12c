"""Checks before the first fork: the port is free, the open-files limit, the API's address."""

from __future__ import annotations

import errno
import logging
import resource
import socket

from shardchat.core.config import Config, ServerConfig
from shardchat.core.errors import ShardError
from shardchat.logs import log_event
from shardchat.supervisor.apiproxy import ApiTarget

__all__ = ["api_target", "check_port_free", "raise_nofile"]

# The supervisor's logger: these events keep the name they always had.
log = logging.getLogger("shardchat.supervisor.supervisor")


def raise_nofile(config: Config, workers: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    # Each shard keeps some descriptors for itself: its socket, rings, logs.
    capacity = workers * max(0, hard - 64)
    wanted = config.server.max_connections
    if wanted > capacity:
        # The default max_connections is a ceiling, not a promise: on a default
        # setup this is only worth a debug line. A value the user chose that the
        # open-files limit cannot hold is a real warning.
        chosen = wanted != ServerConfig().max_connections
        log_event(
            log,
            logging.WARNING if chosen else logging.DEBUG,
            "nofile_limit",
            max_connections=config.server.max_connections,
            capacity=capacity,
            hint=f"{workers} shards x {hard} open files cannot hold max_connections",
        )


def api_target(config: Config) -> tuple[ApiTarget | None, str]:
    """Where the dashboard's calls go: the server API (its own listener, api.port, or
    the main port), as a client on this box reaches it; or None and why not: the API
    is off, or behind TLS (the admin port's forward speaks plain HTTP)."""
    api = config.api
    if not api.key:
        return None, "the server API is off: set api.key"
    if config.server.tls_cert:
        return None, "the server API is behind TLS, which the admin port's forward does not speak"
    host, port = (api.host, api.port) if api.port else (config.server.host, config.server.port)
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return ApiTarget(host, port, api.key), ""


def check_port_free(host: str, port: int) -> None:
    """Refuse to start on a port someone already listens on.

    The probe binds without SO_REUSEPORT: a shard of another running server,
    which binds with it, would otherwise share the port with ours silently.
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ShardError(f"cannot resolve server.host {host!r}: {exc.strerror}") from None
    family, kind, proto, _, address = infos[0]
    probe = socket.socket(family, kind, proto)
    try:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(address)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise ShardError(f"port {port} on {host} is already in use") from None
        raise ShardError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    finally:
        probe.close()
