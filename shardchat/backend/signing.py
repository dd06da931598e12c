"""Standard Webhooks signatures (https://www.standardwebhooks.com/). Pure.

A POST carries ``webhook-id`` (the batch's id: the same on every retry, so a
receiver can drop a batch it already took), ``webhook-timestamp`` (Unix
seconds of this attempt) and ``webhook-signature``: ``v1,`` and the base64
HMAC-SHA256, keyed by the secret's bytes (``whsec_`` + base64), of
``"{id}.{timestamp}.{body}"``. Any Standard Webhooks library verifies it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac

__all__ = ["secret_key", "sign", "signed_headers"]


def secret_key(secret: str) -> bytes:
    """The HMAC key of a ``whsec_``-prefixed base64 secret."""
    body = secret.removeprefix("whsec_")
    return base64.b64decode(body + "=" * (-len(body) % 4))


def sign(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` value of one attempt."""
    digest = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def signed_headers(key: bytes, msg_id: str, timestamp: int, body: bytes) -> list[tuple[str, str]]:
    return [
        ("webhook-id", msg_id),
        ("webhook-timestamp", str(timestamp)),
        ("webhook-signature", sign(key, msg_id, timestamp, body)),
    ]
