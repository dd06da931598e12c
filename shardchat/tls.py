"""TLS for the main port: ``wss://`` and ``https://`` on ``server.port``.

With ``server.tls_cert`` and ``server.tls_key`` set, every shard wraps its
listening socket with the same server context (TLS 1.2 or later); with
``server.tls_client_ca`` too, clients must present a certificate signed by
that CA (mutual TLS). The supervisor builds the context once before the
first fork, so that a bad file stops the start with one line and exit 2;
each shard builds its own after the fork.
"""

from __future__ import annotations

import ssl

from shardchat.core.config import ServerConfig
from shardchat.core.errors import ConfigError

__all__ = ["server_context"]


def server_context(server: ServerConfig) -> ssl.SSLContext | None:
    """The main port's TLS context, or None when TLS is off.

    Raises:
        ConfigError: a certificate, key or CA file that does not load.
    """
    if not server.tls_cert:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(server.tls_cert, server.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            "server.tls_cert", server.tls_cert, f"does not load with tls_key: {exc}"
        ) from None
    if server.tls_client_ca:
        try:
            context.load_verify_locations(cafile=server.tls_client_ca)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                "server.tls_client_ca", server.tls_client_ca, f"does not load: {exc}"
            ) from None
        context.verify_mode = ssl.CERT_REQUIRED
    return context
